"""gptq_round_weights: GPTQ's integers are the ones stored and the ones the graph computes with, each layer keeps
the column order with the lower calibration error, the graph keeps its ops, save/load keeps them."""

from __future__ import annotations

import re

import pytest
import torch

import zqcompile
from helpers import export_graph, make_tiny_llama, token_batch
from test_rounding import correlated_inputs, layer
from zqcompile.capture import capture
from zqcompile.passes.infra import META_MODULE, META_ROUNDING, get_attr_tensor
from zqcompile.pipeline import run_pipeline
from zqcompile.quant import dequantize_weight_values, unpack_weight
from zqcompile.recipe import Recipe, preset
from zqcompile.rounding import Layout, gptq_quantize

W4A8_GPTQ = {"base": "w4a8", "weight_rounding": "gptq"}


@pytest.fixture(scope="module")
def gptq_llama():
    model = make_tiny_llama()
    return (model, zqcompile.compile(model, W4A8_GPTQ, generation=False),  # the forward graphs only
            zqcompile.compile(model, "w4a8", generation=False))


def _calibration() -> list[tuple[torch.Tensor, ...]]:
    ids = token_batch(8, 16, seed=5)
    return [(chunk, torch.ones_like(chunk)) for chunk in ids.split(4)]


ROUNDING = re.compile(r"gptq (natural|act-order): output error (\S+) \(rtn\) -> (\S+) \(natural order\), "
                      r"(\S+) \(act-order\)")


def _reported(meta: str) -> tuple[str, float, float, float]:
    """(order kept, rtn error, natural-order error, act-order error) of a ``zq_rounding`` meta."""
    order, *errors = ROUNDING.fullmatch(meta).groups()
    return order, *(float(e) for e in errors)


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
        assert ROUNDING.fullmatch(how), how
        assert any(torch.equal(q, r.q) and torch.equal(scale, r.scale) for r in rounded), module
        assert q.shape == nearest[module][0].shape and scale.shape == nearest[module][1].shape
    assert sum(not torch.equal(stored[m][0], nearest[m][0]) for m in stored) == 14  # GPTQ moved some integers
    ops = lambda q: [str(n.target) for n in q.graph_module.graph.nodes if n.op == "call_function"]  # noqa: E731
    assert ops(gptq) == ops(rtn)
    assert gptq.context.counters["gptq.rounded"] == 14


def test_reported_errors_drop_on_the_calibration_data(gptq_llama):
    _, gptq, _ = gptq_llama
    reported = [_reported(how) for _, _, how in _stored(gptq.graph_module).values()]
    kept = [natural if order == "natural" else act_order for order, _, natural, act_order in reported]
    assert sum(kept) < 0.9 * sum(rtn for _, rtn, _, _ in reported)
    assert all(kept_error == min(natural, act_order) for kept_error, (_, _, natural, act_order) in zip(kept, reported))
    assert gptq.context.counters["gptq.act_order"] == sum(order == "act-order" for order, *_ in reported)


def test_the_graph_computes_with_the_stored_integers_dequantized():
    result = run_pipeline(capture(make_tiny_llama(), None).graph_module, Recipe.from_dict(W4A8_GPTQ),
                          stop_after="round_weights", calibration_inputs=_calibration())
    gm, rounded = result.compiled, result.context.rounded_weights
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("_gptq")}
    assert len(rounded) == 14 and set(rounded) == read
    for target, r in rounded.items():
        weight = gm.get_parameter(target) if target in dict(gm.named_parameters()) else gm.get_buffer(target)
        assert torch.equal(weight, dequantize_weight_values(r.q, r.scale, r.w_min).to(weight.dtype)), target
    assert result.context.counters["gptq.act_order"] > 0  # act-order's integers are among those checked


class TwoInputs(torch.nn.Module):
    """Two linears over one input scaled two ways: four loud channels spread over the groups (act-order should
    win) and a gain falling from 8 to 1 along the input (the loudest already come first: natural order should)."""

    def __init__(self):
        super().__init__()
        self.loud, self.falling = torch.nn.Linear(32, 16, bias=False), torch.nn.Linear(32, 16, bias=False)
        with torch.no_grad():
            self.loud.weight.copy_(layer())
            self.falling.weight.copy_(layer(seed=2))
        louder = torch.ones(32)
        louder[[3, 13, 22, 31]] = 8.0
        self.register_buffer("louder", louder)
        self.register_buffer("falling_gain", torch.linspace(8.0, 1.0, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loud(x * self.louder) + self.falling(x * self.falling_gain)


def test_each_layer_keeps_the_order_with_the_lower_calibration_error():
    model, x = TwoInputs(), correlated_inputs()
    result = run_pipeline(export_graph(model, x), Recipe(weight_bits=4, input_group_size=8, weight_rounding="gptq"),
                          stop_after="round_weights", calibration_inputs=[(x,)])
    kept = {n.meta[META_MODULE]: _reported(n.meta[META_ROUNDING])[0] for n in result.compiled.graph.nodes
            if META_ROUNDING in n.meta}
    layout = Layout(4, None, 8)
    for name, gain in (("loud", model.louder), ("falling", model.falling_gain)):
        inputs, weight = (x * gain).double(), getattr(model, name).weight.detach()
        hessian = inputs.T @ inputs
        errors = {}  # each order's output error on the calibration inputs, computed here
        for order in ("natural", "act-order"):
            q = gptq_quantize(weight, hessian, layout, act_order=order == "act-order")
            errors[order] = (inputs @ (weight - dequantize_weight_values(*q)).double().T).pow(2).sum().item()
        assert kept[name] == min(errors, key=errors.get), (name, errors)
        stored = result.context.rounded_weights[f"model.{name}.weight_gptq"].q
        assert torch.equal(stored, gptq_quantize(weight, hessian, layout, act_order=kept[name] == "act-order")[0])
    assert kept == {"loud": "act-order", "falling": "natural"}  # the case is built so that each order wins once
    assert result.context.counters["gptq.act_order"] == 1


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
    rotated_gptq = zqcompile.compile(model, {"base": "w4a8-rot", "weight_rounding": "gptq"}, generation=False)
    rotated = zqcompile.compile(model, "w4a8-rot", generation=False)
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
        _, rtn, natural, act_order = _reported(node.meta[META_ROUNDING])
        assert min(natural, act_order) < rtn
        stored += 1
    assert stored == 6
