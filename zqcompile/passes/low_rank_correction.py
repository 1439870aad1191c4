"""low_rank_correction: LoRC (ZeroQuant-V2), a rank-r FP16 correction of each quantized weight's rounding error.

Matches ``y = aten.linear(x, W, b)`` with a quantized plan and a stored ``W`` (recipe ``lorc_rank: r``). The
rounding is the one ``quantize_weights`` will store (GPTQ's integers from ``ctx.rounded_weights``, else round to
nearest); its error against the floating-point weight (for GPTQ the weight before rounding) is
``E = W - dequant(W_q)``, and its truncated SVD ``E ~ (U_r S_r) V_r^T`` (rounding.low_rank_factors) is stored as
two FP16 buffers ``A = U_r S_r`` [N, r] and ``B = V_r^T`` [r, K]. Emits
``zq.low_rank_correction(y, x, A, B) = y + (x B^T) A^T`` after the linear, read by everything that read ``y``;
``insert_activation_quant`` later gives it the linear's own (dequantized INT8) input, so it corrects exactly
the product the integer GEMM computes, as in ZeroQuant-V2. A small separate GEMM pair, not fused into the
integer GEMM's kernel: on the GPU backend it runs the reference implementation (torch matmuls).

The linear's ``zq_rounding`` meta gets ``lorc rank r: weight error e0 -> e1`` (relative Frobenius norms of E and
of E minus its correction); ``inspect`` counts A and B in the layer's weight bytes. Refuses nothing; does
nothing when ``lorc_rank`` is null.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule

from zqcompile.passes.gptq_round_weights import layout_of
from zqcompile.passes.infra import (
    META_PLAN, META_ROUNDING, CompileContext, PassResult, get_attr_tensor, is_stored, linear_nodes, set_attr_tensor,
)
from zqcompile.quant import dequantize_weight_values
from zqcompile.rounding import low_rank_factors

LORC_DTYPE = torch.float16


def low_rank_correction(gm: GraphModule, ctx: CompileContext) -> PassResult:
    rank = ctx.recipe.lorc_rank
    if rank is None:
        return PassResult(gm, False)
    count = 0
    for linear in linear_nodes(gm):
        weight_node = linear.args[1]
        if not linear.meta[META_PLAN].quantized or not is_stored(weight_node):
            continue
        weight = get_attr_tensor(gm, weight_node)
        layout = layout_of(linear)
        rounded = ctx.rounded_weights.get(weight_node.target)
        if rounded is not None and rounded.layout == layout:
            source, grid = rounded.source, (rounded.q, rounded.scale, rounded.w_min)
        else:
            source, grid = weight, layout.quantize(weight)
        error = source.detach().float() - dequantize_weight_values(*grid)
        a, b = (f.to(LORC_DTYPE) for f in low_rank_factors(error, rank))
        base = f"{weight_node.target}_lorc{count}"
        set_attr_tensor(gm, f"{base}_a", a)
        set_attr_tensor(gm, f"{base}_b", b)
        with gm.graph.inserting_before(linear):
            a_node, b_node = gm.graph.get_attr(f"{base}_a"), gm.graph.get_attr(f"{base}_b")
        with gm.graph.inserting_after(linear):
            corrected = gm.graph.call_function(torch.ops.zq.low_rank_correction.default,
                                               (linear, linear.args[0], a_node, b_node))
        corrected.meta["val"] = linear.meta.get("val")
        linear.replace_all_uses_with(corrected, delete_user_cb=lambda user: user is not corrected)
        left = torch.linalg.matrix_norm(error - a.float() @ b.float()) / torch.linalg.matrix_norm(source.float())
        before = torch.linalg.matrix_norm(error) / torch.linalg.matrix_norm(source.float())
        note = f"lorc rank {a.shape[1]}: weight error {before:.2e} -> {left:.2e}"
        linear.meta[META_ROUNDING] = f"{linear.meta.get(META_ROUNDING, 'rtn')}; {note}"
        count += 1
    return PassResult(gm, count > 0, Counter({"lorc.corrected": count}))
