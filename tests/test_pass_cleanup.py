"""cleanup: dead nodes and the tensors only they referenced are removed; live graphs are left as they are."""

from __future__ import annotations

import torch
from torch import nn

from helpers import apply_pass, export_graph, op_targets, prepare_for
from zqcompile.passes import cleanup


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_removes_dead_nodes_and_unreferenced_tensors():
    gm, ctx = prepare_for(cleanup, export_graph(TwoLayers(), torch.randn(2, 16)))
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = gm(x)
    # a dead branch that references its own tensor: what a pass leaves when it rewires readers away
    gm.register_buffer("stale_weight", torch.randn(16, 16))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        stale = gm.graph.get_attr("stale_weight")
        gm.graph.call_function(torch.ops.aten.mm.default, (stale, stale))
    gm.recompile()
    result = apply_pass(cleanup, gm, ctx)
    assert result.modified and result.counters == {"cleanup.removed_nodes": 2}
    assert not hasattr(gm, "stale_weight")
    assert "aten.mm.default" not in op_targets(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected, rtol=0, atol=0)


def test_live_graph_is_unchanged():
    gm, ctx = prepare_for(cleanup, export_graph(TwoLayers(), torch.randn(2, 16)))
    before, buffers = op_targets(gm), {k for k, _ in gm.named_buffers()}
    result = apply_pass(cleanup, gm, ctx)
    assert not result.modified and result.counters == {}
    assert op_targets(gm) == before and {k for k, _ in gm.named_buffers()} == buffers
