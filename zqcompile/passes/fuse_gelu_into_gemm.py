"""fuse_gelu_into_gemm: GELU moves from the activation-quant kernel into the INT8 GEMM's epilogue.

Matches ``zq.gelu_quant(zq.int8_linear(...), None, approximate)`` where the GEMM's output has no other user
(the MLP's first linear: its bias is already in the GEMM). Emits
``zq.quantize_per_token(zq.int8_linear_gelu(..., approximate))``: the GEMM applies GELU to its rounded
output before the one store (free next to the tensor-core work), and the quantization kernel that follows
no longer evaluates erf/tanh per element. The values are those of the unfused pair (``int8_linear_gelu``
is defined as GELU of the ``out_dtype`` GEMM result).

Refuses a ``gelu_quant`` with its own bias, one whose input is not an INT8 GEMM (INT4 GEMMs keep GELU in
the quantization kernel), or a GEMM whose output something else also reads.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule

from zqcompile.passes.infra import CompileContext, PassResult, is_op, single_user

zq = torch.ops.zq


def fuse_gelu_into_gemm(gm: GraphModule, ctx: CompileContext | None) -> PassResult:
    counts: Counter = Counter()
    for node in list(gm.graph.nodes):
        if not is_op(node, zq.gelu_quant.default):
            continue
        x, bias, approximate = node.args
        if bias is not None or not is_op(x, zq.int8_linear.default) or not single_user(x):
            continue
        with gm.graph.inserting_before(node):
            gemm = gm.graph.call_function(zq.int8_linear_gelu.default, (*x.args, approximate))
            gemm.meta = dict(x.meta)
            quantize = gm.graph.call_function(zq.quantize_per_token.default, (gemm,))
        quantize.meta = dict(node.meta)
        node.replace_all_uses_with(quantize)
        gm.graph.erase_node(node)
        gm.graph.erase_node(x)
        counts["fuse_gelu_into_gemm"] += 1
    return PassResult(gm, bool(counts), counts)
