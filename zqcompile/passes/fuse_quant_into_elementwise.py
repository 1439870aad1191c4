"""fuse_quant_into_elementwise: fold token-wise quantization into the elementwise op that feeds it.

Matches ``zq.quantize_per_token(x)`` where ``x`` comes from one of the rules below, first match wins:

=================  ================================================  ================================
rule               producer of x                                     emits
=================  ================================================  ================================
add_layernorm      ``layer_norm(a + b)`` (post-LN residual block)    ``zq.add_layernorm_quant(a, b)``
layernorm          ``layer_norm(h)``                                 ``zq.layernorm_quant(h)``
rmsnorm            Llama's RMSNorm decomposition                     ``zq.rmsnorm_quant(h, w)``
gelu               ``gelu(h [+ bias])`` (erf or tanh)                ``zq.gelu_quant(h, bias)``
gelu_tanh_decomp   GPT-2's ``gelu_new`` written out in aten ops      ``zq.gelu_quant(h, None, 'tanh')``
silu_mul           ``silu(g) * u`` (SwiGLU)                          ``zq.silu_mul_quant(g, u)``
=================  ================================================  ================================

This is ZeroQuant's kernel fusion: the quantization costs no extra pass over memory. Norm rules also emit
the FP result for the other readers (a residual); the activation rules require the quant to be the only
reader. A quant node that no rule takes stays a standalone ``quantize_per_token``; why is recorded in
``ctx.unfused_reasons`` for ``inspect``. Each hit bumps the counter ``fuse.<rule>``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule, Node

from zqcompile.passes.infra import META_FUSED_INTO, CompileContext, PassResult, getitem, is_op, single_user

aten = torch.ops.aten
zq = torch.ops.zq
QUANTIZE = zq.quantize_per_token.default


@dataclass
class Fusion:
    """A matched rule: call ``op(*args)``; its outputs at ``quant_outputs`` are (q, scale); when
    ``fp_output`` is set, that output replaces the producer for its other readers."""

    op: Callable
    args: tuple
    quant_outputs: tuple[int, int]
    fp_output: int | None


NORM_OUTPUTS = {"quant_outputs": (1, 2), "fp_output": 0}
ACT_OUTPUTS = {"quant_outputs": (0, 1), "fp_output": None}
# A rule returns a Fusion, a reason it recognised the producer but cannot fuse, or None (not its kind).
Rule = Callable[[Node], "Fusion | str | None"]


def _same_shape(a: object, b: object) -> bool:
    return (isinstance(a, Node) and isinstance(b, Node) and "val" in a.meta and "val" in b.meta
            and [str(d) for d in a.meta["val"].shape] == [str(d) for d in b.meta["val"].shape])


def _layer_norm_parts(x: Node) -> tuple[Node, tuple] | str | None:
    if not is_op(x, aten.layer_norm.default):
        return None
    inp, shape, weight, bias, eps = (list(x.args) + [None, None, 1e-5])[:5]
    if len(shape) != 1:
        return f"LayerNorm over {len(shape)} dims (only the last dim is supported)"
    return inp, (weight, bias, eps)


def add_layernorm(x: Node) -> Fusion | str | None:
    parts = _layer_norm_parts(x)
    if not isinstance(parts, tuple):
        return None
    inp, (weight, bias, eps) = parts
    if not is_op(inp, aten.add.Tensor) or len(inp.args) != 2 or inp.kwargs:
        return None
    a, b = inp.args
    if not single_user(inp):
        return "the residual sum before LayerNorm is also read elsewhere"
    if not _same_shape(a, b):
        return "the residual add broadcasts (operands differ in shape)"
    return Fusion(zq.add_layernorm_quant.default, (a, b, weight, bias, eps), **NORM_OUTPUTS)


def layernorm(x: Node) -> Fusion | str | None:
    parts = _layer_norm_parts(x)
    if not isinstance(parts, tuple):
        return parts
    inp, (weight, bias, eps) = parts
    return Fusion(zq.layernorm_quant.default, (inp, weight, bias, eps), **NORM_OUTPUTS)


def _operand(node: Node, target: object, predicate: Callable[[object], bool]) -> tuple[object, object] | None:
    """(matching arg, other arg) of a binary op ``target`` where one arg satisfies ``predicate``."""
    if not is_op(node, target) or len(node.args) != 2:
        return None
    a, b = node.args
    return (a, b) if predicate(a) else (b, a) if predicate(b) else None


def _is_const(value: float) -> Callable[[object], bool]:
    return lambda arg: isinstance(arg, (int, float)) and math.isclose(arg, value, rel_tol=1e-6)


def _is_node(arg: object) -> bool:
    return isinstance(arg, Node)


def _strip_to_float32(node: object) -> object:
    if is_op(node, aten.to.dtype) and node.args[1] == torch.float32:
        return node.args[0]
    return node


def rmsnorm(x: Node) -> Fusion | str | None:
    weighted = _operand(x, aten.mul.Tensor, lambda a: _is_node(a) and a.op == "get_attr")
    if weighted is None:
        return None
    weight, normed = weighted
    cast_back = normed.args[1] if is_op(normed, aten.to.dtype) else None
    scaled = normed.args[0] if cast_back is not None else normed
    by_rsqrt = _operand(scaled, aten.mul.Tensor, lambda a: is_op(a, aten.rsqrt.default))
    if by_rsqrt is None:
        return None
    rsqrt, x_float = by_rsqrt
    var_eps = rsqrt.args[0]
    mean_eps = _operand(var_eps, aten.add.Tensor, lambda a: is_op(a, aten.mean.dim))
    if mean_eps is None or not isinstance(mean_eps[1], float):
        return None
    mean, eps = mean_eps
    power = mean.args[0]
    if (list(mean.args[1:]) != [[-1], True] or not is_op(power, aten.pow.Tensor_Scalar)
            or power.args != (x_float, 2)):
        return None
    chain = [n for n in (normed, scaled, rsqrt, var_eps, mean, power) if n is not x_float]
    if not all(single_user(n) for n in chain):
        return "an intermediate of the RMSNorm is read elsewhere"
    source = _strip_to_float32(x_float)
    source_dtype = source.meta["val"].dtype if isinstance(source, Node) and "val" in source.meta else None
    if cast_back is not None and cast_back != source_dtype:
        return f"RMSNorm casts its result to {cast_back}, not its input dtype {source_dtype}"
    return Fusion(zq.rmsnorm_quant.default, (source, weight, eps), **NORM_OUTPUTS)


def _only_read_by_quant(x: Node) -> str | None:
    return None if single_user(x) else f"{x.target} output is also read by {[u.name for u in x.users]}"


def gelu(x: Node) -> Fusion | str | None:
    if not is_op(x, aten.gelu.default):
        return None
    if reason := _only_read_by_quant(x):
        return reason
    inp, approximate = x.args[0], x.kwargs.get("approximate", x.args[1] if len(x.args) > 1 else "none")
    with_bias = _operand(inp, aten.add.Tensor, lambda a: _is_node(a) and a.op == "get_attr"
                         and a.meta.get("val") is not None and a.meta["val"].dim() == 1)
    if with_bias is not None and single_user(inp):
        bias, inp = with_bias
        return Fusion(zq.gelu_quant.default, (inp, bias, approximate), **ACT_OUTPUTS)
    return Fusion(zq.gelu_quant.default, (inp, None, approximate), **ACT_OUTPUTS)


def gelu_tanh_decomp(x: Node) -> Fusion | str | None:
    """0.5 * v * (1 + tanh(sqrt(2/pi) * (v + 0.044715 * v**3))), as transformers' NewGELUActivation."""
    halves = _operand(x, aten.mul.Tensor, lambda a: _operand(a, aten.mul.Tensor, _is_const(0.5)) is not None)
    if halves is None:
        return None
    half, one_plus = halves
    v = _operand(half, aten.mul.Tensor, _is_const(0.5))[1]
    plus_one = _operand(one_plus, aten.add.Tensor, _is_const(1.0))
    tanh = plus_one[1] if plus_one else None
    if not is_op(tanh, aten.tanh.default):
        return None
    scaled = _operand(tanh.args[0], aten.mul.Tensor, _is_const(math.sqrt(2 / math.pi)))
    inner = _operand(scaled[1], aten.add.Tensor, lambda a: a is v) if scaled else None
    cubic = _operand(inner[1], aten.mul.Tensor, _is_const(0.044715)) if inner else None
    if cubic is None or not (is_op(cubic[1], aten.pow.Tensor_Scalar) and cubic[1].args == (v, 3.0)):
        return None
    if reason := _only_read_by_quant(x):
        return reason
    chain = (half, one_plus, tanh, tanh.args[0], scaled[1], inner[1], cubic[1])
    if not all(single_user(n) for n in chain):
        return "an intermediate of the tanh-GELU is read elsewhere"
    return Fusion(zq.gelu_quant.default, (v, None, "tanh"), **ACT_OUTPUTS)


def silu_mul(x: Node) -> Fusion | str | None:
    gated = _operand(x, aten.mul.Tensor, lambda a: is_op(a, aten.silu.default))
    if gated is None:
        return None
    silu, up = gated
    if reason := _only_read_by_quant(x):
        return reason
    if not single_user(silu) or not _same_shape(silu, up):
        return "silu(gate) is read elsewhere or broadcasts against up"
    return Fusion(zq.silu_mul_quant.default, (silu.args[0], up), **ACT_OUTPUTS)


RULES: tuple[Rule, ...] = (add_layernorm, layernorm, rmsnorm, gelu, gelu_tanh_decomp, silu_mul)


def _describe(x: object) -> str:
    if isinstance(x, Node):
        return str(x.target) if x.op == "call_function" else f"a {x.op} node"
    return repr(x)


def _apply(gm: GraphModule, quant: Node, producer: Node, rule: Rule, fusion: Fusion) -> None:
    with gm.graph.inserting_before(producer):
        fused = gm.graph.call_function(fusion.op, fusion.args)
    fused.meta[META_FUSED_INTO] = rule.__name__
    for reader in list(quant.users):  # getitem(quant, 0 | 1)
        reader.update_arg(0, fused)
        reader.update_arg(1, fusion.quant_outputs[reader.args[1]])
    gm.graph.erase_node(quant)
    if fusion.fp_output is not None and producer.users:
        with gm.graph.inserting_after(fused):
            fp_value = getitem(gm.graph, fused, fusion.fp_output)
        fp_value.meta["val"] = producer.meta.get("val")
        producer.replace_all_uses_with(fp_value)


def fuse_quant_into_elementwise(gm: GraphModule, ctx: CompileContext) -> PassResult:
    hits: dict[str, int] = {}
    for quant in [n for n in gm.graph.nodes if is_op(n, QUANTIZE)]:
        producer = quant.args[0]
        reasons = []
        for rule in RULES:
            outcome = rule(producer) if isinstance(producer, Node) else None
            if isinstance(outcome, Fusion):
                _apply(gm, quant, producer, rule, outcome)
                hits[f"fuse.{rule.__name__}"] = hits.get(f"fuse.{rule.__name__}", 0) + 1
                break
            if isinstance(outcome, str):
                reasons.append(f"{rule.__name__}: {outcome}")
        else:
            ctx.unfused_reasons[quant.name] = "; ".join(reasons) or (
                f"input comes from {_describe(producer)}, which no fusion rule covers")
    gm.graph.eliminate_dead_code()
    return PassResult(gm, bool(hits), hits)
