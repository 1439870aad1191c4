"""fuse_add_rmsnorm_quant: a pre-norm decoder's residual add and the quantized RMSNorm after it as one op.

Matches ``zq.rmsnorm_quant(add(x, residual), weight, eps[, weight_first])`` (what ``fuse_quant_into_elementwise``
made of Llama's ``h = residual + out; rmsnorm(h)`` before a quantized linear, and of Gemma's ``(1 + w)`` norm)
whose normalised value (output 0) nobody reads: only its INT8 values and scales feed the next GEMM. The sum
``h`` is the residual stream, read again by the next residual add. Unfused, the GPU runs the add as its own
kernel (read x and residual, write h) and the norm reads h back; fused, one kernel reads x and residual once and
writes h and the INT8 row.

Emits ``zq.add_rmsnorm_quant(x, residual, weight, eps, weight_first) -> (h, q, scale)`` in place of the add;
``h`` replaces the sum for its other readers. The values are the same: h is the add's tensor (x's dtype), the norm
that of h (``ops.add_rmsnorm_quant`` is the unfused composition).

Refuses (the reason is kept in ``ctx.target_skipped`` for ``inspect``) a norm whose normalised value is read
(the fused op does not write it), an add that broadcasts or changes dtype (operands of other shapes or dtypes
than the sum, or an ``alpha``), and a norm weight computed after the add (the fused op is placed at the add).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from zqcompile.passes.infra import CompileContext, PassResult, call_with_value, is_op
from zqcompile.passes.patterns import Miss, Rule, apply_rules, same_shape

aten = torch.ops.aten
_RMSNORM_QUANT = torch.ops.zq.rmsnorm_quant.default
_ADD_RMSNORM_QUANT = torch.ops.zq.add_rmsnorm_quant.default


@dataclass(frozen=True)
class AddRMSNorm:
    """``norm`` = rmsnorm_quant(``add`` = x + residual, *``norm_args``)."""

    norm: Node
    add: Node
    x: Node
    residual: Node
    norm_args: tuple


def _dtype(node: Node) -> torch.dtype | None:
    return node.meta["val"].dtype if "val" in node.meta else None


def match_add_rmsnorm(norm: Node) -> AddRMSNorm | Miss | None:
    if not is_op(norm, _RMSNORM_QUANT) or not is_op(norm.args[0], aten.add.Tensor):
        return None
    add = norm.args[0]
    if len(add.args) != 2 or add.kwargs or not all(isinstance(a, Node) for a in add.args):
        return Miss("the residual add scales an operand (alpha) or adds a number")
    x, residual = add.args
    if not (same_shape(x, add) and same_shape(residual, add)) or len({_dtype(n) for n in (x, residual, add)}) != 1:
        return Miss("the residual add broadcasts or promotes (operands differ from the sum in shape or dtype)")
    if any(user.target is not operator.getitem or (user.args[1] == 0 and user.users) for user in norm.users):
        return Miss("the RMSNorm's normalised value is read, not only its quantization")
    order = {n: i for i, n in enumerate(norm.graph.nodes)}
    if any(order[arg] > order[add] for arg in norm.args[1:] if isinstance(arg, Node)):
        return Miss("the RMSNorm's weight is computed after the residual add")
    return AddRMSNorm(norm, add, x, residual, tuple(norm.args[1:]))


def _emit(gm: GraphModule, match: AddRMSNorm) -> None:
    with gm.graph.inserting_before(match.add):  # the sum's readers may come before the norm
        fused = call_with_value(gm, _ADD_RMSNORM_QUANT, match.x, match.residual, *match.norm_args)
        total = call_with_value(gm, operator.getitem, fused, 0)
    for user in list(match.norm.users):  # getitem(norm, 1 | 2): the same positions in the fused op
        if user.args[1] == 0:  # unread
            gm.graph.erase_node(user)
        else:
            user.update_arg(0, fused)
    match.add.replace_all_uses_with(total)
    gm.graph.erase_node(match.norm)
    gm.graph.erase_node(match.add)


RULES = (Rule("add_rmsnorm", match_add_rmsnorm, lambda gm, ctx, node, match: _emit(gm, match)),)


def fuse_add_rmsnorm_quant(gm: GraphModule, ctx: CompileContext | None) -> PassResult:
    norms = [n for n in gm.graph.nodes if is_op(n, _RMSNORM_QUANT)]
    applied = apply_rules(gm, ctx, norms, RULES, "fuse_add_rmsnorm_quant", uncovered=lambda node: "")
    if ctx is not None:
        ctx.target_skipped.update({name: f"fuse_add_rmsnorm_quant: {why}" for name, why in applied.misses.items()
                                   if why})
    return PassResult(gm, bool(applied.counters), applied.counters)
