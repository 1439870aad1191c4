"""fuse_sibling_linears: q/k/v-style siblings become one GEMM + split, exactly; other linears stay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zqcompile

from helpers import TINY_MODELS, apply_pass, count_ops, export_graph, op_targets
from zqcompile.passes import fuse_sibling_linears
from zqcompile.passes.fuse_sibling_linears import META_FUSED_FROM
from zqcompile.passes.infra import attr_tensor, get_attr_tensor
from zqcompile.pipeline import run_pipeline, run_target_phases
from zqcompile.recipe import load_recipe

INT8_LINEAR = torch.ops.zq.int8_linear.default
SPLIT = torch.ops.aten.split_with_sizes.default


class Heads(nn.Module):
    """Three projections of one LayerNorm output, each reshaped into heads (the attention pattern), and a
    fourth linear of the same input whose output feeds an add (must stay separate)."""

    def __init__(self, with_extra: bool):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 16)
        self.extra = nn.Linear(32, 32) if with_extra else None

    def forward(self, x):
        h = self.norm(x)
        b, s, _ = x.shape
        out = (self.q(h).view(b, s, 4, 8).sum(-1), self.k(h).view(b, s, 4, 8).sum(-1), self.v(h).view(b, s, 2, 8))
        return out + ((self.extra(h) + x,) if self.extra is not None else ())


INT4_LINEAR = torch.ops.zq.int4_linear.default
INT4_GROUPED = {"base": "w8a8", "weight_bits": 4, "input_group_size": 16}  # packed INT4, two scale groups along K
INT4_ASYM = {**INT4_GROUPED, "weight_symmetric": False}  # and a min per group, concatenated like the scales


def _lowered(module: nn.Module, recipe="w8a8"):
    x = torch.randn(2, 5, 32)
    result = run_pipeline(export_graph(module, x), load_recipe(recipe))  # target "cpu": no sibling fusion yet
    gm, ctx = result.compiled, result.context
    return gm, ctx, x


@pytest.mark.parametrize("recipe,gemm", [("w8a8", INT8_LINEAR), (INT4_GROUPED, INT4_LINEAR), (INT4_ASYM, INT4_LINEAR)])
def test_fuses_reshaped_siblings_into_one_exact_gemm(recipe, gemm):
    gm, ctx, x = _lowered(Heads(with_extra=True), recipe)
    assert count_ops(gm, gemm) == 4
    with torch.no_grad():
        expected = gm(x)
        result = apply_pass(fuse_sibling_linears, gm, ctx)
        got = gm(x)
    assert result.counters == {"fuse_sibling_linears.fused_gemms": 1, "fuse_sibling_linears.linears": 3}
    assert count_ops(gm, gemm) == 2 and count_ops(gm, SPLIT) == 1  # q+k+v fused; extra feeds an add
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # every output column computes exactly as before
    fused = next(n for n in gm.graph.nodes if META_FUSED_FROM in n.meta)
    assert [end - start for _, start, end in fused.meta[META_FUSED_FROM]["weight"]] == [32, 32, 16]
    assert get_attr_tensor(gm, fused.args[2]).shape[0] == 80  # [80, 32] int8 or [80, 16] packed INT4
    assert ("w_min" in fused.meta[META_FUSED_FROM]) == (recipe is INT4_ASYM)


def test_single_linear_and_mismatched_layouts_are_left_alone():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(32)
            self.a, self.b = nn.Linear(32, 8), nn.Linear(32, 8, bias=False)  # bias presence differs

        def forward(self, x):
            h = self.norm(x)
            return self.a(h).view(-1, 8), self.b(h).view(-1, 8)

    for module in (Mixed(), nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 8))):
        gm, ctx, x = _lowered(module)
        before = op_targets(gm)
        result = apply_pass(fuse_sibling_linears, gm, ctx)
        assert not result.modified and op_targets(gm) == before


def test_cuda_rewrite_of_a_tiny_bert_is_exact_and_shares_the_weights():
    # the cuda target's phases are device-agnostic graph work: run them on the CPU graph, compare with the reference
    model = TINY_MODELS["bert"]()
    qmodel = zqcompile.compile(model, "w8a8")
    gm, ctx = qmodel.graph_module, qmodel.context
    ids = torch.randint(0, 100, (2, 12))
    inputs = qmodel.graph_inputs(ids, torch.ones_like(ids))
    with torch.no_grad():
        expected = gm(*inputs)
        executed = run_target_phases(gm, ctx, "cuda")
        got = executed(*inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    layers = model.config.num_hidden_layers
    assert ctx.counters["fuse_sibling_linears.fused_gemms"] == layers
    assert ctx.counters["additive_attention_mask.masks"] == 1 and ctx.counters["additive_attention_mask.sdpa"] == layers
    assert count_ops(executed, INT8_LINEAR) == count_ops(gm, INT8_LINEAR) - 2 * layers  # q+k+v -> one GEMM
    # the original graph's q/k/v weights are now views of the fused buffers: nothing is stored twice
    fused = next(n for n in executed.graph.nodes if META_FUSED_FROM in n.meta)
    buffer = get_attr_tensor(executed, fused.args[2])
    for target, start, end in fused.meta[META_FUSED_FROM]["weight"]:
        part = attr_tensor(gm, target)
        assert part.data_ptr() == buffer[start:end].data_ptr() and torch.equal(part, buffer[start:end])
