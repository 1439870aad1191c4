"""lower_linear_to_int8_gemm: simulated-quantization linears become integer GEMM ops; FP linears stay."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx import Interpreter

from helpers import apply_pass, count_ops, export_graph, op_targets, prepare_for
from zqcompile.passes import lower_linear_to_int8_gemm
from zqcompile.passes.infra import LINEAR

zq = torch.ops.zq


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64)
        self.q_proj, self.up_proj, self.down_proj = nn.Linear(64, 64), nn.Linear(64, 128), nn.Linear(128, 64)
        self.lm_head = nn.Linear(64, 16)

    def forward(self, x):
        h = self.q_proj(self.norm(x))
        return self.lm_head(h + self.down_proj(torch.relu(self.up_proj(h))))


class _CheckGemms(Interpreter):
    """Runs a lowered graph and checks every integer GEMM against float64 math on its own operands."""

    def __init__(self, gm):
        super().__init__(gm)
        self.checked = 0

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if target in (zq.int8_linear.default, zq.int4_linear.default, zq.weight_only_linear.default):
            if target is zq.weight_only_linear.default:
                x, w_q, w_scale, bias = args
            else:
                q, scale, w_q, w_scale, bias, _ = args
                x = q.double() * scale.double()
            w = zq.dequantize_weight(w_q, w_scale, torch.float64)
            expected = x.double() @ w.T + (bias.double() if bias is not None else 0)
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
            self.checked += 1
        return out


def _lower(recipe):
    x = torch.randn(2, 3, 64)
    gm, ctx = prepare_for(lower_linear_to_int8_gemm, export_graph(Block(), x), recipe)
    simulated = copy.deepcopy(gm)
    result = apply_pass(lower_linear_to_int8_gemm, gm, ctx)
    x = torch.randn(4, 3, 64)
    with torch.no_grad():
        expected, out = simulated(x), gm(x)
        gemms = _CheckGemms(gm)
        gemms.run(x)
    assert gemms.checked == sum(result.counters.values())
    return gm, result, expected, out


def assert_close_to_simulated(out: torch.Tensor, expected: torch.Tensor) -> None:
    """The integer GEMM and the float GEMM of the simulated graph round differently (~1e-7), which may move a
    later token's quantization across a tie: a few values then differ by one quantization step."""
    near = (out - expected).abs() <= 1e-5 * expected.abs().max()
    assert near.double().mean() >= 0.9
    assert (out - expected).abs().max() <= 1e-2 * expected.abs().max()


def _lowered_modules(gm, op) -> list[str]:
    return [n.meta["zq_module"] for n in gm.graph.nodes if n.target is op]


def test_w8a8_lowers_to_int8_linear_with_same_numbers():
    gm, result, expected, out = _lower("w8a8")
    assert result.modified and result.counters == {"lower.int8_linear": 3}
    assert _lowered_modules(gm, zq.int8_linear.default) == ["q_proj", "up_proj", "down_proj"]
    assert [n.meta["zq_module"] for n in gm.graph.nodes if n.target is LINEAR] == ["lm_head"]
    # the simulated pair (dequantize_per_token / dequantize_weight) is gone: the GEMM reads integers
    assert count_ops(gm, zq.dequantize_per_token.default, zq.dequantize_weight.default) == 0
    int8_gemm = next(n for n in gm.graph.nodes if n.target is zq.int8_linear.default)
    assert int8_gemm.args[0].args[0].target is zq.layernorm_quant.default  # q from the fused LayerNorm
    assert_close_to_simulated(out, expected)


def test_w4a8_lowers_mlp_to_int4_linear():
    gm, result, expected, out = _lower("w4a8")
    assert result.counters == {"lower.int8_linear": 1, "lower.int4_linear": 2}
    assert _lowered_modules(gm, zq.int4_linear.default) == ["up_proj", "down_proj"]
    assert_close_to_simulated(out, expected)


def test_weight_only_lowers_to_weight_only_linear():
    gm, result, expected, out = _lower("w4a16")
    assert result.counters == {"lower.weight_only_linear": 3}
    assert count_ops(gm, zq.int8_linear.default, zq.int4_linear.default, zq.quantize_per_token.default) == 0
    assert_close_to_simulated(out, expected)


def test_all_fp_graph_is_unchanged():
    gm, ctx = prepare_for(lower_linear_to_int8_gemm, export_graph(Block(), torch.randn(2, 3, 64)),
                          {"keep_fp": ["*"]})
    before = op_targets(gm)
    result = apply_pass(lower_linear_to_int8_gemm, gm, ctx)
    assert not result.modified and result.counters == {} and op_targets(gm) == before
