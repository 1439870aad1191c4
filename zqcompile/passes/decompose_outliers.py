"""decompose_outliers: LLM.int8()'s mixed-precision decomposition (recipe ``outlier_threshold``).

LLM.int8() (Dettmers et al., 2022) keeps the few input feature columns with magnitudes above a threshold (6.0)
in 16-bit floating point and runs the rest as INT8 x INT8. Here the outlier columns are chosen once, at compile
time: the per-channel absmax of each linear's input over ``ctx.calibration_inputs`` (the original finds them per
batch at run time; a fixed set keeps the graph's shapes static for the kernels and CUDA graphs).

Matches ``aten.linear(x, W, b)`` planned W8A8 / W4A8 (``act_bits == 8``) with a stored ``W`` whose input has at
least one channel above the threshold. Emits ``zq.outlier_int8_linear(x, W_q, W_s, columns, W_outlier, b)``: the
outlier columns of ``W`` copied to FP16 (``W_outlier`` [N, C]), the other columns quantized to the plan's
INT8 / INT4 groups with the outlier columns zeroed (so they do not set the scales), and the activation's
per-token INT8 scale computed without the outlier columns (the op quantizes ``x`` itself: no fusion with the
elementwise op before it). The linear is no longer an ``aten.linear``: later rounding passes (GPTQ, AWQ, LoRC)
leave it as it is. ``zq_rounding`` meta: ``llm.int8: C outlier columns in FP16``. ONNX export refuses the op.
Does nothing when ``outlier_threshold`` is null; raises ZQError without calibration inputs.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule

from zqcompile.errors import ZQError
from zqcompile.passes.calibration import channel_absmax
from zqcompile.passes.infra import (
    META_PLAN, META_ROUNDING, META_WEIGHT_BYTES, CompileContext, PassResult, drop_if_unused, get_attr_tensor,
    is_stored, linear_nodes, set_attr_tensor, val_dtype,
)
from zqcompile.quant import pack_int4, quantize_weight


def decompose_outliers(gm: GraphModule, ctx: CompileContext) -> PassResult:
    threshold = ctx.recipe.outlier_threshold
    if threshold is None:
        return PassResult(gm, False)
    if not ctx.calibration_inputs:
        raise ZQError(f"recipe {ctx.recipe.name!r} sets outlier_threshold, which needs calibration inputs; "
                      f"zqcompile.compile makes them (or pass calibration_data=)")
    linears = [n for n in linear_nodes(gm) if n.meta[META_PLAN].act_bits == 8 and is_stored(n.args[1])]
    absmax: dict[str, torch.Tensor] = {}
    channel_absmax(gm, {n.args[0].name for n in linears}, ctx.calibration_inputs, absmax)
    count = 0
    for index, linear in enumerate(linears):
        columns = torch.nonzero(absmax[linear.args[0].name] > threshold).flatten()
        if columns.numel() == 0:
            continue
        x, weight_node, bias = (list(linear.args) + [None])[:3]
        weight = get_attr_tensor(gm, weight_node)
        plan = linear.meta[META_PLAN]
        q, scale, _ = quantize_weight(weight.index_fill(1, columns.to(weight.device), 0), plan.weight_bits,
                                      plan.group_size, plan.input_group_size)  # symmetric: the recipe checked
        base = f"{weight_node.target}_int8_outliers{index}"
        tensors = {"w": pack_int4(q, q.shape[1] // scale.shape[1]) if plan.weight_bits == 4 else q, "scale": scale,
                   "columns": columns.to(weight.device), "w_outlier": weight[:, columns].detach().to(torch.float16)}
        with gm.graph.inserting_before(linear):
            stored = []
            for name, tensor in tensors.items():
                set_attr_tensor(gm, f"{base}_{name}", tensor)
                stored.append(gm.graph.get_attr(f"{base}_{name}"))
            fused = gm.graph.call_function(torch.ops.zq.outlier_int8_linear.default,
                                           (x, *stored, bias, val_dtype(linear)))
        fused.meta = dict(linear.meta)
        fused.meta[META_WEIGHT_BYTES] = weight.numel() * weight.element_size()
        fused.meta[META_ROUNDING] = f"llm.int8: {columns.numel()} outlier columns in FP16"
        linear.replace_all_uses_with(fused)
        gm.graph.erase_node(linear)
        drop_if_unused(gm, weight_node)
        count += 1
    return PassResult(gm, count > 0, Counter({"llm_int8.decomposed": count}))
