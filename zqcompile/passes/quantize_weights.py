"""quantize_weights: replace each planned linear's FP weight by group-wise integer values + scales.

Matches ``aten.linear(x, W, b)`` whose plan quantizes the weight; emits ``zq.dequantize_weight(W_q, W_s)``
in place of ``W``, with ``W_q`` (int8, or INT4 packed two per uint8) and ``W_s`` (float32 [G_out, G_in])
stored as buffers of the GraphModule; an asymmetric INT4 plan also stores the group mins ``W_min`` (float32
[G_out, G_in]) and emits ``zq.dequantize_weight(W_q, W_s, dtype, W_min)``. Where a rounding pass chose the
integers (``ctx.rounded_weights``: GPTQ), for this layout, they are stored as they are; every other weight is
rounded to nearest. The FP weight is dropped once nothing reads it (a weight tied to an embedding stays). The graph still computes in floating point (simulated quantization) until lowering.
Refuses nothing: planning already rejected what cannot be quantized.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule

from zqcompile.passes.infra import (
    META_PLAN, META_WEIGHT_BYTES, CompileContext, PassResult, drop_if_unused, get_attr_tensor, linear_nodes,
    set_attr_tensor,
)
from zqcompile.quant import pack_int4
from zqcompile.rounding import Layout


def quantize_weights(gm: GraphModule, ctx: CompileContext) -> PassResult:
    stored: dict[tuple, tuple[str, ...]] = {}  # (weight target, layout) -> buffer names
    count = 0
    for node in linear_nodes(gm):
        plan = node.meta[META_PLAN]
        if not plan.quantized:
            continue
        weight_node = node.args[1]
        weight = get_attr_tensor(gm, weight_node)
        layout = Layout(plan.weight_bits, plan.group_size, plan.input_group_size, plan.weight_symmetric)
        key = (weight_node.target, layout)
        if key not in stored:
            rounded = ctx.rounded_weights.pop(weight_node.target, None)  # consumed: frees its FP source
            if rounded is not None and rounded.layout == layout:
                q, scale, w_min = rounded.q, rounded.scale, rounded.w_min
            else:
                q, scale, w_min = layout.quantize(weight)
            base = f"{weight_node.target}_int{plan.weight_bits}_{len(stored)}"
            stored_q = pack_int4(q, q.shape[1] // scale.shape[1], layout.symmetric) if plan.weight_bits == 4 else q
            tensors = {base: stored_q, f"{base}_scale": scale}
            if w_min is not None:
                tensors[f"{base}_min"] = w_min
            for name, tensor in tensors.items():
                set_attr_tensor(gm, name, tensor)
            stored[key] = tuple(tensors)
        node.meta[META_WEIGHT_BYTES] = weight.numel() * weight.element_size()
        with gm.graph.inserting_before(node):
            w_q, w_s, *w_min_node = (gm.graph.get_attr(name) for name in stored[key])
            dequant = gm.graph.call_function(torch.ops.zq.dequantize_weight.default,
                                             (w_q, w_s, weight.dtype, *w_min_node))
        node.replace_input_with(weight_node, dequant)
        drop_if_unused(gm, weight_node)
        count += 1
    return PassResult(gm, count > 0, Counter({"quantize_weights": count}))
