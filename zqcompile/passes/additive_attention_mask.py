"""additive_attention_mask: convert a boolean attention mask to an additive one once, not once per layer.

Matches ``aten.scaled_dot_product_attention`` nodes whose ``attn_mask`` is a boolean tensor (export keeps
the mask that Hugging Face builds once per forward and hands to every layer). SDPA turns a boolean mask into
an additive float mask on every call (a fill and a select kernel per layer on a GPU). Emits, once per
distinct mask, ``where(mask, 0, -inf)`` in the query's dtype, and passes that to every SDPA that read the
boolean mask: SDPA adds a float mask to the scores, and True (attend) / False (masked) become 0 / -inf, which
is what SDPA itself computes from the boolean mask.

Refuses SDPA nodes without a mask, with a float mask, or whose query or mask dtype export did not record.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule, Node

from zqcompile.passes.infra import CompileContext, PassResult, is_op
from zqcompile.passes.patterns import SDPA, sdpa_mask, set_sdpa_mask



def _bool_mask(node: Node) -> Node | None:
    mask = sdpa_mask(node)
    if not isinstance(mask, Node) or "val" not in mask.meta or "val" not in node.args[0].meta:
        return None
    return mask if mask.meta["val"].dtype == torch.bool else None


def additive_attention_mask(gm: GraphModule, ctx: CompileContext | None) -> PassResult:
    additive: dict[tuple[Node, torch.dtype], Node] = {}
    counts: Counter = Counter()
    for node in list(gm.graph.nodes):
        if not is_op(node, SDPA) or (mask := _bool_mask(node)) is None:
            continue
        dtype = node.args[0].meta["val"].dtype
        if (mask, dtype) not in additive:
            with gm.graph.inserting_after(mask):
                scores = gm.graph.call_function(torch.ops.aten.where.Scalar, (mask, 0.0, float("-inf")))
            with gm.graph.inserting_after(scores):
                additive[mask, dtype] = gm.graph.call_function(torch.ops.aten.to.dtype, (scores, dtype))
            counts["additive_attention_mask.masks"] += 1
        set_sdpa_mask(node, additive[mask, dtype])
        counts["additive_attention_mask.sdpa"] += 1
    return PassResult(gm, bool(counts), counts)
