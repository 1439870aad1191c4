"""fuse_kv_cache_write: the KV-cache write of a layer's new keys and values folded into its rotary embedding kernel.

Matches, in the generation graph (zqcompile/kv_cache.py: the cache tensors are graph inputs written in place), an
attention whose keys and values are the cache writes ``index_copy_(key_cache, 2, cache_position, k_rot)`` and
``index_copy_(value_cache, 2, cache_position, v)`` (read directly or through layout ops), where ``k_rot`` is the
keys output of the layer's ``zq.rotary_embedding(q, k, cos, sin)`` (``fuse_rotary_embedding``) and nothing else
reads it. Unfused, the GPU runs the rotary kernel (writing k_rot), then one ``index_copy_`` kernel per cache.

Emits ``zq.rotary_embedding_kv_cache(q, k, v, cos, sin, key_cache, value_cache, cache_position)`` at the earlier of
the two writes: one kernel that rotates the queries and keys and writes the rotated keys and the values at their
slots; it returns the rotated queries, and the readers of the writes read the caches themselves (``index_copy_``
returns its first argument). The values written and read are the same.

Refuses (the reason is kept in ``ctx.target_skipped`` for ``inspect``) writes at different positions or along
another dim, rotated keys read elsewhere, a values tensor computed after the first write, rotated queries read
before it, and any other node that reads or writes either cache between the two writes (the fused op writes
both at once).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from zqcompile.passes.infra import CompileContext, PassResult, call_with_value, is_op
from zqcompile.passes.patterns import SDPA, Miss, Rule, apply_target_rules, through_layout

aten = torch.ops.aten
_ROTARY = torch.ops.zq.rotary_embedding.default
_FUSED = torch.ops.zq.rotary_embedding_kv_cache.default
_WRITE = aten.index_copy_.default


@dataclass(frozen=True)
class CacheWrite:
    """One layer's rotary embedding and its two cache writes (keys first)."""

    rotary: Node
    key_write: Node
    value_write: Node


def _sdpa_arg(node: Node, position: int, name: str) -> object:
    return node.kwargs.get(name, node.args[position] if len(node.args) > position else None)


def match_cache_write(sdpa: Node) -> CacheWrite | Miss | None:
    if not is_op(sdpa, SDPA):
        return None
    key_write, value_write = (through_layout(_sdpa_arg(sdpa, i, name)) for i, name in ((1, "key"), (2, "value")))
    if not (is_op(key_write, _WRITE) and is_op(value_write, _WRITE)):
        return None
    k_rot = key_write.args[3]
    if not (is_op(k_rot, operator.getitem) and k_rot.args[1] == 1 and is_op(k_rot.args[0], _ROTARY)):
        return Miss("the keys written to the cache are not the output of a fused rotary embedding")
    rotary = k_rot.args[0]
    if key_write.args[1:3] != value_write.args[1:3] or key_write.args[1] != 2:
        return Miss("keys and values are written at different positions, or not along the sequence dim 2")
    if len(k_rot.users) != 1 or any(u.target is not operator.getitem for u in rotary.users):
        return Miss("the rotated keys are read elsewhere than by the cache write")
    order = {n: i for i, n in enumerate(sdpa.graph.nodes)}
    first, last = sorted((key_write, value_write), key=order.__getitem__)
    value = value_write.args[3]
    if order[value] > order[first]:
        return Miss("the values are computed after the keys are written")
    queries = [u for u in rotary.users if u.args[1] == 0]
    if any(order[reader] < order[first] for q in queries for reader in q.users):
        return Miss("the rotated queries are read before the cache writes")
    touched = {u for cache in (key_write.args[0], value_write.args[0], key_write, value_write) for u in cache.users}
    if any(order[first] < order[u] < order[last] for u in touched):
        return Miss("a node between the two cache writes reads or writes a cache")
    return CacheWrite(rotary, key_write, value_write)


def _emit(gm: GraphModule, match: CacheWrite) -> None:
    q, k, cos, sin = match.rotary.args
    key_cache, _, positions, _ = match.key_write.args
    value_cache, _, _, value = match.value_write.args
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    with gm.graph.inserting_before(min(match.key_write, match.value_write, key=order.__getitem__)):
        fused = call_with_value(gm, _FUSED, q, k, value, cos, sin, key_cache, value_cache, positions)
    for write in (match.key_write, match.value_write):
        write.replace_all_uses_with(write.args[0])
        gm.graph.erase_node(write)
    for output in list(match.rotary.users):
        if output.args[1] == 0:
            output.replace_all_uses_with(fused)
        gm.graph.erase_node(output)
    gm.graph.erase_node(match.rotary)


RULES = (Rule("rotary_and_cache_write", match_cache_write, lambda gm, ctx, node, match: _emit(gm, match)),)


def fuse_kv_cache_write(gm: GraphModule, ctx: CompileContext | None) -> PassResult:
    sdpa = [n for n in gm.graph.nodes if is_op(n, SDPA)]
    return apply_target_rules(gm, ctx, sdpa, RULES, "fuse_kv_cache_write")
