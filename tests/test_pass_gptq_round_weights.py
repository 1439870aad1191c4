"""gptq_round_weights: GPTQ's integers are the ones stored, the graph keeps its ops, save/load keeps them."""

from __future__ import annotations

import pytest
import torch

import zqcompile
from helpers import make_tiny_llama, token_batch
from zqcompile.capture import capture
from zqcompile.passes.infra import META_MODULE, META_ROUNDING, get_attr_tensor
from zqcompile.pipeline import run_pipeline
from zqcompile.quant import unpack_weight
from zqcompile.recipe import Recipe, preset

W4A8_GPTQ = {"base": "w4a8", "weight_rounding": "gptq"}


@pytest.fixture(scope="module")
def gptq_llama():
    model = make_tiny_llama()
    return model, zqcompile.compile(model, W4A8_GPTQ), zqcompile.compile(model, "w4a8")


def _calibration() -> list[tuple[torch.Tensor, ...]]:
    ids = token_batch(8, 16, seed=5)
    return [(chunk, torch.ones_like(chunk)) for chunk in ids.split(4)]


def _stored(gm) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    """module -> (int8 values, scales, rounding meta) of every quantized linear of a compiled graph."""
    from zqcompile.ops import WEIGHT_ARGS
    stored = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in WEIGHT_ARGS and META_MODULE in n.meta:
            w, scale = (get_attr_tensor(gm, n.args[i]) for i in WEIGHT_ARGS[n.target][:2])
            stored[n.meta[META_MODULE]] = (unpack_weight(w, scale), scale, n.meta.get(META_ROUNDING, "rtn"))
    return stored


def test_the_stored_integers_are_gptqs_and_the_ops_are_unchanged(gptq_llama):
    model, gptq, rtn = gptq_llama
    recipe = gptq.recipe
    rounded = list(run_pipeline(capture(model, None).graph_module, recipe, stop_after="round_weights",
                                calibration_inputs=_calibration()).context.rounded_weights.values())
    assert len(rounded) == 14
    compiled = run_pipeline(capture(model, None).graph_module, recipe, calibration_inputs=_calibration())
    assert not compiled.context.rounded_weights  # quantize_weights consumed them
    stored, nearest = _stored(compiled.compiled), _stored(rtn.graph_module)
    assert set(stored) == set(nearest) and len(stored) == 14  # every quantized linear of the 2 blocks
    for module, (q, scale, how) in stored.items():
        assert how.startswith("gptq: output error")
        assert any(torch.equal(q, r.q) and torch.equal(scale, r.scale) for r in rounded), module
        assert q.shape == nearest[module][0].shape and scale.shape == nearest[module][1].shape
    assert sum(not torch.equal(stored[m][0], nearest[m][0]) for m in stored) == 14  # GPTQ moved some integers
    ops = lambda q: [str(n.target) for n in q.graph_module.graph.nodes if n.op == "call_function"]  # noqa: E731
    assert ops(gptq) == ops(rtn)
    assert gptq.context.counters["gptq.rounded"] == 14


def test_reported_errors_drop_on_the_calibration_data(gptq_llama):
    _, gptq, _ = gptq_llama
    pairs = [tuple(float(v) for v in how.removeprefix("gptq: output error ").split(" (rtn) -> "))
             for _, _, how in _stored(gptq.graph_module).values()]
    assert sum(after for _, after in pairs) < 0.9 * sum(before for before, _ in pairs)


def test_save_load_round_trip_keeps_gptqs_integers(gptq_llama, tmp_path):
    _, gptq, _ = gptq_llama
    gptq.save(tmp_path / "gptq")
    loaded = zqcompile.load(tmp_path / "gptq")
    assert loaded.recipe.weight_rounding == "gptq"
    ids = token_batch(2, 9)
    with torch.no_grad():
        assert torch.equal(gptq(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert zqcompile.inspect(loaded, code=False) == zqcompile.inspect(gptq, code=False)


def test_without_calibration_inputs_gptq_is_refused():
    captured = capture(make_tiny_llama(), None)
    with pytest.raises(zqcompile.ZQError, match="weight_rounding: gptq, which needs calibration inputs"):
        run_pipeline(captured.graph_module, Recipe(weight_rounding="gptq"))


def test_round_to_nearest_recipes_do_not_run_it():
    captured = capture(make_tiny_llama(), None)
    result = run_pipeline(captured.graph_module, preset("w4a8"), stop_after="round_weights")
    assert not result.context.rounded_weights and "gptq_round_weights" in result.context.passes_run


def test_gptq_composes_with_rotation():
    # rotation removes the outlier channels, GPTQ then rounds the rotated weights (the maths allows it: the fold
    # is exact, GPTQ sees the rotated layer inputs)
    model = make_tiny_llama()
    rotated_gptq = zqcompile.compile(model, {"base": "w4a8-rot", "weight_rounding": "gptq"})
    rotated = zqcompile.compile(model, "w4a8-rot")
    rounded = {module: meta for module, (_, _, meta) in _stored(rotated_gptq.graph_module).items()}
    assert rounded and all(meta != "rtn" and "gptq" in str(meta) for meta in rounded.values()), rounded
    ids = token_batch(4, 16, seed=9)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        errors = [torch.mean((m(input_ids=ids).logits - reference) ** 2).item() for m in (rotated_gptq, rotated)]
    assert errors[0] < errors[1]


def test_asymmetric_int4_plans_get_gptqs_integers_and_mins_on_the_asymmetric_grid():
    model = make_tiny_llama()
    recipe = Recipe.from_dict({"base": "w4a8-asym", "weight_rounding": "gptq"})
    rounded = run_pipeline(capture(model, None).graph_module, recipe, stop_after="round_weights",
                           calibration_inputs=_calibration()).context.rounded_weights.values()
    int4 = [r for r in rounded if r.layout.bits == 4]
    assert len(int4) == 6  # gate, up, down of 2 blocks
    assert all(not r.layout.symmetric and r.q.min() >= 0 and r.q.max() <= 15 for r in int4)
    gm = run_pipeline(capture(model, None).graph_module, recipe, calibration_inputs=_calibration()).compiled
    stored = 0
    for node in gm.graph.nodes:
        if node.target is not torch.ops.zq.int4_linear.default:
            continue
        w, scale, w_min = (get_attr_tensor(gm, node.args[i]) for i in (2, 3, 6))
        assert any(torch.equal(unpack_weight(w, scale, w_min), r.q) and torch.equal(w_min, r.w_min) for r in int4)
        errors = node.meta[META_ROUNDING].removeprefix("gptq: output error ").split(" (rtn) -> ")
        before, after = (float(v) for v in errors)
        assert after < before
        stored += 1
    assert stored == 6
