"""remove_dropout: eval-mode dropout nodes go, training-mode dropout stays."""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import Graph, GraphModule

from helpers import apply_pass, count_ops, export_graph, op_targets, prepare_for
from zqcompile.passes import remove_dropout

DROPOUT = torch.ops.aten.dropout.default


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.drop = nn.Linear(16, 32), nn.Linear(32, 8), nn.Dropout(0.3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(self.drop(x)))))


def test_removes_eval_mode_dropout_and_keeps_outputs():
    gm, ctx = prepare_for(remove_dropout, export_graph(DropoutMLP(), torch.randn(2, 16)))
    assert count_ops(gm, DROPOUT) == 2
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = gm(x)
        result = apply_pass(remove_dropout, gm, ctx)
        assert result.modified and result.counters == {"remove_dropout": 2}
        assert count_ops(gm, DROPOUT) == 0
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def _training_dropout_graph() -> GraphModule:
    """y = dropout(x, 0.5, train=True) + 1, built by hand (export in eval mode never emits train=True)."""
    graph = Graph()
    x = graph.placeholder("x")
    dropped = graph.call_function(DROPOUT, (x, 0.5, True))
    graph.output(graph.call_function(torch.ops.aten.add.Tensor, (dropped, 1.0)))
    return GraphModule(nn.Module(), graph)


def test_keeps_training_mode_dropout():
    gm = _training_dropout_graph()
    before = op_targets(gm)
    result = apply_pass(remove_dropout, gm, None)
    assert not result.modified and result.counters == {}
    assert op_targets(gm) == before


def test_graph_without_dropout_is_unchanged():
    class NoDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.full((4,), 2.0))

        def forward(self, x):
            return torch.tanh(x) * self.scale

    gm = export_graph(NoDropout(), torch.randn(2, 4))
    before = op_targets(gm)
    result = apply_pass(remove_dropout, gm, None)
    assert not result.modified and op_targets(gm) == before
