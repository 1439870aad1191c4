"""grouped_query_attention: attention over the KV heads as stored, without repeating the cache per query head.

Matches ``aten.scaled_dot_product_attention`` whose key and value are Hugging Face's ``repeat_kv`` of a
``[B, kv, L, D]`` tensor (the static KV cache in the generation graph, the projected keys/values in the
forward graph): ``x[:, :, None].expand(B, kv, rep, L, D).reshape(B, kv * rep, L, D)``, as export writes it
(``unsqueeze(2)``, ``expand``, an optional ``clone``, ``reshape`` / ``view``, with full-range ``slice`` no-ops
anywhere before the expand). Query head ``h`` then reads KV head ``h // rep``. The repeat copies the whole
cache twice per layer and step (keys and values); attention can read the KV heads in place instead.

Emits, for SDPA with a mask whose head dim is 1 (or no mask) and no ``is_causal`` — every SDPA of zqcompile's
captured decoders — the query heads folded into the query length: ``q [B, kv*rep, S, D]`` viewed as
``[B, kv, rep*S, D]`` (query head ``g*rep + r`` at rows ``r*S ..``), SDPA on the un-repeated keys/values, the
output unfolded back to ``[B, kv*rep, S, D]``; a mask ``[B, 1, S, L]`` is repeated along the folded rows
(``[B, 1, rep*S, L]``, once per mask: a view when S is 1, as in a decode step). Each query row's softmax reads
the same scores as before, so the values are the same. For ``is_causal`` without a mask (folding would move
the causal diagonal) it emits SDPA on the un-repeated keys/values with ``enable_gqa=True`` (query head ``h``
reads KV head ``h // rep``, torch's ``repeat_interleave`` order: the same as ``repeat_kv``).

Why the fold and not ``enable_gqa=True`` everywhere: in torch 2.11 (the GPU image) only the flash (and cuDNN)
SDPA backends take ``enable_gqa``; flash takes no attention mask and memory-efficient attention takes no GQA
(added later, pytorch/pytorch#191085), so a masked ``enable_gqa`` SDPA falls back to the math backend, which
``repeat_interleave``-s the cache (the copy this pass removes) and materialises the scores (transformers' own
``use_gqa_in_sdpa`` passes ``enable_gqa`` on CUDA only without a mask for the same reason). The folded SDPA is
an ordinary one: flash, memory-efficient or cuDNN attention run it on the cache in place.

Refuses (the reason is kept in ``ctx.target_skipped`` for ``inspect``) a repeat in another order (``x[:, None]``:
head ``h`` reads KV head ``h % kv``), keys and values repeated differently or only one of them, a mask that
differs per head (its head dim is not 1), dropout, an SDPA that already sets ``enable_gqa``, and shapes export
did not record or recorded as symbolic head counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from zqcompile.passes.infra import CompileContext, PassResult, call_with_value, is_op
from zqcompile.passes.patterns import Miss, Rule, apply_target_rules, recorded_shape

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


@dataclass(frozen=True)
class RepeatKV:
    """``source [B, kv, L, D]`` repeated ``rep`` times per head, HF's order."""

    source: Node
    kv_heads: int
    rep: int


@dataclass(frozen=True)
class GroupedAttention:
    """An SDPA over repeated keys/values: its arguments, with key/value the un-repeated sources."""

    sdpa: Node
    args: dict[str, Any]
    kv_heads: int
    rep: int


def _same_dims(a: list, b: list) -> bool:
    return len(a) == len(b) and [str(d) for d in a] == [str(d) for d in b]


def _is_full_slice(node: object) -> bool:
    """``x[:, ...]``: a slice from 0 with step 1 whose result has x's shape (it keeps every element)."""
    if not is_op(node, aten.slice.Tensor):
        return False
    start = node.args[2] if len(node.args) > 2 else None
    step = node.args[4] if len(node.args) > 4 else 1
    shape, source = recorded_shape(node), recorded_shape(node.args[0])
    return start in (0, None) and step == 1 and shape is not None and source is not None and _same_dims(shape, source)


def _skip_full_slices(node: object) -> object:
    while _is_full_slice(node):
        node = node.args[0]
    return node


def match_repeat_kv(node: object) -> RepeatKV | Miss | None:
    """HF's ``repeat_kv(x, rep)`` as export writes it, or None when ``node`` is not an expand-and-reshape."""
    if not is_op(node, *_RESHAPES):
        return None
    expand = node.args[0]
    if is_op(expand, aten.clone.default):
        expand = expand.args[0]
    if not is_op(expand, aten.expand.default):
        return None
    unsqueeze = _skip_full_slices(expand.args[0])
    if not is_op(unsqueeze, aten.unsqueeze.default):
        return None
    source = _skip_full_slices(unsqueeze.args[0])
    src, expanded, out = recorded_shape(source), recorded_shape(expand), recorded_shape(node)
    if src is None or expanded is None or out is None or len(src) != 4 or len(expanded) != 5 or len(out) != 4:
        return Miss("the repeated keys/values are not [B, heads, L, D] tensors with recorded shapes")
    if unsqueeze.args[1] % 5 != 2:
        return Miss(f"keys/values repeated along dim {unsqueeze.args[1]} of the unsqueezed tensor, not dim 2 "
                    f"(HF's repeat_kv: query head h reads KV head h // rep)")
    kv, rep = expanded[1], expanded[2]
    if not isinstance(kv, int) or not isinstance(rep, int):
        return Miss("symbolic KV head count or repeat")
    if (not _same_dims(expanded[:2] + expanded[3:], src) or str(out[1]) != str(kv * rep)
            or not _same_dims([out[0], *out[2:]], [src[0], *src[2:]])):
        return Miss(f"expand {expanded} / reshape {out} of {src} is not a repeat of each KV head")
    return RepeatKV(source, kv, rep)


def _sdpa_args(node: Node) -> dict[str, Any]:
    return {**_SDPA_DEFAULTS, **dict(zip(_SDPA_ARGS, node.args)), **node.kwargs}


def match_grouped_attention(node: Node) -> GroupedAttention | Miss | None:
    args = _sdpa_args(node)
    key, value = match_repeat_kv(args["key"]), match_repeat_kv(args["value"])
    if key is None and value is None:
        return None
    for part in (key, value):
        if isinstance(part, Miss):
            return part
    if key is None or value is None or (key.kv_heads, key.rep) != (value.kv_heads, value.rep):
        return Miss("keys and values are not repeated alike")
    if args["enable_gqa"] or args["dropout_p"] != 0.0:
        return Miss("SDPA already sets enable_gqa or applies dropout")
    if args["is_causal"] and args["attn_mask"] is not None:
        return Miss("SDPA sets both is_causal and a mask")
    query, mask = recorded_shape(args["query"]), recorded_shape(args["attn_mask"])
    if query is None or len(query) != 4 or str(query[1]) != str(key.kv_heads * key.rep):
        return Miss(f"query {query} does not have the {key.kv_heads * key.rep} repeated heads")
    if args["attn_mask"] is not None and (mask is None or len(mask) != 4 or str(mask[1]) != "1"):
        return Miss(f"the mask {mask} is not [B, 1, S, L]: it differs per head (or its shape was not recorded)")
    return GroupedAttention(node, {**args, "key": key.source, "value": value.source}, key.kv_heads, key.rep)


def _emit_folded(gm: GraphModule, folded_masks: dict[tuple[Node, int], Node], match: GroupedAttention) -> None:
    args, rep = match.args, match.rep
    mask = args["attn_mask"]
    with gm.graph.inserting_before(match.sdpa):
        if mask is not None and str(recorded_shape(mask)[2]) != "1":
            if (mask, rep) not in folded_masks:  # once per mask: every layer reads the same one
                unsqueezed = call_with_value(gm, aten.unsqueeze.default, mask, 2)
                repeated = call_with_value(gm, aten.expand.default, unsqueezed, [-1, -1, rep, -1, -1])  # rows per head
                folded_masks[mask, rep] = call_with_value(gm, aten.flatten.using_ints, repeated, 2, 3)
            mask = folded_masks[mask, rep]
        grouped = call_with_value(gm, aten.unflatten.int, args["query"], 1, [match.kv_heads, rep])
        query = call_with_value(gm, aten.flatten.using_ints, grouped, 2, 3)
        attention = call_with_value(gm, _SDPA, query, args["key"], args["value"], mask, scale=args["scale"])
        heads = call_with_value(gm, aten.unflatten.int, attention, 2, [rep, -1])
        out = call_with_value(gm, aten.flatten.using_ints, heads, 1, 2)
    match.sdpa.replace_all_uses_with(out)
    gm.graph.erase_node(match.sdpa)


def _emit_enable_gqa(gm: GraphModule, match: GroupedAttention) -> None:
    args = match.args
    with gm.graph.inserting_before(match.sdpa):
        out = call_with_value(gm, _SDPA, args["query"], args["key"], args["value"], is_causal=True,
                              scale=args["scale"], enable_gqa=True)
    match.sdpa.replace_all_uses_with(out)
    gm.graph.erase_node(match.sdpa)


def grouped_query_attention(gm: GraphModule, ctx: CompileContext | None) -> PassResult:
    folded_masks: dict[tuple[Node, int], Node] = {}

    def folded(node: Node) -> GroupedAttention | Miss | None:
        match = match_grouped_attention(node)
        return None if isinstance(match, GroupedAttention) and match.args["is_causal"] else match

    def causal(node: Node) -> GroupedAttention | None:
        match = match_grouped_attention(node)
        return match if isinstance(match, GroupedAttention) and match.args["is_causal"] else None

    rules = (Rule("fold_query_heads", folded, lambda gm, ctx, node, m: _emit_folded(gm, folded_masks, m)),
             Rule("enable_gqa", causal, lambda gm, ctx, node, m: _emit_enable_gqa(gm, m)))
    sdpa = [n for n in gm.graph.nodes if is_op(n, _SDPA)]
    return apply_target_rules(gm, ctx, sdpa, rules, "grouped_query_attention")
