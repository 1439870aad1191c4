"""low_rank_correction: LoRC's FP16 factors are the truncated SVD of the stored weight's error, applied to the
input the integer GEMM reads; the model saves and loads with them."""

from __future__ import annotations

from typing import Callable

import torch
from torch.fx import GraphModule

import zqcompile
from helpers import make_tiny_llama, token_batch
from zqcompile.capture import capture
from zqcompile.passes.infra import META_MODULE, get_attr_tensor, linear_nodes
from zqcompile.pipeline import run_pipeline
from zqcompile.quant import dequantize_weight_values, unpack_weight
from zqcompile.recipe import Recipe

zq = torch.ops.zq


def _truncated_svd(error: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(error.double())
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def _check_corrections(gm: GraphModule, fp_weight: Callable[[str], torch.Tensor], rank: int) -> int:
    """Every LoRC factor pair of ``gm`` is the rank-``rank`` truncated SVD of ``fp_weight(module)`` minus the
    weight the integer GEMM stores, and reads that GEMM's dequantized INT8 input; returns how many there are."""
    corrections = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is zq.low_rank_correction.default]
    for node in corrections:
        linear, x, a_node, b_node = node.args
        a, b = get_attr_tensor(gm, a_node), get_attr_tensor(gm, b_node)
        assert a.dtype == b.dtype == torch.float16 and a.shape[1] == b.shape[0] == rank
        # the correction reads the linear's own dequantized INT8 input
        assert x.target is zq.dequantize_per_token.default and x.args[:2] == linear.args[:2]
        w_q, w_scale = get_attr_tensor(gm, linear.args[2]), get_attr_tensor(gm, linear.args[3])
        stored = dequantize_weight_values(unpack_weight(w_q, w_scale), w_scale)
        truncated = _truncated_svd(fp_weight(linear.meta[META_MODULE]) - stored, rank)
        assert (a.double() @ b.double() - truncated).abs().max() < 2e-3 * truncated.abs().max()
    return len(corrections)


def test_factors_are_the_truncated_svd_of_the_stored_error_and_read_the_gemms_input(tmp_path):
    model = make_tiny_llama()
    qmodel = zqcompile.compile(model, {"base": "w4a8", "lorc_rank": 4}, generation=False)
    gm = qmodel.graph_module
    count = _check_corrections(gm, lambda module: model.get_submodule(module).weight.detach(), 4)
    assert count == 14 and qmodel.context.counters["lorc.corrected"] == 14
    # the correction brings the compiled model closer to the FP model
    plain = zqcompile.compile(model, "w4a8", generation=False)
    ids = token_batch(2, 12)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        error = (qmodel(input_ids=ids).logits - reference).pow(2).mean()
        assert error < (plain(input_ids=ids).logits - reference).pow(2).mean()
    # memory: the factors are counted in the layers' weight bytes
    assert qmodel.weight_memory().quantized_after > plain.weight_memory().quantized_after
    assert "lorc rank 4: weight error" in zqcompile.inspect(qmodel, code=False)
    qmodel.save(tmp_path / "lorc")
    loaded = zqcompile.load(tmp_path / "lorc")
    with torch.no_grad():
        assert torch.equal(qmodel(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.recipe.lorc_rank == 4


def test_after_rotation_and_gptq_the_factors_correct_gptqs_stored_integers():
    # LoRC after GPTQ: the error corrected is the rotated FP weight minus GPTQ's integers (the ones stored), not
    # minus round to nearest's
    model = make_tiny_llama()
    recipe = Recipe.from_dict({"base": "w4a8-rot", "weight_rounding": "gptq", "lorc_rank": 4})
    ids = token_batch(8, 16, seed=5)
    calibration = [(chunk, torch.ones_like(chunk)) for chunk in ids.split(4)]
    result = run_pipeline(capture(model, None).graph_module, recipe, calibration_inputs=calibration)
    assert result.context.counters["gptq.rounded"] == result.context.counters["lorc.corrected"] == 14
    rotated_gm = run_pipeline(capture(model, None).graph_module, recipe, stop_after="rotate").compiled
    rotated = {n.meta[META_MODULE]: get_attr_tensor(rotated_gm, n.args[1]).detach() for n in linear_nodes(rotated_gm)}
    assert _check_corrections(result.compiled, rotated.__getitem__, 4) == 14
    # GPTQ moved integers away from round to nearest, so the two errors' factors differ
    nearest = zqcompile.compile(model, {"base": "w4a8-rot", "lorc_rank": 4}, generation=False).graph_module

    def factors(gm: GraphModule) -> list[torch.Tensor]:
        return [get_attr_tensor(gm, n.args[2]).double() @ get_attr_tensor(gm, n.args[3]).double()
                for n in gm.graph.nodes if n.target is zq.low_rank_correction.default]

    after_gptq, after_nearest = factors(result.compiled), factors(nearest)
    assert len(after_gptq) == len(after_nearest) == 14
    assert all((f - g).abs().max() > 1e-2 * g.abs().max() for f, g in zip(after_gptq, after_nearest))
