"""smooth_activations: move per-channel activation outliers from a norm's output into the linears reading it.

SmoothQuant (Xiao et al., 2023) on top of ZeroQuant. Token-wise INT8 quantization of a LayerNorm/RMSNorm
output loses precision when a few channels are far larger than the rest, as in every block of Llama-family
models. Dividing the norm's scale (and bias) by a per-channel factor ``s`` and multiplying the readers' weight
columns by ``s`` computes the same function in floating point, while the quantized activation gets flatter
channels; ``s_j = absmax(x_j)**alpha / max_i |W_ij|**(1 - alpha)`` balances the two (alpha = recipe
``smooth_alpha``). The weights are quantized afterwards, so their scales see the smoothed values.

Matches an activation ``x`` that only act-quantized linears (plan ``act_bits == 8``) with stored weights read,
where ``x`` is ``layer_norm(h, w, b)`` with a stored ``w``, Llama's RMSNorm ``w * normed``, or SwiGLU's
``silu(gate) * up`` with ``up`` a linear read only there (its weight rows take the division; the fusion
pass's matchers find all three), and ``ctx.activation_absmax`` holds its per-channel absmax (from ``calibrate_activations``).
Emits new buffers for the norm's weight/bias and for each linear's weight; an original stays while anything
else reads it (a tied embedding). Refuses, recording why in ``ctx.smooth_skipped``, when ``x`` has another
reader (post-LN BERT feeds its LayerNorm output to the residual too, which folding would change) or the norm
has no stored scale. Does nothing when ``smooth_alpha`` is None (the default, plain ZeroQuant).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from zqcompile.passes.fuse_quant_into_elementwise import Fusion, _layer_norm_parts, rmsnorm, silu_mul
from zqcompile.passes.infra import (
    META_PLAN, CompileContext, PassResult, drop_if_unused, get_attr_tensor, is_op, set_attr_tensor,
)

LINEAR = torch.ops.aten.linear.default


def _stored(node: object) -> Node | None:
    return node if isinstance(node, Node) and node.op == "get_attr" else None


# (reader, stored tensor it reads): the tensor's output channels (its last dim for a norm's [K] scale and
# bias, its rows for a linear's [K, in] weight) get divided by the smoothing factors.
Folds = list[tuple[Node, Node]]


def _silu_mul_up(x: Node) -> tuple[str, Folds] | str | None:
    """SwiGLU ``silu(gate) * up``: dividing up_proj's output rows divides x (exactly, silu is not touched)."""
    fusion = silu_mul(x)
    if not isinstance(fusion, Fusion):
        return fusion
    up = fusion.args[1]
    if not is_op(up, LINEAR) or _stored(up.args[1]) is None or len(up.users) != 1:
        return "the SwiGLU's up projection is not a linear with a stored weight read only there"
    bias = up.args[2] if len(up.args) > 2 else None
    if bias is not None and _stored(bias) is None:
        return "the up projection's bias is computed at run time"
    return "swiglu", [(up, up.args[1])] + ([(up, bias)] if bias is not None else [])


def _foldable_source(x: Node) -> tuple[str, Folds] | str | None:
    """(kind, the stored tensors to divide), a reason x cannot be smoothed, or None if no rule knows x."""
    parts = _layer_norm_parts(x)
    if isinstance(parts, tuple):
        _, (weight, bias, _) = parts
        if _stored(weight) is None or (bias is not None and _stored(bias) is None):
            return "the LayerNorm has no stored affine weight to fold the smoothing into"
        return "layernorm", [(x, weight)] + ([(x, bias)] if bias is not None else [])
    if isinstance(parts, str):
        return parts
    fusion = rmsnorm(x)
    if isinstance(fusion, Fusion):
        return "rmsnorm", [(x, fusion.args[1])]  # x = weight * normed
    return fusion or _silu_mul_up(x)


def _replace_stored(gm: GraphModule, reader: Node, old: Node, tensor: torch.Tensor) -> None:
    """Give ``reader`` a new buffer in place of the get_attr ``old`` (dropped once nothing reads it)."""
    target = f"{old.target}_smoothed"
    set_attr_tensor(gm, target, tensor.detach())  # a constant of the graph, like the weights it replaces
    with gm.graph.inserting_before(reader):
        new = gm.graph.get_attr(target)
    new.meta = dict(old.meta)
    reader.replace_input_with(old, new)
    drop_if_unused(gm, old)


def smoothing_factors(absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Per-input-channel factors s = absmax**alpha / wmax**(1-alpha); 1 where a channel is all zero."""
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    factors = absmax.clamp_min(1e-5) ** alpha / w_max.clamp_min(1e-5) ** (1 - alpha)
    return torch.where((absmax > 0) & (w_max > 0), factors, torch.ones_like(factors))


def smooth_activations(gm: GraphModule, ctx: CompileContext) -> PassResult:
    alpha = ctx.recipe.smooth_alpha
    if alpha is None:
        return PassResult(gm, False)
    counts: dict[str, int] = {}
    for x in [n for n in gm.graph.nodes if n.name in ctx.activation_absmax]:
        readers = list(x.users)
        if not all(is_op(r, LINEAR) and r.args[0] is x and r.meta[META_PLAN].act_bits == 8
                   and _stored(r.args[1]) is not None for r in readers):
            ctx.smooth_skipped[x.name] = (f"its output is also read by non-quantized nodes "
                                          f"{[r.name for r in readers if not is_op(r, LINEAR)]}")
            continue
        source = _foldable_source(x)
        if not isinstance(source, tuple):
            ctx.smooth_skipped[x.name] = source or f"it comes from {x.target}, not a LayerNorm, RMSNorm or SwiGLU"
            continue
        kind, folds = source
        factors = smoothing_factors(ctx.activation_absmax[x.name],
                                    [get_attr_tensor(gm, r.args[1]) for r in readers], alpha)
        for reader, param in folds:
            value = get_attr_tensor(gm, param)
            per_channel = factors.reshape(-1, *([1] * (value.dim() - 1)))  # channels are the first dim
            _replace_stored(gm, reader, param, (value.float() / per_channel).to(value.dtype))
        for reader in readers:
            weight = get_attr_tensor(gm, reader.args[1])
            _replace_stored(gm, reader, reader.args[1], (weight.float() * factors).to(weight.dtype))
        counts[f"smooth.{kind}"] = counts.get(f"smooth.{kind}", 0) + 1
    return PassResult(gm, bool(counts), counts)
