"""awq_scale_weights: AWQ's factors are folded with smoothing's fold, exactly in floating point."""

from __future__ import annotations

import pytest
import torch

import zqcompile
from helpers import make_tiny_llama, token_batch
from zqcompile.capture import capture
from zqcompile.passes.infra import META_MODULE, META_ROUNDING, get_attr_tensor
from zqcompile.pipeline import run_pipeline
from zqcompile.recipe import LKDConfig, Recipe


def _calibration() -> list[tuple[torch.Tensor, ...]]:
    ids = token_batch(4, 16, seed=7)
    return [(ids, torch.ones_like(ids))]


def _weights(gm) -> dict[str, torch.Tensor]:
    return {n.meta[META_MODULE]: get_attr_tensor(gm, n.args[1]) for n in gm.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.linear.default}


def test_the_fold_is_exact_in_floating_point():
    model = make_tiny_llama()
    captured = capture(model, None)
    before = {name: m.weight.detach() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    result = run_pipeline(captured.graph_module, Recipe(weight_bits=4, input_group_size=32, weight_rounding="awq"),
                          stop_after="round_weights", calibration_inputs=_calibration())
    gm, ctx = result.compiled, result.context
    assert ctx.counters["awq.rmsnorm"] == 4 and ctx.counters["awq.swiglu"] == 2 and ctx.counters["awq.attention"] == 2
    after = _weights(gm)
    # W * s column-wise for every reader of one activation, with the same s: the ratio is a per-column constant
    ratio = after["model.layers.0.mlp.gate_proj"] / before["model.layers.0.mlp.gate_proj"]
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-6)
    # up_proj also has its rows divided by the SwiGLU output's factors: a per-row constant on top
    rows = after["model.layers.0.mlp.up_proj"] / before["model.layers.0.mlp.up_proj"] / ratio
    assert torch.allclose(rows, rows[:, :1].expand_as(rows), rtol=1e-5)
    assert (ratio[0] - 1).abs().max() > 1e-3  # something was scaled
    # the graph (still FP here) computes the model's function on inputs it was not calibrated on
    ids = token_batch(3, 11, seed=8)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double()
        got = gm(ids, torch.ones_like(ids))[0].double()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert all(n.meta[META_ROUNDING].startswith("awq: output error") for n in gm.graph.nodes
               if n.op == "call_function" and n.target is torch.ops.aten.linear.default
               and n.meta.get(META_MODULE, "").startswith("model.layers"))


def test_awq_compiles_saves_and_loads(tmp_path):
    model = make_tiny_llama()
    qmodel = zqcompile.compile(model, {"base": "w4a16", "input_group_size": 32, "weight_rounding": "awq"},
                               generation=False)
    assert "awq: output error" in zqcompile.inspect(qmodel, code=False)
    qmodel.save(tmp_path / "awq")
    loaded = zqcompile.load(tmp_path / "awq")
    ids = token_batch(2, 9)
    with torch.no_grad():
        assert torch.equal(qmodel(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.recipe.weight_rounding == "awq"


def test_awq_after_lkd_scales_the_distilled_weights_exactly():
    # the distill phase runs before round_weights: AWQ's fold keeps the distilled function (exact in floating point),
    # its search starts from the distilled weights, and factor 1 (alpha 0) is on its grid, so nothing forbids LKD
    model = make_tiny_llama()
    lkd = LKDConfig(data="random", num_samples=4, seq_len=8, batch_size=4, steps=3, lr=1e-3, progress=False)
    recipe = Recipe(weight_bits=4, input_group_size=32, weight_rounding="awq", lkd=lkd)
    graphs = {phase: run_pipeline(capture(model, None).graph_module, recipe, stop_after=phase, source_model=model,
                                  calibration_inputs=_calibration()).compiled for phase in ("distill", "round_weights")}
    distilled, scaled = _weights(graphs["distill"]), _weights(graphs["round_weights"])
    original = model.model.layers[0].mlp.gate_proj.weight.detach()
    assert not torch.equal(distilled["model.layers.0.mlp.gate_proj"], original)  # LKD trained it
    ratio = scaled["model.layers.0.mlp.gate_proj"] / distilled["model.layers.0.mlp.gate_proj"]
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-5) and (ratio[0] - 1).abs().max() > 1e-3
    ids = token_batch(3, 11, seed=8)
    with torch.no_grad():
        expected = graphs["distill"](ids, torch.ones_like(ids))[0].double()
        got = graphs["round_weights"](ids, torch.ones_like(ids))[0].double()
        fp = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.double()
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert ((fp - expected).abs().max() / expected.abs().max()).item() > 1e-4  # the distilled function is not FP's


@pytest.mark.parametrize("fields, message", [
    ({"weight_rounding": "awq", "smooth_alpha": 0.5}, "both choose the per-channel scale"),
    ({"weight_rounding": "optq"}, r"weight_rounding must be one of \['rtn', 'gptq', 'awq'\]"),
    ({"lorc_rank": 0}, "lorc_rank must be a positive integer"),
    ({"outlier_threshold": -1}, "outlier_threshold must be a positive number"),
    ({"outlier_threshold": 6.0, "lorc_rank": 8}, "use one of them"),
    ({"base": "w4a16", "outlier_threshold": 6.0}, "this recipe is weight-only"),
])
def test_recipe_errors_name_the_problem_and_the_fix(fields, message):
    with pytest.raises(zqcompile.ZQError, match=message):
        Recipe.from_dict(fields)
