"""canonicalize_conv1d: rewrite GPT-2's Conv1D into ``aten.linear``.

Matches ``view(addmm(bias, view(x, [-1, K]), W), [*x.shape[:-1], N])`` with ``W`` a stored ``[K, N]``
weight (transformers' ``Conv1D``). Emits ``linear(x, W.T, bias)`` with a new ``[N, K]`` weight attribute
(the old one is dropped when nothing else reads it), so every later pass sees one form of linear layer.
Refuses (leaves the nodes) when the weight is computed at run time, the flatten/unflatten views do not
restore ``x``'s leading dims, or the addmm result has other users.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule, Node

from zqcompile.passes.infra import (
    LINEAR, CompileContext, PassResult, drop_if_unused, get_attr_tensor, is_op, is_stored, set_attr_tensor,
)

ADDMM = torch.ops.aten.addmm.default
VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default)


def _shape_key(node: Node) -> list[str]:
    return [str(d) for d in node.meta["val"].shape]


def _match(addmm: Node) -> tuple[Node, Node, Node, Node] | None:
    """(x, weight get_attr, bias, outer view) or None."""
    bias, flat, weight = addmm.args[:3]
    if addmm.kwargs or not is_stored(weight):
        return None
    if not is_op(flat, *VIEWS) or len(addmm.users) != 1:
        return None
    outer = next(iter(addmm.users))
    x = flat.args[0]
    if not is_op(outer, *VIEWS) or not isinstance(x, Node) or "val" not in x.meta:
        return None
    if _shape_key(outer)[:-1] != _shape_key(x)[:-1]:
        return None
    return x, weight, bias, outer


def canonicalize_conv1d(gm: GraphModule, ctx: CompileContext) -> PassResult:
    rewritten = 0
    for addmm in [n for n in gm.graph.nodes if is_op(n, ADDMM)]:
        match = _match(addmm)
        if match is None:
            continue
        x, weight, bias, outer = match
        target = f"{weight.target}_t"
        set_attr_tensor(gm, target, get_attr_tensor(gm, weight).detach().t().contiguous())
        with gm.graph.inserting_before(addmm):
            new_weight = gm.graph.get_attr(target)
            linear = gm.graph.call_function(LINEAR, (x, new_weight, bias))
        linear.meta = {**addmm.meta, "val": outer.meta["val"]}
        outer.replace_all_uses_with(linear)
        for node in (outer, addmm):
            gm.graph.erase_node(node)
        drop_if_unused(gm, weight)
        rewritten += 1
    # the flattening views, which would count as extra readers in fusion (and any other dead node: a graph whose
    # nodes changed must say so, or its code is not regenerated)
    dead_removed = gm.graph.eliminate_dead_code()
    return PassResult(gm, rewritten > 0 or dead_removed, Counter({"canonicalize_conv1d": rewritten}))
