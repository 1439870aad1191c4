"""fuse_rotary_embedding: the rotary position embedding of a layer's queries and keys as one ``zq.rotary_embedding``.

Matches Hugging Face's ``apply_rotary_pos_emb`` (Llama, Qwen2, Mistral...) as export writes it, for the queries and
for the keys: ``add(mul(x, cos), mul(cat([neg(x[..., D/2:]), x[..., :D/2]], -1), sin))`` (either operand order),
x ``[B, H, S, D]`` with an even D, cos and sin ``[B or 1, 1, S or 1, D]`` of x's dtype. Eager torch runs it as
about seven kernels per tensor (two slices feed a concatenation, a negation, two products, a sum) and reads x
four times; the op computes both tensors of a layer in one launch (zqcompile/backends/numba_cuda), rounding each
product and the sum to x's dtype as eager torch does, so its outputs are the same values.

Emits, for two matches that follow each other in the graph with the same cos and sin (a layer's queries and
keys), one ``zq.rotary_embedding(q, k, cos, sin)`` before the later of the two sums, and its two outputs in
place of the sums.

Refuses (the reason is kept in ``ctx.target_skipped`` for ``inspect``) cos/sin that differ per head or whose
dtype or last dim differs from x's, shapes export did not record, and a match without a partner (no adjacent
match with the same cos and sin, or a reader of the first sum that comes before the second).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from zqcompile.passes.infra import CompileContext, PassResult, call_with_value, is_op
from zqcompile.passes.patterns import Miss, operand, recorded_shape, same_shape

aten = torch.ops.aten
_ROTARY = torch.ops.zq.rotary_embedding.default


@dataclass(frozen=True)
class Rotary:
    """``add`` = x * cos + rotate_half(x) * sin."""

    add: Node
    x: Node
    cos: Node
    sin: Node


def _last_dim_slice(node: object, start: int, end_at_least: int) -> Node | None:
    """x for ``x[..., start:end]`` (step 1, end at least ``end_at_least``), else None."""
    if not is_op(node, aten.slice.Tensor) or recorded_shape(node.args[0]) is None:
        return None
    x, dim, begin, end, step = [*node.args, *(0, None, None, 1)[len(node.args) - 1:]][:5]
    rank = len(recorded_shape(x))
    if not all(isinstance(v, int) for v in (dim, begin or 0, end, step)):  # symbolic bounds: not HF's rotate_half
        return None
    if dim % rank != rank - 1 or (begin or 0) != start or step != 1 or end < end_at_least:
        return None
    return x


def rotate_half_input(node: object) -> Node | None:
    """x for HF's ``rotate_half(x) = cat([-x[..., D/2:], x[..., :D/2]], -1)`` with a static, even D."""
    if not is_op(node, aten.cat.default) or len(node.args[0]) != 2 or not is_op(node.args[0][0], aten.neg.default):
        return None
    high, low = node.args[0][0].args[0], node.args[0][1]
    x = _last_dim_slice(low, 0, 0)
    shape = recorded_shape(x)
    if x is None or not isinstance(shape[-1], int) or shape[-1] % 2:
        return None
    half = shape[-1] // 2
    dim = node.args[1] if len(node.args) > 1 else 0
    if _last_dim_slice(high, half, shape[-1]) is not x or dim % len(shape) != len(shape) - 1:
        return None
    return x if low.args[3] == half else None


def match_rotary(node: Node) -> Rotary | Miss | None:
    if not is_op(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs:
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        by_sin = operand(rotated, aten.mul.Tensor, lambda a: rotate_half_input(a) is not None)
        if by_sin is None:
            continue
        x, sin = rotate_half_input(by_sin[0]), by_sin[1]
        by_cos = operand(plain, aten.mul.Tensor, lambda a: a is x)
        if by_cos is None:
            continue
        cos = by_cos[1]
        x_shape, cos_shape = recorded_shape(x), recorded_shape(cos)
        if len(x_shape) != 4 or cos_shape is None or not same_shape(cos, sin):
            return Miss("queries/keys are not [B, H, S, D] or cos/sin shapes differ or were not recorded")
        if (len(cos_shape) != 4 or str(cos_shape[1]) != "1" or str(cos_shape[3]) != str(x_shape[3])
                or str(cos_shape[0]) not in ("1", str(x_shape[0])) or str(cos_shape[2]) not in ("1", str(x_shape[2]))):
            return Miss(f"cos/sin {cos_shape} do not broadcast over the heads of x {x_shape} as [B, 1, S, D]")
        dtypes = {n.meta["val"].dtype for n in (x, cos, sin, node)}
        if len(dtypes) > 1:
            return Miss(f"x, cos, sin and the result have different dtypes {sorted(map(str, dtypes))}")
        return Rotary(node, x, cos, sin)
    return None


def _pairs(gm: GraphModule, matches: list[Rotary]) -> tuple[list[tuple[Rotary, Rotary]], dict[str, str]]:
    """Adjacent matches with the same cos and sin whose first sum is read only after the second."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pairs, lone, i = [], {}, 0
    while i < len(matches):
        first, second = matches[i], matches[i + 1] if i + 1 < len(matches) else None
        if (second is not None and (first.cos, first.sin) == (second.cos, second.sin)
                and [str(d) for d in recorded_shape(first.x)[::2]] == [str(d) for d in recorded_shape(second.x)[::2]]
                and all(order[user] > order[second.add] for user in first.add.users)):
            pairs.append((first, second))
            i += 2
        else:
            lone[first.add.name] = "no partner (the next rotary embedding uses other cos/sin or shapes, or the " \
                                   "first result is read before the second is computed)"
            i += 1
    return pairs, lone


def fuse_rotary_embedding(gm: GraphModule, ctx: CompileContext | None) -> PassResult:
    matches, reasons = [], {}
    for node in gm.graph.nodes:
        match = match_rotary(node)
        if isinstance(match, Miss):
            reasons[node.name] = match.reason
        elif match is not None:
            matches.append(match)
    pairs, lone = _pairs(gm, matches)
    replaced: dict[Node, Node] = {}  # a sum already replaced, which a later match may rotate again
    for q, k in pairs:
        with gm.graph.inserting_before(k.add):
            fused = call_with_value(gm, _ROTARY, replaced.get(q.x, q.x), replaced.get(k.x, k.x), q.cos, q.sin)
            for index, rotary in enumerate((q, k)):
                replaced[rotary.add] = call_with_value(gm, operator.getitem, fused, index)
                rotary.add.replace_all_uses_with(replaced[rotary.add])
    if ctx is not None:
        ctx.target_skipped.update({name: f"fuse_rotary_embedding: {why}" for name, why in {**reasons, **lone}.items()})
    return PassResult(gm, bool(pairs), Counter({"fuse_rotary_embedding.pairs": len(pairs)}))
