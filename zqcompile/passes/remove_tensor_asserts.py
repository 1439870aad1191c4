"""remove_tensor_asserts: drop ``aten._assert_tensor_metadata`` nodes.

Matches the dtype/device assertions export places before every ``.to()``; emits nothing. They are extra
users of the values the fusion rules must own alone (Llama's RMSNorm chain), and the compiled model
runs on the dtype and device it was captured with, which these assertions only re-check. Never refuses.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule

from zqcompile.passes.infra import CompileContext, PassResult, is_op


def remove_tensor_asserts(gm: GraphModule, ctx: CompileContext) -> PassResult:
    removed = 0
    for node in list(gm.graph.nodes):
        if is_op(node, torch.ops.aten._assert_tensor_metadata.default):
            gm.graph.erase_node(node)
            removed += 1
    return PassResult(gm, removed > 0, Counter({"remove_tensor_asserts": removed}))
