"""cleanup: remove dead nodes and the tensors only they referenced.

Matches nodes without users and without side effects, and GraphModule attributes no get_attr node
names any more; emits nothing. Never refuses. Run last so the final graph holds no stale FP weights.
"""

from __future__ import annotations

from collections import Counter

from torch.fx import GraphModule

from zqcompile.passes.infra import CompileContext, PassResult, delete_attr, is_stored


def _attr_targets(gm: GraphModule) -> set[str]:
    return {n.target for n in gm.graph.nodes if is_stored(n)}


def cleanup(gm: GraphModule, ctx: CompileContext) -> PassResult:
    before = len(gm.graph.nodes)
    referenced = _attr_targets(gm)
    gm.graph.eliminate_dead_code()  # removes unread get_attr nodes too, so compare the names before and after
    for target in referenced - _attr_targets(gm):
        delete_attr(gm, target)
    removed = before - len(gm.graph.nodes)
    return PassResult(gm, removed > 0, Counter({"cleanup.removed_nodes": removed}))
