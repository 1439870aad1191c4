"""cleanup: remove dead nodes and the tensors only they referenced.

Matches nodes without users and without side effects, and GraphModule attributes no get_attr node
names any more; emits nothing. Never refuses. Run last so the final graph holds no stale FP weights.
"""

from __future__ import annotations

from torch.fx import GraphModule

from zqcompile.passes.infra import CompileContext, PassResult, drop_if_unused


def cleanup(gm: GraphModule, ctx: CompileContext) -> PassResult:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        drop_if_unused(gm, node)
    removed = before - len(gm.graph.nodes)
    return PassResult(gm, removed > 0, {"cleanup.removed_nodes": removed} if removed else {})
