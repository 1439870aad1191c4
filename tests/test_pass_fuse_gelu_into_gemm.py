"""fuse_gelu_into_gemm: gelu_quant(int8_linear) -> quantize_per_token(int8_linear_gelu), same values."""

from __future__ import annotations

import torch
from torch import nn

from conftest import apply_pass, count_ops, export_graph, op_targets
from zqcompile.passes import fuse_gelu_into_gemm
from zqcompile.pipeline import run_pipeline
from zqcompile.recipe import load_recipe

zq = torch.ops.zq


class MLP(nn.Module):
    def __init__(self, approximate: str, second_reader: bool = False):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(64), nn.Linear(64, 128), nn.Linear(128, 64)
        self.approximate, self.second_reader = approximate, second_reader

    def forward(self, x):
        h = self.fc1(self.norm(x))
        y = self.fc2(nn.functional.gelu(h, approximate=self.approximate))
        return y + h[..., :64] if self.second_reader else y


def _compiled(module: nn.Module, recipe: str = "w8a8"):
    x = torch.randn(3, 7, 64)
    gm, _ = run_pipeline(export_graph(module, x), load_recipe(recipe))
    return gm, x


def test_gelu_moves_into_the_gemm_with_identical_outputs():
    for approximate in ("none", "tanh"):
        gm, x = _compiled(MLP(approximate))
        assert count_ops(gm, zq.gelu_quant.default) == 1
        with torch.no_grad():
            expected = gm(x)
            result = apply_pass(fuse_gelu_into_gemm, gm, None)
            got = gm(x)
        assert result.counters == {"fuse_gelu_into_gemm": 1}
        assert count_ops(gm, zq.gelu_quant.default) == 0 and count_ops(gm, zq.int8_linear_gelu.default) == 1
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_int8_linear_gelu_reference_is_gelu_of_the_rounded_gemm_output():
    g = torch.Generator().manual_seed(1)
    x_q = torch.randint(-127, 128, (5, 16), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (8, 16), generator=g, dtype=torch.int8)
    s_x, s_w, bias = torch.rand(5, 1, generator=g) / 50, torch.rand(8, 1, generator=g) / 50, torch.randn(8, generator=g)
    y = (x_q.double() @ w.double().T * s_x.double() * s_w.double().T + bias.double()).to(torch.bfloat16)
    expected = torch.nn.functional.gelu(y.double()).to(torch.bfloat16)  # float64 GELU, rounded once
    got = zq.int8_linear_gelu(x_q, s_x, w, s_w, bias.bfloat16(), torch.bfloat16, "none")
    assert got.dtype == torch.bfloat16
    # one bfloat16 rounding of y may differ (float32 vs float64 epilogue), which GELU passes on: two ulps
    assert torch.allclose(got.double(), expected.double(), rtol=2 ** -6, atol=2 ** -8)


def test_gemm_read_elsewhere_or_int4_is_left_alone():
    for module, recipe in ((MLP("none", second_reader=True), "w8a8"), (MLP("none"), "w4a8")):
        gm, _ = _compiled(module, recipe)
        before = op_targets(gm)
        result = apply_pass(fuse_gelu_into_gemm, gm, None)
        assert not result.modified and op_targets(gm) == before
