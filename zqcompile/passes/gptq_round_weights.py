"""gptq_round_weights: GPTQ chooses the integers of every quantized linear's weight (recipe ``weight_rounding: gptq``).

Matches ``aten.linear(x, W, b)`` with a quantized plan and a stored ``W`` that nothing else reads. Runs the graph
node by node on ``ctx.calibration_inputs`` (calibration.run_node_major); at each input ``x`` of such linears it
builds one Hessian ``H = sum_t x_t^T x_t`` over all calibration tokens (q/k/v, or gate/up, share it; only one is
alive at a time) and rounds each reader's weight with GPTQ to the reader's plan (INT8 or INT4, its output-row and
input-dim groups), before the readers run: later layers calibrate on the rounded layers' outputs (GPTQ's
sequential mode). The activations the Hessian sees are the floating-point ones. Each weight is rounded in both
column orders, natural order with each group's grid taken as the sweep reaches it and act-order (descending
``diag(H)``) with static group grids, and the one with the lower relative output error on the calibration data
is kept (rounding.gptq_best_order, which says why neither order is always better); the groups, and so the stored
layout and the kernels, are the same either way.

Emits, per rounded linear, a new buffer ``<W>_gptq`` with the dequantized rounded weight in place of ``W`` (the
graph computes with it from here on) and ``ctx.rounded_weights[<W>_gptq]``: the integers and scales, which
``quantize_weights`` stores as they are (recomputing absmax scales from the dequantized values would not give
them back: GPTQ's error feedback can leave a group without a ``+-qmax`` value). The linear's ``zq_rounding``
meta records the order kept and the relative output error on the calibration data of round-to-nearest and of
both orders (``inspect``); counters ``gptq.rounded`` and ``gptq.act_order`` (the layers act-order won).
Leaves to round-to-nearest, with the reason in ``zq_rounding``, a weight another node also reads (tied).
Does nothing unless the recipe says ``gptq``; raises ZQError without calibration inputs.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.fx import GraphModule, Node

from zqcompile.errors import ZQError
from zqcompile.passes.calibration import Batches, run_node_major
from zqcompile.passes.infra import (
    LINEAR, META_PLAN, META_ROUNDING, CompileContext, PassResult, get_attr_tensor, is_op, is_stored, replace_stored,
)
from zqcompile.quant import dequantize_weight_values
from zqcompile.rounding import Layout, RoundedWeight, gptq_best_order, output_error


def layout_of(linear: Node) -> Layout:
    plan = linear.meta[META_PLAN]
    return Layout(plan.weight_bits, plan.group_size, plan.input_group_size, plan.weight_symmetric)


def quantized_readers(gm: GraphModule, x: Node) -> list[Node]:
    """The linears reading ``x`` whose plan quantizes a stored weight."""
    return [r for r in x.users if is_op(r, LINEAR) and r.args[0] is x and r.meta[META_PLAN].quantized
            and is_stored(r.args[1])]


def shared_weight(gm: GraphModule, weight: Node) -> bool:
    """Whether another node reads this stored weight too (a tied table): it cannot be rewritten for one reader."""
    return len(weight.users) > 1 or sum(is_stored(n) and n.target == weight.target for n in gm.graph.nodes) > 1


def _hessian(values: list[torch.Tensor]) -> torch.Tensor:
    k = values[0].shape[-1]
    h = torch.zeros(k, k, dtype=torch.float64, device=values[0].device)
    for value in values:
        rows = value.detach().reshape(-1, k).double()
        h += rows.T @ rows
    return h


def gptq_round_weights(gm: GraphModule, ctx: CompileContext) -> PassResult:
    if ctx.recipe.weight_rounding != "gptq":
        return PassResult(gm, False)
    if not ctx.calibration_inputs:
        raise ZQError(f"recipe {ctx.recipe.name!r} sets weight_rounding: gptq, which needs calibration inputs; "
                      f"zqcompile.compile makes them (or pass calibration_data=)")
    counters: Counter = Counter()

    def visit(x: Node, envs: Batches) -> None:
        readers = quantized_readers(gm, x)
        if not readers:
            return
        hessian = _hessian([env[x] for env in envs])
        for linear in readers:
            weight_node = linear.args[1]
            weight = get_attr_tensor(gm, weight_node)
            layout = layout_of(linear)
            nearest = dequantize_weight_values(*layout.quantize(weight))
            if shared_weight(gm, weight_node):
                linear.meta[META_ROUNDING] = "rtn (gptq skipped: the weight is shared with another reader)"
                counters["gptq.skipped_shared"] += 1
                continue
            order, (q, scale, w_min), errors = gptq_best_order(weight, hessian, layout)
            rounded = dequantize_weight_values(q, scale, w_min).to(weight.dtype)
            linear.meta[META_ROUNDING] = (f"gptq {order}: output error {output_error(weight, nearest, hessian):.2e} "
                                          f"(rtn) -> {errors['natural']:.2e} (natural order), "
                                          f"{errors['act-order']:.2e} (act-order)")
            new = replace_stored(gm, linear, weight_node, rounded, "gptq")
            ctx.rounded_weights[new.target] = RoundedWeight(q, scale, w_min, layout, weight)
            for env in envs:  # the readers run after this node: give them the rounded weight
                env.pop(weight_node, None)
                env[new] = rounded
            counters["gptq.rounded"] += 1
            counters["gptq.act_order"] += order == "act-order"

    run_node_major(gm, ctx.calibration_inputs, visit)
    return PassResult(gm, bool(counters["gptq.rounded"]), counters)
