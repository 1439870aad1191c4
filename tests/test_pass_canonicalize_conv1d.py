"""canonicalize_conv1d: GPT-2's Conv1D (view -> addmm(b, x, W[K, N]) -> view) becomes aten.linear."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from helpers import apply_pass, count_ops, export_graph, op_targets, prepare_for
from zqcompile.passes import canonicalize_conv1d
from zqcompile.passes.infra import LINEAR, get_attr_tensor

ADDMM = torch.ops.aten.addmm.default


class TwoConv1D(nn.Module):
    """GPT-2's attention projections: c_attn (16 -> 48) then c_proj (48 -> 16)."""

    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = Conv1D(48, 16), Conv1D(16, 48)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_attn(x)))


def test_rewrites_conv1d_to_linear_with_transposed_weight():
    model = TwoConv1D()
    gm, ctx = prepare_for(canonicalize_conv1d, export_graph(model, torch.randn(2, 5, 16)))
    assert count_ops(gm, ADDMM) == 2
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        expected = model(x)
        result = apply_pass(canonicalize_conv1d, gm, ctx)
        assert result.modified and result.counters == {"canonicalize_conv1d": 2}
        assert count_ops(gm, ADDMM) == 0 and count_ops(gm, LINEAR) == 2
        assert count_ops(gm, torch.ops.aten.view.default) == 0  # the flatten/unflatten views are gone
        torch.testing.assert_close(gm(x), expected, rtol=1e-6, atol=1e-6)
    linear = next(n for n in gm.graph.nodes if n.target is LINEAR)
    weight = get_attr_tensor(gm, linear.args[1])
    assert weight.shape == (48, 16)
    assert torch.equal(weight, model.c_attn.weight.detach().t())
    assert linear.meta["val"].shape[-1] == 48  # shape metadata kept for later passes
    # the [K, N] originals are dropped: no FP weight is stored twice
    state = dict(gm.named_buffers()) | dict(gm.named_parameters())
    assert "model.c_attn.weight" not in state and "model.c_attn.weight_t" in state


class ComputedWeight(nn.Module):
    """addmm whose weight is computed at run time: not a Conv1D, must stay."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(8))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, 16), self.weight * 2).view(x.shape[0], x.shape[1], 8)


class SharedAddmm(nn.Module):
    """The 2-D addmm result is also read directly: rewriting would have to keep it anyway."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(8))

    def forward(self, x):
        flat = torch.addmm(self.bias, x.view(-1, 16), self.weight)
        return flat.view(x.shape[0], x.shape[1], 8), flat.sum()


def test_leaves_addmm_it_cannot_prove_is_conv1d():
    for module in (ComputedWeight(), SharedAddmm()):
        gm, ctx = prepare_for(canonicalize_conv1d, export_graph(module, torch.randn(2, 5, 16)))
        before = [t for t in op_targets(gm) if "view" not in t]
        result = apply_pass(canonicalize_conv1d, gm, ctx)
        assert not result.modified and result.counters == {}
        assert count_ops(gm, ADDMM) == 1 and count_ops(gm, LINEAR) == 0
        assert [t for t in op_targets(gm) if "view" not in t] == before
