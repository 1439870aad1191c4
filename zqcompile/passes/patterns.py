"""The rule layer of the rewrite passes, and the graph patterns that more than one pass matches.

After onnxscript's rewriter (a rule's check returns ``MatchResult.fail(reason)``) and Inductor's pattern
matcher (``extra_check``, a counter per replacement). A :class:`Rule` is a name, ``match(node)`` and
``emit(gm, ctx, node, match)``; ``match`` returns

- the match: whatever ``emit`` needs to rewrite the node;
- ``Miss(reason)`` when it recognises the node but must not rewrite it ("silu(gate) is read elsewhere");
- ``None`` when the node is not its kind.

:func:`apply_rules` tries a pass's rules on each node in order; the first match is emitted and counted as
``<pass>.<rule>``; a node that no rule rewrote gets the reasons of the rules that recognised it, which the
pass records for ``inspect``.

The patterns below (LayerNorm, Llama's and Gemma's RMSNorm decompositions, the gated activations SwiGLU
``silu(gate) * up`` and GeGLU ``gelu(gate) * up``) are matched by ``fuse_quant_into_elementwise`` (to fold the
quantization into them) and by ``smooth_activations`` (to fold the smoothing factors into their weights); each
returns its parts, a ``Miss`` or ``None`` the same way.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, Sequence, TypeVar

import torch
from torch.fx import GraphModule, Node

from zqcompile.passes.infra import CompileContext, PassResult, is_op, is_stored, single_user

aten = torch.ops.aten
M = TypeVar("M")


@dataclass(frozen=True)
class Miss:
    """A rule recognised the node but cannot rewrite it; ``reason`` says why, for ``inspect``."""

    reason: str


@dataclass(frozen=True)
class Rule(Generic[M]):
    """``match(node)`` -> match | Miss | None; ``emit(gm, ctx, node, match)`` rewrites the graph."""

    name: str
    match: Callable[[Node], M | Miss | None]
    emit: Callable[[GraphModule, CompileContext, Node, M], None]


@dataclass
class Applied(Generic[M]):
    """What :func:`apply_rules` did."""

    counters: Counter = field(default_factory=Counter)  # "<pass>.<rule>": rewrites
    matches: list[M] = field(default_factory=list)  # the matches it emitted, in order
    misses: dict[str, str] = field(default_factory=dict)  # node name: why no rule rewrote it


def apply_rules(gm: GraphModule, ctx: CompileContext, nodes: Iterable[Node], rules: Sequence[Rule[M]],
                prefix: str, uncovered: Callable[[Node], str]) -> Applied[M]:
    """Emit the first rule that matches each of ``nodes``, in order; the reason for a node no rule rewrote is
    its rules' misses (``"rule: reason; ..."``), or ``uncovered(node)`` when no rule recognised it."""
    applied: Applied[M] = Applied()
    for node in list(nodes):  # emitting rewrites the graph: take the nodes first
        reasons = []
        for rule in rules:
            match = rule.match(node)
            if isinstance(match, Miss):
                reasons.append(f"{rule.name}: {match.reason}")
            elif match is not None:
                rule.emit(gm, ctx, node, match)
                applied.counters[f"{prefix}.{rule.name}"] += 1
                applied.matches.append(match)
                break
        else:
            applied.misses[node.name] = "; ".join(reasons) or uncovered(node)
    return applied


def apply_target_rules(gm: GraphModule, ctx: CompileContext | None, nodes: Iterable[Node], rules: Sequence[Rule],
                       prefix: str) -> PassResult:
    """:func:`apply_rules` for a target pass (``pipeline.TARGET_PHASES``): the reasons of the nodes its rules
    recognised but left alone go to ``ctx.target_skipped`` as ``"<prefix>: <reasons>"`` (``inspect`` prints them)."""
    applied = apply_rules(gm, ctx, nodes, rules, prefix, uncovered=lambda node: "")
    if ctx is not None:
        ctx.target_skipped.update({name: f"{prefix}: {why}" for name, why in applied.misses.items() if why})
    return PassResult(gm, bool(applied.counters), applied.counters)


# ---- small matchers ---------------------------------------------------------------------------------

def operand(node: object, target: object, predicate: Callable[[object], bool]) -> tuple[object, object] | None:
    """(matching arg, other arg) of a binary op ``target`` where one arg satisfies ``predicate``."""
    if not is_op(node, target) or len(node.args) != 2:
        return None
    a, b = node.args
    return (a, b) if predicate(a) else (b, a) if predicate(b) else None


def equals_scalar(value: float) -> Callable[[object], bool]:
    return lambda arg: isinstance(arg, (int, float)) and math.isclose(arg, value, rel_tol=1e-6)


def recorded_shape(node: object) -> list | None:
    """The shape export recorded for a node (``meta["val"]``; dims may be symbolic), None if it recorded none."""
    return list(node.meta["val"].shape) if isinstance(node, Node) and "val" in node.meta else None


def same_shape(a: object, b: object) -> bool:
    """Both are nodes whose recorded shapes are equal (no broadcasting between them)."""
    return (isinstance(a, Node) and isinstance(b, Node) and "val" in a.meta and "val" in b.meta
            and [str(d) for d in a.meta["val"].shape] == [str(d) for d in b.meta["val"].shape])


SDPA = aten.scaled_dot_product_attention.default
_SDPA_MASK_POSITION = 3


def sdpa_mask(node: Node) -> object:
    """The ``attn_mask`` of an SDPA node, given by position or by keyword (None when absent)."""
    args = node.args
    return node.kwargs.get("attn_mask", args[_SDPA_MASK_POSITION] if len(args) > _SDPA_MASK_POSITION else None)


def set_sdpa_mask(node: Node, mask: Node) -> None:
    """Give an SDPA node ``mask`` as its ``attn_mask``, where the node has it (keyword or position)."""
    if "attn_mask" in node.kwargs:
        node.update_kwarg("attn_mask", mask)
    else:
        node.update_arg(_SDPA_MASK_POSITION, mask)


# ops that only move or re-view their first argument's values
LAYOUT_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.contiguous.default, aten.clone.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
    aten.flatten.using_ints, aten.t.default,
})


def through_layout(node: Node) -> Node:
    """The node whose values ``node`` re-views: followed back through :data:`LAYOUT_OPS` to the first op that
    computes something (or ``node`` itself)."""
    while is_op(node, *LAYOUT_OPS) and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _strip_to_float32(node: object) -> object:
    if is_op(node, aten.to.dtype) and node.args[1] == torch.float32:
        return node.args[0]
    return node


# ---- patterns shared by fusion and smoothing ----------------------------------------------------------

@dataclass(frozen=True)
class LayerNorm:
    """``layer_norm(input, [C], weight, bias, eps)`` over the last dim; weight and bias may be None."""

    input: Node
    weight: object
    bias: object
    eps: float


def match_layer_norm(x: Node) -> LayerNorm | Miss | None:
    if not is_op(x, aten.layer_norm.default):
        return None
    inp, shape, weight, bias, eps = [*x.args, *(None, None, 1e-5)[len(x.args) - 2:]][:5]
    if len(shape) != 1:
        return Miss(f"LayerNorm over {len(shape)} dims (only the last dim is supported)")
    return LayerNorm(inp, weight, bias, eps)


@dataclass(frozen=True)
class RMSNorm:
    """Llama's RMSNorm: ``weight * (x * rsqrt(mean(x**2, -1) + eps)).to(x.dtype)``, statistics in float32;
    ``input`` is x before its cast to float32, ``weight`` a stored tensor."""

    input: Node
    weight: Node
    eps: float


@dataclass(frozen=True)
class _RMSStatistic:
    """``x_float * rsqrt(mean(x_float**2, -1) + eps)``: the part Llama's and Gemma's RMSNorm share."""

    x_float: Node
    chain: tuple[Node, ...]  # the nodes between x_float and the result, which must have no other reader
    eps: float


def _match_rms_statistic(scaled: object) -> _RMSStatistic | None:
    by_rsqrt = operand(scaled, aten.mul.Tensor, lambda a: is_op(a, aten.rsqrt.default))
    if by_rsqrt is None:
        return None
    rsqrt, x_float = by_rsqrt
    var_eps = rsqrt.args[0]
    mean_eps = operand(var_eps, aten.add.Tensor, lambda a: is_op(a, aten.mean.dim))
    if mean_eps is None or not isinstance(mean_eps[1], float):
        return None
    mean, eps = mean_eps
    power = mean.args[0]
    if (list(mean.args[1:]) != [[-1], True] or not is_op(power, aten.pow.Tensor_Scalar)
            or power.args != (x_float, 2)):
        return None
    return _RMSStatistic(x_float, (scaled, rsqrt, var_eps, mean, power), eps)


def _source_dtype(source: object) -> torch.dtype | None:
    return source.meta["val"].dtype if isinstance(source, Node) and "val" in source.meta else None


def match_rms_norm(x: Node) -> RMSNorm | Miss | None:
    weighted = operand(x, aten.mul.Tensor, is_stored)
    if weighted is None:
        return None
    weight, normed = weighted
    cast_back = normed.args[1] if is_op(normed, aten.to.dtype) else None
    statistic = _match_rms_statistic(normed.args[0] if cast_back is not None else normed)
    if statistic is None:
        return None
    chain = [n for n in (normed, *statistic.chain) if n is not statistic.x_float]
    if not all(single_user(n) for n in chain):
        return Miss("an intermediate of the RMSNorm is read elsewhere")
    source = _strip_to_float32(statistic.x_float)
    if cast_back is not None and cast_back != _source_dtype(source):
        return Miss(f"RMSNorm casts its result to {cast_back}, not its input dtype {_source_dtype(source)}")
    return RMSNorm(source, weight, statistic.eps)


@dataclass(frozen=True)
class OffsetRMSNorm:
    """Gemma's RMSNorm: ``(x * rsqrt(mean(x**2, -1) + eps) * (offset + weight.float())).type_as(x)``, all in
    float32; ``input`` is x before its cast to float32, ``weight`` the stored tensor w (scale 1 + w)."""

    input: Node
    weight: Node
    offset: float
    eps: float


def _stored_plus_offset(arg: object) -> tuple[Node, float] | None:
    """(w, c) for ``w.float() + c`` (or ``w + c``) with w a stored tensor and c a number."""
    plus = operand(arg, aten.add.Tensor, lambda a: isinstance(a, (int, float)))
    if plus is None:
        return None
    offset, weight = plus
    weight = _strip_to_float32(weight)
    return (weight, float(offset)) if is_stored(weight) else None


def match_offset_rms_norm(x: Node) -> OffsetRMSNorm | Miss | None:
    cast_back = x.args[1] if is_op(x, aten.type_as.default) else x.args[1] if is_op(x, aten.to.dtype) else None
    product = x.args[0] if cast_back is not None else x
    weighted = operand(product, aten.mul.Tensor, lambda a: _stored_plus_offset(a) is not None)
    if weighted is None:
        return None
    scale, scaled = weighted
    statistic = _match_rms_statistic(scaled)
    if statistic is None:
        return None
    (weight, offset), source = _stored_plus_offset(scale), _strip_to_float32(statistic.x_float)
    chain = [n for n in (product, scale, *statistic.chain) if n is not statistic.x_float]
    if not all(single_user(n) for n in chain):
        return Miss("an intermediate of the (offset + w) RMSNorm is read elsewhere")
    # no cast back only when everything is float32 already
    target = _source_dtype(cast_back) if isinstance(cast_back, Node) else cast_back or torch.float32
    if target != _source_dtype(source):
        return Miss(f"the (offset + w) RMSNorm casts its result to {target}, not its input dtype "
                    f"{_source_dtype(source)}")
    return OffsetRMSNorm(source, weight, offset, statistic.eps)


GATE_ACTIVATIONS = {"silu": aten.silu.default, "gelu": aten.gelu.default}


@dataclass(frozen=True)
class GatedActivation:
    """``act(gate) * up``, same shapes: SwiGLU (``silu``, Llama's MLP) or GeGLU (``gelu``, Gemma's; erf or tanh,
    ``approximate`` as ``F.gelu`` takes it, None for silu)."""

    gate: Node
    up: Node
    approximate: str | None = None


def match_gated_activation(x: Node, activation: str) -> GatedActivation | Miss | None:
    """``activation(gate) * up`` with ``activation`` a key of :data:`GATE_ACTIVATIONS`."""
    gated = operand(x, aten.mul.Tensor, lambda a: is_op(a, GATE_ACTIVATIONS[activation]))
    if gated is None:
        return None
    act, up = gated
    if not single_user(act) or not same_shape(act, up):
        return Miss(f"{activation}(gate) is read elsewhere or broadcasts against up")
    approximate = act.kwargs.get("approximate", act.args[1] if len(act.args) > 1 else "none") \
        if activation == "gelu" else None
    return GatedActivation(act.args[0], up, approximate)
