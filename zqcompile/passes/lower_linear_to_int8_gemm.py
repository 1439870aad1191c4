"""lower_linear_to_int8_gemm: turn simulated-quantization linears into integer GEMM ops.

Matches
- ``linear(dequantize_per_token(q, s), dequantize_weight(W_q, W_s), b)`` and emits
  ``zq.int8_linear(q, s, W_q, W_s, b)`` (int8 ``W_q``) or ``zq.int4_linear`` (packed uint8 ``W_q``): INT32
  accumulation with the dequantization ``acc * s[token] * W_s[col]`` (+ bias) in the GEMM epilogue;
- ``linear(x, dequantize_weight(W_q, W_s), b)`` and emits ``zq.weight_only_linear(x, W_q, W_s, b)``.
An asymmetric INT4 weight's mins (``dequantize_weight``'s last argument) become the GEMM's last argument.
Refuses (leaves the linear as it is) anything else, e.g. FP linears the recipe keeps.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule

from zqcompile.passes.infra import CompileContext, PassResult, get_attr_tensor, is_op, linear_nodes, val_dtype

zq = torch.ops.zq


def lower_linear_to_int8_gemm(gm: GraphModule, ctx: CompileContext) -> PassResult:
    counts: Counter = Counter()
    for linear in linear_nodes(gm):
        x, weight, bias = (list(linear.args) + [None])[:3]
        if not is_op(weight, zq.dequantize_weight.default):
            continue
        w_q, w_s, _, *w_min = weight.args
        if is_op(x, zq.dequantize_per_token.default):
            integer_op = zq.int4_linear if get_attr_tensor(gm, w_q).dtype == torch.uint8 else zq.int8_linear
            target, args = integer_op.default, (x.args[0], x.args[1], w_q, w_s, bias, val_dtype(linear), *w_min)
        else:
            target, args = zq.weight_only_linear.default, (x, w_q, w_s, bias, *w_min)
        with gm.graph.inserting_before(linear):
            lowered = gm.graph.call_function(target, args)
        lowered.meta = dict(linear.meta)
        linear.replace_all_uses_with(lowered)
        gm.graph.erase_node(linear)
        counts[f"lower.{target.__name__.split('.')[0]}"] += 1
    dead_removed = gm.graph.eliminate_dead_code()
    return PassResult(gm, bool(counts) or dead_removed, counts)
