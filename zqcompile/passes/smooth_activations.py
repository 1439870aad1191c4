"""smooth_activations: move per-channel activation outliers into the weights around them (SmoothQuant).

SmoothQuant (Xiao et al., 2023) on top of ZeroQuant. Token-wise INT8 quantization of an activation loses
precision when a few channels are far larger than the rest, as in every block of Llama-family models.
Dividing the producer of those channels by a per-channel factor ``s`` and multiplying the readers' weight
columns by ``s`` computes the same function in floating point, while the quantized activation gets flatter
channels; ``s_j = absmax(x_j)**alpha / max_i |W_ij|**(1 - alpha)`` balances the two (alpha = recipe
``smooth_alpha``). The weights are quantized afterwards, so their scales see the smoothed values.

Matches an activation ``x`` read by act-quantized linears (plan ``act_bits == 8``) with stored weights, with
``ctx.activation_absmax`` holding its per-channel absmax (from ``calibrate_activations``), produced by

- ``layer_norm(h, w, b)`` with a stored ``w`` (``b`` divided too), or Llama's RMSNorm ``w * normed``;
- SwiGLU's ``silu(gate) * up`` or GeGLU's ``gelu(gate) * up`` with ``up`` a linear read only there (its weight
  rows and bias divided);
- attention: ``scaled_dot_product_attention(q, k, v)`` through movement ops (view, transpose, ...), with
  ``v`` a linear read only there through movement ops and a KV-cache write (its rows divided: the output of
  attention is a mix of V's rows, per head; every value in a cache came from that same projection). With
  grouped-query attention several heads share a KV head, so their channels share one factor (the max over
  the group).

Emits new buffers for the divided tensors and for each reader's weight; an original stays while anything
else reads it (a tied embedding). Other readers of a smoothed norm (post-LN BERT's residual) read
``x * s`` instead, one elementwise multiply that restores their value. After folding, the graph is run on
the calibration inputs and must give the outputs it gave before (a ZQError otherwise: that would be a bug
in a rule). Refuses, recording why in ``ctx.smooth_skipped``, when the producer matches no rule, or when a
gated-activation or attention output has other readers. Does nothing when ``smooth_alpha`` is None (the default,
plain ZeroQuant). Each rule (``layernorm``, ``rmsnorm``, ``swiglu``, ``geglu``, ``attention``) counts ``smooth.<rule>``;
the norm and gated-activation patterns are shared with ``fuse_quant_into_elementwise`` (``patterns.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule, Node

from zqcompile.errors import ZQError
from zqcompile.passes.infra import (
    META_PLAN, CompileContext, PassResult, get_attr_tensor, is_op, is_stored, replace_stored, set_attr_tensor,
)
from zqcompile.passes.patterns import (
    GatedActivation, LayerNorm, Miss, RMSNorm, Rule, apply_rules, match_gated_activation, match_layer_norm,
    match_rms_norm,
)

aten = torch.ops.aten
LINEAR = aten.linear.default
SDPA = aten.scaled_dot_product_attention.default
# ops that move channels around without mixing them (a full slice included: see _is_movement)
MOVEMENT = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
            aten.permute.default, aten.clone.default, aten.contiguous.default, aten.unsqueeze.default,
            aten.expand.default, aten.slice.Tensor)
FULL_SLICE_END = 2 ** 62
CACHE_WRITE = aten.index_copy_.default  # zqcompile.kv_cache: new keys/values written into a graph input


@dataclass(frozen=True)
class Source:
    """How ``x`` is produced and read: dividing the output channels (first dim) of each ``(reader, stored
    tensor)`` in ``folds`` divides x's channels; ``readers`` (act-quantized linears) take the factors into
    their weight columns; ``others`` read x too and get its unsmoothed value back. x's channels are
    ``[groups, shared_by, head_dim]`` where the folds' are ``[groups, head_dim]`` (``shared_by`` > 1: query
    heads sharing a KV head)."""

    folds: list[tuple[Node, Node]]
    readers: list[Node]
    others: list[Node]
    shared_by: int = 1
    head_dim: int = 1

    def reduce(self, per_x_channel: torch.Tensor) -> torch.Tensor:
        """x's channels -> the folds' channels (max over the heads sharing one)."""
        return per_x_channel.view(-1, self.shared_by, self.head_dim).amax(1).reshape(-1)

    def expand(self, per_fold_channel: torch.Tensor) -> torch.Tensor:
        """The folds' channels -> x's channels."""
        grouped = per_fold_channel.view(-1, 1, self.head_dim)
        return grouped.expand(-1, self.shared_by, self.head_dim).reshape(-1)


def act_quantized(linear: Node) -> bool:
    """Smoothing's readers: the linears whose input is quantized to INT8 per token."""
    return linear.meta[META_PLAN].act_bits == 8


def _source(x: Node, folds: list[tuple[Node, Node]], restores_others: bool, takes_factors: Callable[[Node], bool],
            shared_by: int = 1, head_dim: int = 1) -> Source | Miss:
    """x's Source; the readers are the linears with a stored weight that ``takes_factors`` accepts; other readers
    are allowed only where x can be restored for them (a norm's output, post-LN BERT's residual)."""
    readers = [r for r in x.users if is_op(r, LINEAR) and r.args[0] is x and takes_factors(r) and is_stored(r.args[1])]
    others = [r for r in x.users if r not in readers]
    if others and not restores_others:
        return Miss(f"its output is also read by {[r.name for r in others]}")
    return Source(folds, readers, others, shared_by, head_dim)


def _is_movement(node: object) -> bool:
    if not is_op(node, *MOVEMENT):
        return False
    if node.target is aten.slice.Tensor:  # only a slice that keeps everything moves nothing out
        start, end, step = list(node.args[2:]) + [None, None, 1][len(node.args) - 2:]
        return start in (0, None) and (end is None or end >= FULL_SLICE_END) and step == 1
    return True


def _is_cache_write(node: object) -> bool:
    return is_op(node, CACHE_WRITE) and node.args[0].op == "placeholder"


def _through_movement(node: object) -> object:
    """The producer above a chain of movement ops and cache writes (followed to the values written), each the
    only reader of its input (else None: folding into the producer would change its other readers)."""
    while _is_movement(node) or _is_cache_write(node):
        source = node.args[3] if _is_cache_write(node) else node.args[0]
        if len(source.users) != 1:
            return None
        node = source
    return node


def layernorm(x: Node, takes_factors: Callable[[Node], bool] = act_quantized) -> Source | Miss | None:
    """``layer_norm(h, w, b)``: divide the stored ``w`` (and ``b``)."""
    norm = match_layer_norm(x)
    if not isinstance(norm, LayerNorm):
        return norm
    if not is_stored(norm.weight) or (norm.bias is not None and not is_stored(norm.bias)):
        return Miss("the LayerNorm has no stored affine weight to fold the smoothing into")
    folds = [(x, norm.weight)] + ([(x, norm.bias)] if norm.bias is not None else [])
    return _source(x, folds, True, takes_factors)


def rmsnorm(x: Node, takes_factors: Callable[[Node], bool] = act_quantized) -> Source | Miss | None:
    """Llama's RMSNorm ``w * normed``: divide the stored ``w``."""
    norm = match_rms_norm(x)
    return _source(x, [(x, norm.weight)], True, takes_factors) if isinstance(norm, RMSNorm) else norm


def _linear_rows(linear: object, what: str) -> list[tuple[Node, Node]] | Miss:
    """The (reader, stored tensor) folds that divide a linear's output channels."""
    if not is_op(linear, LINEAR) or not is_stored(linear.args[1]) or len(linear.users) != 1:
        return Miss(f"the {what} is not a linear with a stored weight read only there")
    bias = linear.args[2] if len(linear.args) > 2 else None
    if bias is not None and not is_stored(bias):
        return Miss(f"the {what}'s bias is computed at run time")
    return [(linear, linear.args[1])] + ([(linear, bias)] if bias is not None else [])


def _gated(x: Node, activation: str, what: str, takes_factors: Callable[[Node], bool]) -> Source | Miss | None:
    """``activation(gate) * up``: dividing up_proj's output rows divides x exactly (the activation is not touched)."""
    gated = match_gated_activation(x, activation)
    if not isinstance(gated, GatedActivation):
        return gated
    folds = _linear_rows(gated.up, f"{what}'s up projection")
    return _source(x, folds, False, takes_factors) if isinstance(folds, list) else folds


def swiglu(x: Node, takes_factors: Callable[[Node], bool] = act_quantized) -> Source | Miss | None:
    """``silu(gate) * up`` (Llama's MLP)."""
    return _gated(x, "silu", "SwiGLU", takes_factors)


def geglu(x: Node, takes_factors: Callable[[Node], bool] = act_quantized) -> Source | Miss | None:
    """``gelu(gate) * up`` (Gemma's MLP)."""
    return _gated(x, "gelu", "GeGLU", takes_factors)


def attention(x: Node, takes_factors: Callable[[Node], bool] = act_quantized) -> Source | Miss | None:
    """The attention output: its channels are V's channels (head-major), each head a mix of V's rows."""
    sdpa = _through_movement(x)
    if not is_op(sdpa, SDPA):
        return None
    if len(sdpa.users) != 1 or x.meta.get("val") is None or sdpa.args[2].meta.get("val") is None:
        return Miss("the attention output is read elsewhere or has no shape")
    value = _through_movement(sdpa.args[2])
    folds = _linear_rows(value, "attention's value projection")
    if not isinstance(folds, list):
        return folds
    head_dim = sdpa.args[2].meta["val"].shape[-1]
    channels, v_channels = x.meta["val"].shape[-1], value.meta["val"].shape[-1]
    if channels % head_dim or v_channels % head_dim or channels % v_channels:
        return Miss(f"attention channels {channels} / value channels {v_channels} do not split into heads of "
                    f"{head_dim}")
    return _source(x, folds, False, takes_factors, shared_by=channels // v_channels, head_dim=int(head_dim))


def smoothing_factors(absmax: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-channel factors s = absmax**alpha / w_max**(1-alpha); 1 where a channel is all zero."""
    factors = absmax.clamp_min(1e-5) ** alpha / w_max.clamp_min(1e-5) ** (1 - alpha)
    return torch.where((absmax > 0) & (w_max > 0), factors, torch.ones_like(factors))


def fold(gm: GraphModule, source: Source, factors: torch.Tensor, suffix: str) -> torch.Tensor:
    """Divide x's producer by ``factors`` (one per channel of the folds) and multiply the readers' weight columns
    by them: the same function in floating point. New tensors are named ``<old>_<suffix>``; returns the factors
    per channel of x. Smoothing and AWQ (passes/awq_scale_weights.py) both fold through here."""
    for reader, param in source.folds:
        value = get_attr_tensor(gm, param)
        per_channel = factors.reshape(-1, *([1] * (value.dim() - 1)))  # output channels are the first dim
        replace_stored(gm, reader, param, (value.float() / per_channel).to(value.dtype), suffix)
    for reader in source.readers:
        weight = get_attr_tensor(gm, reader.args[1])
        replace_stored(gm, reader, reader.args[1], (weight.float() * source.expand(factors)).to(weight.dtype),
                       suffix)
    return source.expand(factors)


def restore_for(gm: GraphModule, x: Node, others: list[Node], factors: torch.Tensor, suffix: str) -> None:
    """Give the non-linear readers of a folded norm (post-LN BERT's residual) ``x * s``: the value they read
    before. Costs one elementwise multiply, which only smoothing / AWQ recipes pay."""
    target = f"{x.name}_{suffix}_factors"
    set_attr_tensor(gm, target, factors.to(x.meta["val"].dtype))
    with gm.graph.inserting_after(x):
        stored = gm.graph.get_attr(target)
    with gm.graph.inserting_after(stored):
        restored = gm.graph.call_function(aten.mul.Tensor, (x, stored))
    restored.meta["val"] = x.meta["val"]
    for reader in others:
        reader.replace_input_with(x, restored)


def check_same_function(gm: GraphModule, inputs: list, expected: list, what: str, fallback: str) -> None:
    """A fold is exact in floating point: the graph must still give ``expected`` on ``inputs``."""
    with torch.no_grad():
        for args, before in zip(inputs, expected):
            got = gm(*args)
            for a, b in zip(torch.utils._pytree.tree_leaves(before), torch.utils._pytree.tree_leaves(got)):
                if not (isinstance(a, torch.Tensor) and a.is_floating_point()):
                    continue
                tolerance = 1e-3 if a.dtype == torch.float32 else 3e-2
                error = (a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-6)
                if error > tolerance:
                    raise ZQError(f"{what} changed the model's outputs (max relative difference {error:.2e}); "
                                  f"this is a zqcompile bug, please report it; {fallback} meanwhile")


def _smooth(gm: GraphModule, ctx: CompileContext, x: Node, source: Source) -> None:
    absmax = source.reduce(ctx.activation_absmax[x.name])
    w_max = torch.stack([get_attr_tensor(gm, r.args[1]).detach().abs().amax(0).float() for r in source.readers])
    factors = fold(gm, source, smoothing_factors(absmax, source.reduce(w_max.amax(0)), ctx.recipe.smooth_alpha),
                   "smoothed")
    if source.others:
        restore_for(gm, x, source.others, factors, "smoothing")


MATCHERS = (layernorm, rmsnorm, swiglu, geglu, attention)  # AWQ matches the same producers, with its own readers
RULES: tuple[Rule[Source], ...] = tuple(Rule(match.__name__, match, _smooth) for match in MATCHERS)


def smooth_activations(gm: GraphModule, ctx: CompileContext) -> PassResult:
    if ctx.recipe.smooth_alpha is None:
        return PassResult(gm, False)
    applied = apply_rules(gm, ctx, [n for n in gm.graph.nodes if n.name in ctx.activation_absmax], RULES,
                          "smooth", lambda x: f"it comes from {x.target}, which no smoothing rule covers")
    ctx.smooth_skipped.update(applied.misses)
    counters = applied.counters
    counters.update("smooth.residual_restored" for source in applied.matches if source.others)
    if counters:
        gm.recompile()
        check_same_function(gm, ctx.calibration_inputs, ctx.calibration_outputs, "smoothing",
                            "set smooth_alpha: null")
    return PassResult(gm, bool(counters), counters)
