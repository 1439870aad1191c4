"""remove_dropout: drop eval-mode ``aten.dropout`` nodes.

Matches ``aten.dropout(x, p, train=False)``, which export keeps in eval mode; emits nothing (users read ``x``
directly). Such nodes would otherwise sit between LayerNorm and Linear and block the fusion rules.
Refuses (leaves the node) when ``train=True``: that dropout is random, not an identity.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule

from zqcompile.passes.infra import CompileContext, PassResult, is_op


def remove_dropout(gm: GraphModule, ctx: CompileContext) -> PassResult:
    removed = 0
    for node in list(gm.graph.nodes):
        if is_op(node, torch.ops.aten.dropout.default) and not node.args[2]:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    return PassResult(gm, removed > 0, Counter({"remove_dropout": removed}))
