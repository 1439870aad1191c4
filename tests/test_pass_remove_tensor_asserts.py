"""remove_tensor_asserts: export's ``_assert_tensor_metadata`` nodes are dropped, nothing else."""

from __future__ import annotations

import torch
from torch import nn

from helpers import apply_pass, count_ops, export_graph, op_targets
from zqcompile.passes import remove_tensor_asserts

ASSERT = torch.ops.aten._assert_tensor_metadata.default


class Casts(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return (x.to(torch.float16) * 3).to(torch.float32) + self.bias


def test_removes_every_assert_and_keeps_the_casts():
    gm = export_graph(Casts(), torch.randn(2, 8))
    asserts = count_ops(gm, ASSERT)
    assert asserts >= 2  # one before each .to()
    casts = count_ops(gm, torch.ops.aten.to.dtype)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = gm(x)
        result = apply_pass(remove_tensor_asserts, gm, None)
        assert result.modified and result.counters == {"remove_tensor_asserts": asserts}
        assert count_ops(gm, ASSERT) == 0 and count_ops(gm, torch.ops.aten.to.dtype) == casts
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_graph_without_asserts_is_unchanged():
    class NoCasts(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return torch.relu(x) - self.bias

    gm = export_graph(NoCasts(), torch.randn(2, 8))
    before = op_targets(gm)
    result = apply_pass(remove_tensor_asserts, gm, None)
    assert not result.modified and result.counters == {} and op_targets(gm) == before
