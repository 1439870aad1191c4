"""The recipe shipped in examples/ loads and resolves to the plans its comments promise."""

from __future__ import annotations

from pathlib import Path

from zqcompile.recipe import LinearSite, load_recipe

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "recipe_w4a8_custom.yaml"


def _site(module: str, role: str) -> LinearSite:
    return LinearSite(module, role, out_features=384, in_features=1536 if role == "mlp_out" else 384)


def test_custom_w4a8_recipe_resolves_as_documented():
    sites = [_site("encoder.layer.0.output.dense", "mlp_out"), _site("encoder.layer.0.attention.self.query", "attn_qkv"),
             _site("encoder.layer.1.output.dense", "mlp_out"), _site("encoder.layer.1.intermediate.dense", "mlp_in"),
             _site("encoder.layer.1.attention.self.query", "attn_qkv"), _site("pooler.dense", "classifier")]
    plans = load_recipe(str(EXAMPLE)).resolve(sites)
    first_block = plans["encoder.layer.0.output.dense"]
    assert (first_block.weight_bits, first_block.input_group_size) == (8, None)
    assert plans["encoder.layer.0.attention.self.query"].weight_bits == 8
    down = plans["encoder.layer.1.output.dense"]
    assert (down.weight_bits, down.input_group_size, down.act_bits) == (4, 128, 8)
    up = plans["encoder.layer.1.intermediate.dense"]
    assert (up.weight_bits, up.input_group_size) == (4, 64)  # the w4a8 preset's groups
    assert plans["encoder.layer.1.attention.self.query"].kind == "W8A8"
    assert plans["pooler.dense"].kind == "FP"
