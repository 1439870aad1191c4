"""fuse_residual_rmsnorm: a pre-norm decoder's residual add and the RMSNorm after it as one op.

Unfused, the GPU runs each residual add as its own kernel (read x and residual, write h) and the norm reads h back.
Fused, one kernel reads x and residual once and writes h (the residual stream, which the next add reads) and the
norm's output. Two rules:

=================  ===========================================  ===============================================
rule               matches                                      emits
=================  ===========================================  ===============================================
add_rmsnorm_quant  ``zq.rmsnorm_quant(add(x, residual), w,      ``zq.add_rmsnorm_quant(x, residual, w, eps,
                   eps[, wf])`` whose normalised value (output  wf) -> (h, q, scale)``
                   0) nobody reads (what the fuse phase made
                   of Llama's or Gemma's norm before a
                   quantized linear)
add_rmsnorm        Llama's RMSNorm decomposition of ``add(x,    ``zq.add_rmsnorm(x, residual, w, eps) -> (h,
                   residual)`` (``patterns.match_rms_norm``;    y)``
                   not quantized: the final norm, read by the
                   floating-point LM head)
=================  ===========================================  ===============================================

The fused op takes the add's place; ``h`` replaces the sum for its other readers. The values are the same: h is
the add's tensor (x's dtype), the norm that of h (the ops' references are the unfused compositions).

Refuses (the reason is kept in ``ctx.target_skipped`` for ``inspect``) a quantized norm whose normalised value is
read (``add_rmsnorm_quant`` does not write it), an add that broadcasts or changes dtype (operands of other shapes or
dtypes than the sum, or an ``alpha``), and a norm weight computed after the add.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from zqcompile.passes.infra import CompileContext, PassResult, call_with_value, is_op
from zqcompile.passes.patterns import Miss, RMSNorm, Rule, apply_target_rules, match_rms_norm, same_shape

aten = torch.ops.aten
_RMSNORM_QUANT = torch.ops.zq.rmsnorm_quant.default


@dataclass(frozen=True)
class ResidualNorm:
    """``norm``: the node whose value is the norm of ``add`` = x + residual; ``op``: the fused op, which takes x,
    residual and ``norm_args``."""

    norm: Node
    add: Node
    op: object
    norm_args: tuple


def _dtype(node: Node) -> torch.dtype | None:
    return node.meta["val"].dtype if "val" in node.meta else None


def _residual_add(add: object, norm_args: tuple) -> Node | Miss | None:
    if not is_op(add, aten.add.Tensor):
        return None
    if len(add.args) != 2 or add.kwargs or not all(isinstance(a, Node) for a in add.args):
        return Miss("the residual add scales an operand (alpha) or adds a number")
    x, residual = add.args
    if not (same_shape(x, add) and same_shape(residual, add)) or len({_dtype(n) for n in (x, residual, add)}) != 1:
        return Miss("the residual add broadcasts or promotes (operands differ from the sum in shape or dtype)")
    order = {n: i for i, n in enumerate(add.graph.nodes)}
    if any(order[arg] > order[add] for arg in norm_args if isinstance(arg, Node)):
        return Miss("the RMSNorm's weight is computed after the residual add")
    return add


def add_rmsnorm_quant(node: Node) -> ResidualNorm | Miss | None:
    if not is_op(node, _RMSNORM_QUANT):
        return None
    add = _residual_add(node.args[0], node.args[1:])
    if not isinstance(add, Node):
        return add
    if any(user.target is not operator.getitem or (user.args[1] == 0 and user.users) for user in node.users):
        return Miss("the RMSNorm's normalised value is read, not only its quantization")
    return ResidualNorm(node, add, torch.ops.zq.add_rmsnorm_quant.default, tuple(node.args[1:]))


def add_rmsnorm(node: Node) -> ResidualNorm | Miss | None:
    norm = match_rms_norm(node)
    if not isinstance(norm, RMSNorm):
        return norm
    add = _residual_add(norm.input, (norm.weight,))
    if not isinstance(add, Node):
        return add
    return ResidualNorm(node, add, torch.ops.zq.add_rmsnorm.default, (norm.weight, norm.eps))


def _emit(gm: GraphModule, match: ResidualNorm) -> None:
    with gm.graph.inserting_before(match.add):  # the sum's readers may come before the norm
        fused = call_with_value(gm, match.op, *match.add.args, *match.norm_args)
        total = call_with_value(gm, operator.getitem, fused, 0)
    if is_op(match.norm, _RMSNORM_QUANT):
        for user in list(match.norm.users):  # getitem(norm, 1 | 2): the same positions in the fused op
            if user.args[1] == 0:  # unread
                gm.graph.erase_node(user)
            else:
                user.update_arg(0, fused)
        gm.graph.erase_node(match.norm)
    else:  # the decomposition's result is y; its nodes are left to cleanup's dead code elimination
        with gm.graph.inserting_after(total):
            normed = call_with_value(gm, operator.getitem, fused, 1)
        match.norm.replace_all_uses_with(normed)
    match.add.replace_all_uses_with(total)
    gm.graph.erase_node(match.add)


RULES = tuple(Rule(matcher.__name__, matcher, lambda gm, ctx, node, match: _emit(gm, match))
              for matcher in (add_rmsnorm_quant, add_rmsnorm))


def fuse_residual_rmsnorm(gm: GraphModule, ctx: CompileContext | None) -> PassResult:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    return apply_target_rules(gm, ctx, nodes, RULES, "fuse_residual_rmsnorm")
