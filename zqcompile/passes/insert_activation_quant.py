"""insert_activation_quant: token-wise dynamic INT8 quantization in front of every W*A8 linear.

Matches linears whose plan has ``act_bits == 8``, grouped by their input tensor; emits one
``q, s = zq.quantize_per_token(x)`` per input (q/k/v, or gate/up, share one) and feeds the linears
``zq.dequantize_per_token(q, s)`` instead of ``x`` (simulated quantization: the graph still runs, and
lowering later turns the pair into an INT8 GEMM). A LoRC ``zq.low_rank_correction`` of a linear's output reads
the same dequantized input as the linear. Refuses nothing; weight-only and FP linears are left alone.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
from torch.fx import GraphModule, Node

from zqcompile.passes.infra import META_PLAN, CompileContext, PassResult, getitem, is_op, linear_nodes, val_dtype


def insert_activation_quant(gm: GraphModule, ctx: CompileContext) -> PassResult:
    readers: dict[Node, list[Node]] = defaultdict(list)
    for node in linear_nodes(gm):
        if node.meta[META_PLAN].act_bits == 8:
            readers[node.args[0]].append(node)
    for x, linears in readers.items():
        with gm.graph.inserting_after(x):
            quant = gm.graph.call_function(torch.ops.zq.quantize_per_token.default, (x,))
        with gm.graph.inserting_after(quant):
            q = getitem(gm.graph, quant, 0)
        with gm.graph.inserting_after(q):
            s = getitem(gm.graph, quant, 1)
        with gm.graph.inserting_after(s):
            dequant = gm.graph.call_function(torch.ops.zq.dequantize_per_token.default, (q, s, val_dtype(x)))
        for linear in linears:
            linear.replace_input_with(x, dequant)
            for correction in [u for u in linear.users if is_op(u, torch.ops.zq.low_rank_correction.default)]:
                correction.replace_input_with(x, dequant)
    return PassResult(gm, bool(readers), Counter({"insert_activation_quant": len(readers)}))
