"""fuse_quant_into_elementwise: fold token-wise quantization into the elementwise op that feeds it.

Matches ``zq.quantize_per_token(x)`` where ``x`` comes from one of the rules below, first match wins:

=================  ================================================  ================================
rule               producer of x                                     emits
=================  ================================================  ================================
add_layernorm      ``layer_norm(a + b)`` (post-LN residual block)    ``zq.add_layernorm_quant(a, b)``
layernorm          ``layer_norm(h)``                                 ``zq.layernorm_quant(h)``
rmsnorm            Llama's RMSNorm decomposition                     ``zq.rmsnorm_quant(h, w)``
offset_rmsnorm     Gemma's ``(1 + w)`` RMSNorm, float32, cast back   ``zq.rmsnorm_quant(h, 1 + w, True)``
gelu               ``gelu(h [+ bias])`` (erf or tanh)                ``zq.gelu_quant(h, bias)``
gelu_tanh_decomp   GPT-2's ``gelu_new`` written out in aten ops      ``zq.gelu_quant(h, None, 'tanh')``
relu               ``relu(h)`` (OPT)                                 ``zq.relu_quant(h)``
silu_mul           ``silu(g) * u`` (SwiGLU)                          ``zq.silu_mul_quant(g, u)``
gelu_mul           ``gelu(g) * u`` (GeGLU, Gemma)                    ``zq.gelu_mul_quant(g, u)``
online_hadamard    ``zq.hadamard(y, b)`` (rotation, before o_proj /   ``zq.silu_mul_hadamard_quant(g, u,
                   down_proj); y = ``silu(g) * u`` or ``gelu(g) *      b)``, ``gelu_mul_hadamard_quant``,
                   u`` is folded in too (their rules above)          else ``zq.hadamard_quant(y, b)``
token_scaled       ``y * m``, m one number per token (DeBERTa's      the rule of y's producer, its
                   padding mask), y from one of the rules above      scale times m
stored             a stored tensor through layout ops (DeBERTa's     the INT8 values and scales,
                   relative-position embeddings)                     computed once and stored
=================  ================================================  ================================

``token_scaled``: per-token quantization commutes with a per-token factor m (``absmax(y * m) = |m| absmax(y)``), so
``quantize(y * m)`` dequantizes to what ``q(y), scale(y) * m`` does (a negative m flips the sign of q there and of
the scale here); the product ``y * m`` stays for its other readers (DeBERTa's residual). ``stored``: the quantization
of a constant is a constant; the tensors are computed by ``quantize_per_token`` itself, once per stored tensor and
layout chain (DeBERTa's layers share theirs).

``online_hadamard``: the transform ``rotate_hadamard`` puts before a quantized output projection mixes each block of
``b`` channels, so the quantization follows it (one pass over the row in shared memory on the GPU); the SwiGLU /
GeGLU product before it joins the same op when its own rule would fuse it, else the Hadamard alone is fused.

``offset_rmsnorm`` stores ``offset + w`` (float32) once, ahead of time, in place of Gemma's weight (cleanup drops w
when nothing else reads it). The quantization of a LayerNorm output read by several linears is one quantize
(``insert_activation_quant`` makes one per input): GPT-J's and GPT-NeoX's parallel attention + MLP read one
``layernorm_quant``.

This is ZeroQuant's kernel fusion: the quantization costs no extra pass over memory. Norm rules also emit
the FP result for the other readers (a residual); the activation rules require the quant to be the only
reader. A quant node that no rule takes stays a standalone ``quantize_per_token``; why is recorded in
``ctx.unfused_reasons`` for ``inspect``. Each hit bumps the counter ``fuse.<rule>``. The norm and gated-activation
patterns are shared with ``smooth_activations`` (``patterns.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule, Node

from zqcompile.passes.infra import (
    META_FUSED_INTO, CompileContext, PassResult, get_attr_tensor, getitem, is_op, is_stored, set_attr_tensor,
    single_user,
)
from zqcompile.passes.patterns import (
    LAYOUT_OPS, GatedActivation, LayerNorm, Miss, OffsetRMSNorm, RMSNorm, Rule, apply_rules, equals_scalar,
    match_gated_activation, match_layer_norm, match_offset_rms_norm, match_rms_norm, operand, same_shape,
    through_layout,
)

aten = torch.ops.aten
zq = torch.ops.zq
QUANTIZE = zq.quantize_per_token.default


@dataclass(frozen=True)
class Stored:
    """A tensor the rule computes ahead of time from a stored one: ``fn(tensor of source)``, stored at
    ``source.target + suffix``; the fused op reads it as a get_attr."""

    source: Node
    suffix: str
    fn: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Fusion:
    """A matched rule: call ``op(*args)`` (a :class:`Stored` arg is computed and stored first); its outputs at
    ``quant_outputs`` are (q, scale); when ``fp_output`` is set, that output replaces ``producer`` (default: the
    quant's input) for its other readers; ``row_scale`` (``[..., 1]``) multiplies the scale."""

    op: Callable
    args: tuple
    quant_outputs: tuple[int, int]
    fp_output: int | None
    producer: Node | None = None
    row_scale: Node | None = None


NORM_OUTPUTS = {"quant_outputs": (1, 2), "fp_output": 0}
ACT_OUTPUTS = {"quant_outputs": (0, 1), "fp_output": None}


def add_layernorm(x: Node) -> Fusion | Miss | None:
    norm = match_layer_norm(x)
    if not isinstance(norm, LayerNorm):
        return None  # the layernorm rule reports a LayerNorm it cannot take
    total = norm.input
    if not is_op(total, aten.add.Tensor) or len(total.args) != 2 or total.kwargs:
        return None
    a, b = total.args
    if not single_user(total):
        return Miss("the residual sum before LayerNorm is also read elsewhere")
    if not same_shape(a, b):
        return Miss("the residual add broadcasts (operands differ in shape)")
    return Fusion(zq.add_layernorm_quant.default, (a, b, norm.weight, norm.bias, norm.eps), **NORM_OUTPUTS)


def layernorm(x: Node) -> Fusion | Miss | None:
    norm = match_layer_norm(x)
    if not isinstance(norm, LayerNorm):
        return norm
    return Fusion(zq.layernorm_quant.default, (norm.input, norm.weight, norm.bias, norm.eps), **NORM_OUTPUTS)


def rmsnorm(x: Node) -> Fusion | Miss | None:
    norm = match_rms_norm(x)
    if not isinstance(norm, RMSNorm):
        return norm
    return Fusion(zq.rmsnorm_quant.default, (norm.input, norm.weight, norm.eps), **NORM_OUTPUTS)


def offset_rmsnorm(x: Node) -> Fusion | Miss | None:
    norm = match_offset_rms_norm(x)
    if not isinstance(norm, OffsetRMSNorm):
        return norm
    offset = norm.offset
    scale = Stored(norm.weight, "_plus_offset", lambda w: w.float() + offset)  # as Gemma: in float32
    return Fusion(zq.rmsnorm_quant.default, (norm.input, scale, norm.eps, True), **NORM_OUTPUTS)


def _only_read_by_quant(x: Node) -> Miss | None:
    return None if single_user(x) else Miss(f"{x.target} output is also read by {[u.name for u in x.users]}")


def gelu(x: Node) -> Fusion | Miss | None:
    if not is_op(x, aten.gelu.default):
        return None
    if miss := _only_read_by_quant(x):
        return miss
    inp, approximate = x.args[0], x.kwargs.get("approximate", x.args[1] if len(x.args) > 1 else "none")
    with_bias = operand(inp, aten.add.Tensor, lambda a: is_stored(a) and a.meta.get("val") is not None
                        and a.meta["val"].dim() == 1)
    if with_bias is not None and single_user(inp):
        bias, inp = with_bias
        return Fusion(zq.gelu_quant.default, (inp, bias, approximate), **ACT_OUTPUTS)
    return Fusion(zq.gelu_quant.default, (inp, None, approximate), **ACT_OUTPUTS)


def gelu_tanh_decomp(x: Node) -> Fusion | Miss | None:
    """0.5 * v * (1 + tanh(sqrt(2/pi) * (v + 0.044715 * v**3))), as transformers' NewGELUActivation."""
    halves = operand(x, aten.mul.Tensor, lambda a: operand(a, aten.mul.Tensor, equals_scalar(0.5)) is not None)
    if halves is None:
        return None
    half, one_plus = halves
    v = operand(half, aten.mul.Tensor, equals_scalar(0.5))[1]
    plus_one = operand(one_plus, aten.add.Tensor, equals_scalar(1.0))
    tanh = plus_one[1] if plus_one else None
    if not is_op(tanh, aten.tanh.default):
        return None
    scaled = operand(tanh.args[0], aten.mul.Tensor, equals_scalar(math.sqrt(2 / math.pi)))
    inner = operand(scaled[1], aten.add.Tensor, lambda a: a is v) if scaled else None
    cubic = operand(inner[1], aten.mul.Tensor, equals_scalar(0.044715)) if inner else None
    if cubic is None or not (is_op(cubic[1], aten.pow.Tensor_Scalar) and cubic[1].args == (v, 3.0)):
        return None
    if miss := _only_read_by_quant(x):
        return miss
    chain = (half, one_plus, tanh, tanh.args[0], scaled[1], inner[1], cubic[1])
    if not all(single_user(n) for n in chain):
        return Miss("an intermediate of the tanh-GELU is read elsewhere")
    return Fusion(zq.gelu_quant.default, (v, None, "tanh"), **ACT_OUTPUTS)


def relu(x: Node) -> Fusion | Miss | None:
    if not is_op(x, aten.relu.default):
        return None
    return _only_read_by_quant(x) or Fusion(zq.relu_quant.default, (x.args[0],), **ACT_OUTPUTS)


def silu_mul(x: Node) -> Fusion | Miss | None:
    """SwiGLU: ``silu(gate) * up`` (Llama's MLP)."""
    swiglu = match_gated_activation(x, "silu")
    if not isinstance(swiglu, GatedActivation):
        return swiglu
    return _only_read_by_quant(x) or Fusion(zq.silu_mul_quant.default, (swiglu.gate, swiglu.up), **ACT_OUTPUTS)


def gelu_mul(x: Node) -> Fusion | Miss | None:
    """GeGLU: ``gelu(gate) * up`` (Gemma's MLP, tanh or erf GELU)."""
    geglu = match_gated_activation(x, "gelu")
    if not isinstance(geglu, GatedActivation):
        return geglu
    return _only_read_by_quant(x) or Fusion(zq.gelu_mul_quant.default, (geglu.gate, geglu.up, geglu.approximate),
                                            **ACT_OUTPUTS)


# the gated rules' ops, and the same with the online Hadamard between the product and the quantization
WITH_HADAMARD = {zq.silu_mul_quant.default: zq.silu_mul_hadamard_quant.default,
                 zq.gelu_mul_quant.default: zq.gelu_mul_hadamard_quant.default}


def online_hadamard(x: Node) -> Fusion | Miss | None:
    """``zq.hadamard(y, block)``, rotation's transform of an output projection's input (o_proj, down_proj)."""
    if not is_op(x, zq.hadamard.default):
        return None
    if miss := _only_read_by_quant(x):
        return miss
    y, block = x.args
    gated = [match for match in (silu_mul(y), gelu_mul(y)) if isinstance(match, Fusion)]
    if gated:
        return Fusion(WITH_HADAMARD[gated[0].op], (*gated[0].args, block), **ACT_OUTPUTS)
    return Fusion(zq.hadamard_quant.default, (y, block), **ACT_OUTPUTS)


def _per_token_of(x: Node) -> Callable[[object], bool]:
    """Whether an operand of ``x`` holds one number per token of x: shape ``[..., 1]``, broadcasting over x's last
    dim only, in x's dtype."""
    def per_token(arg: object) -> bool:
        if not (isinstance(arg, Node) and "val" in arg.meta and "val" in x.meta):
            return False
        value, shape = arg.meta["val"], x.meta["val"].shape
        return (value.dim() == len(shape) and value.shape[-1] == 1 and value.dtype == x.meta["val"].dtype
                and [str(d) for d in value.shape[:-1]] == [str(d) for d in shape[:-1]] and str(shape[-1]) != "1")
    return per_token


def token_scaled(x: Node) -> Fusion | Miss | None:
    """``y * m`` with m one number per token and y what another rule fuses (DeBERTa: the embedding LayerNorm's
    output times the padding mask)."""
    scaled = operand(x, aten.mul.Tensor, _per_token_of(x))
    if scaled is None or not same_shape(scaled[1], x):
        return None
    row_scale, y = scaled
    matches = [match for match in map(lambda matcher: matcher(y), MATCHERS) if match is not None]
    inner = next((match for match in matches if isinstance(match, Fusion)), None)
    if inner is None:  # as apply_rules: a miss of one rule does not stop the next one
        return Miss("y of y * m is not fused: " + "; ".join(miss.reason for miss in matches)) if matches else None
    if inner.fp_output is None and not single_user(x):
        return Miss("y * m is also read elsewhere and y's rule gives no floating-point output for it")
    return Fusion(inner.op, inner.args, inner.quant_outputs, inner.fp_output, y, row_scale)


@dataclass(frozen=True)
class Constant:
    """A stored tensor re-viewed by ``chain`` (layout ops without run-time sizes), first op first."""

    source: Node
    chain: tuple[Node, ...]

    def key(self) -> str:
        """Names the quantized tensors: one pair per stored tensor and chain."""
        return repr([(str(n.target), n.args[1:], n.kwargs) for n in self.chain])


def stored(x: Node) -> Constant | Miss | None:
    """A stored tensor (parameter or buffer) through layout ops: its quantization is a constant too."""
    chain = []
    while is_op(x, *LAYOUT_OPS, aten.alias.default) and isinstance(x.args[0], Node):
        chain.append(x)
        x = x.args[0]
    if not is_stored(x):
        return None
    if any(len(n.all_input_nodes) != 1 for n in chain):
        return Miss("the stored tensor is re-viewed with sizes known only at run time")
    return Constant(x, tuple(reversed(chain)))


# on the stored (q, scale) of a constant: (Constant.key() of its source, 0 for q | 1 for scale)
META_QUANTIZED_FROM = "zq_quantized_from"


def _emit_stored(gm: GraphModule, ctx: CompileContext, quant: Node, constant: Constant) -> None:
    made = {n.meta[META_QUANTIZED_FROM]: n for n in gm.graph.nodes if is_stored(n) and META_QUANTIZED_FROM in n.meta}
    if (constant.key(), 0) not in made:
        value = get_attr_tensor(gm, constant.source).detach()
        for node in constant.chain:
            value = node.target(value, *node.args[1:], **node.kwargs)
        number = len(made) // 2
        for index, tensor in enumerate(QUANTIZE(value.contiguous())):
            name = f"{constant.source.target}_quantized{number}_{('q', 'scale')[index]}"
            set_attr_tensor(gm, name, tensor)
            with gm.graph.inserting_after(constant.source):
                made[constant.key(), index] = node = gm.graph.get_attr(name)
            node.meta.update({META_QUANTIZED_FROM: (constant.key(), index), META_FUSED_INTO: "stored"})
    for reader in list(quant.users):  # getitem(quant, 0 | 1)
        reader.replace_all_uses_with(made[constant.key(), reader.args[1]])
        gm.graph.erase_node(reader)
    gm.graph.erase_node(quant)


def _describe(x: object) -> str:
    if not isinstance(x, Node):
        return repr(x)
    if x.op != "call_function":
        return f"a {x.op} node"
    source = through_layout(x)
    return str(x.target) if source is x else f"{x.target} of {_describe(source)}"


def _stored(gm: GraphModule, arg: object) -> object:
    """A :class:`Stored` arg as a get_attr of its computed tensor (made once per source); others as they are."""
    if not isinstance(arg, Stored):
        return arg
    target = arg.source.target + arg.suffix
    existing = next((n for n in gm.graph.nodes if is_stored(n) and n.target == target), None)
    if existing is not None:
        return existing
    set_attr_tensor(gm, target, arg.fn(get_attr_tensor(gm, arg.source)))
    with gm.graph.inserting_after(arg.source):
        return gm.graph.get_attr(target)


def _apply(gm: GraphModule, quant: Node, fusion: Fusion, rule: str) -> None:
    producer = fusion.producer or quant.args[0]
    args = tuple(_stored(gm, arg) for arg in fusion.args)
    with gm.graph.inserting_before(producer):
        fused = gm.graph.call_function(fusion.op, args)
    fused.meta[META_FUSED_INTO] = rule
    for reader in list(quant.users):  # getitem(quant, 0 | 1)
        reader.update_arg(0, fused)
        is_scale = reader.args[1] == 1
        reader.update_arg(1, fusion.quant_outputs[reader.args[1]])
        if is_scale and fusion.row_scale is not None:
            with gm.graph.inserting_after(reader):
                scaled = gm.graph.call_function(aten.mul.Tensor, (reader, fusion.row_scale))
            scaled.meta["val"] = reader.meta.get("val")
            reader.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    gm.graph.erase_node(quant)
    if fusion.fp_output is not None and producer.users:
        with gm.graph.inserting_after(fused):
            fp_value = getitem(gm.graph, fused, fusion.fp_output)
        fp_value.meta["val"] = producer.meta.get("val")
        producer.replace_all_uses_with(fp_value)


def _on_producer(matcher: Callable[[Node], Fusion | Miss | None]) -> Rule[Fusion]:
    """The rule that ``matcher`` makes on a ``quantize_per_token`` node: it looks at the quant's producer."""
    name = matcher.__name__
    return Rule(name, lambda quant: matcher(quant.args[0]) if isinstance(quant.args[0], Node) else None,
                lambda gm, ctx, quant, fusion: _apply(gm, quant, fusion, name))


MATCHERS = (add_layernorm, layernorm, rmsnorm, offset_rmsnorm, gelu, gelu_tanh_decomp, relu, silu_mul, gelu_mul,
            online_hadamard)
RULES: tuple[Rule, ...] = (
    *(_on_producer(matcher) for matcher in (*MATCHERS, token_scaled)),
    Rule("stored", lambda quant: stored(quant.args[0]) if isinstance(quant.args[0], Node) else None, _emit_stored),
)


def fuse_quant_into_elementwise(gm: GraphModule, ctx: CompileContext) -> PassResult:
    applied = apply_rules(
        gm, ctx, [n for n in gm.graph.nodes if is_op(n, QUANTIZE)], RULES, "fuse",
        lambda quant: f"input comes from {_describe(quant.args[0])}, which no fusion rule covers")
    ctx.unfused_reasons.update(applied.misses)
    dead_removed = gm.graph.eliminate_dead_code()
    return PassResult(gm, bool(applied.counters) or dead_removed, applied.counters)
