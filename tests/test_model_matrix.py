"""The model-coverage matrix (tests/model_matrix.py): every family captures, every attention / MLP linear gets a
role, every quantization an elementwise op computes is fused into it (or the matrix says why not), W8A8 agrees with
FP, save -> load is bit-identical, every decoder's greedy generate (linears kept in floating point) is token-identical
to Hugging Face's, an unsupported family raises a ZQError naming it, and the README's table is exactly what these
rows render (regenerate it with ``python scripts/model_matrix.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

import zqcompile
from model_matrix import (
    DECODER_SIZES, EXPLAINED_UNFUSED, FAMILIES, LAYERS, MIN_COSINE, UNSUPPORTED, all_families, measure,
    readme_section, render,
)
from test_generation import FP_KEPT
from zqcompile.kv_cache import capture_static_cache

pytestmark = pytest.mark.slow  # the module's rows compile every family (over a minute)

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK_ROLES = {"attn_qkv", "attn_out", "mlp_in", "mlp_out"}


@pytest.fixture(scope="module")
def rows():
    return {family.name: measure(family) for family in all_families()}


@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_family_compiles_with_roles_fusion_agreement_and_round_trip(rows, family):
    row = rows[family]
    assert row.error is None
    assert row.other_roles == () and BLOCK_ROLES <= dict(row.roles).keys()
    if family in EXPLAINED_UNFUSED:
        assert row.unfused and row.fusion_share < 1
    else:
        assert row.unfused == () and row.fused > 0, row.unfused
    assert row.attention_outputs == LAYERS  # the one quantization per block that has no elementwise producer
    assert MIN_COSINE <= row.cosine < 1.0  # close to FP, and really quantized
    assert row.round_trip
    assert row.generate == ("✓" if row.kind == "decoder" else None)
    # inspect agrees: only the attention output projections read a standalone quantization
    assert sum(fused.startswith("standalone") for fused in row.fused_into) == LAYERS


def test_deberta_relative_positions_are_quantized_ahead_of_time(rows):
    """Its relative-position embeddings (a stored table) are quantized once, shared by both layers' position
    projections; inspect says so."""
    fused_into = rows["DeBERTa-v2"].fused_into
    assert sum(fused == "quantized ahead of time (stored)" for fused in fused_into) == 2 * LAYERS


def test_parallel_attention_and_mlp_share_one_quantize(rows):
    """GPT-J's attention and MLP read one LayerNorm output: one fused quantize per block for both, plus GELU's."""
    assert rows["GPT-J"].fused == 2 * LAYERS and dict(rows["GPT-J"].roles)["attn_qkv"] == 3 * LAYERS


@pytest.mark.parametrize("family", [f.name for f in UNSUPPORTED])
def test_unsupported_family_raises_a_zqerror_naming_it(rows, family):
    assert "ForConditionalGeneration is an encoder-decoder model" in rows[family].error


def test_sliding_window_bounds_the_generation_cache():
    """Gemma-3's sliding-window layers attend over the whole cache only while it fits in their window: the default
    cache is the window, a longer one is refused with the fix named."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    model = Gemma3ForCausalLM(Gemma3TextConfig(**DECODER_SIZES, head_dim=16, sliding_window=8)).eval()
    assert capture_static_cache(model).max_cache_len == 8
    refused = r"sliding-window layers of 8 tokens, shorter than the KV cache of 16 slots.*max_cache_len <= 8"
    with pytest.raises(zqcompile.ZQError, match=refused):
        zqcompile.compile(model, FP_KEPT, max_cache_len=16)


def test_readme_shows_this_matrix(rows):
    assert readme_section(README.read_text()) == render([rows[f.name] for f in all_families()]), (
        "README's model matrix is stale: run `python scripts/model_matrix.py`")
