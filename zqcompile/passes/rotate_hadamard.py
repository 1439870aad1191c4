"""rotate_hadamard: rotate activations so that no channel is an outlier, exactly in floating point (QuaRot).

Llama-family activations have a few channels far larger than the rest; token-wise INT8 spends its range on
them. An orthogonal rotation ``Q`` spreads every channel over all of them and changes nothing in floating
point when it is folded into the weights on both sides (QuaRot, Ashkboos et al. 2024; SpinQuant). Two parts,
when the recipe sets ``rotate``:

1. **The residual stream** (RMSNorm models). From each token embedding, through casts and residual adds, the
   hidden state ``r`` is carried as ``r Q``. Writers into the stream get ``Q`` folded in: an embedding table
   ``E Q`` (when nothing else reads the table), a linear writing into a residual add (o_proj, down_proj)
   ``Q^T W`` and ``b Q``. An RMSNorm reading the stream is rotation-invariant once its weight ``w`` is moved into
   the linears that read it (``W diag(w) Q``, the norm's weight becomes ones). A writer that cannot be folded
   (a computed value, a table shared with the LM head) is rotated online (``x @ Q``, one small GEMM); a reader
   that is neither (a norm whose reader's weight is shared with the embedding table, as with tied LM heads)
   gets the stream un-rotated online (``x @ Q^T``). ``Q = diag(signs) (O_m kron H_b)`` with ``H_b`` the
   normalised Hadamard matrix of the largest power of two ``b`` dividing the hidden size and ``O_m`` a random
   orthogonal ``m x m`` matrix (``m = hidden / b``), both from a fixed seed: no constant is tuned.
2. **The inputs of the output projections** (roles ``mlp_out``, ``attn_out``; any norm): the quantized
   linear reads ``zq.hadamard(x, b)`` (a fast Walsh-Hadamard transform over blocks of ``b``, the largest power
   of two dividing its input size, at least ``MIN_BLOCK``) and its weight columns are rotated the same way
   (``W H``; ``H`` is symmetric and orthogonal), so the SwiGLU output's and the heads' outlier channels are
   spread before quantization.

Refuses (recorded in ``ctx.rotate_skipped``, nothing changed for that part): a residual stream read by a
LayerNorm (it subtracts the mean, so it is not rotation-invariant: BERT, GPT-2), a stream with no
RMSNorm to fold, a projection kept in floating point, or one whose input size has no power-of-two block of
``MIN_BLOCK`` or more. The rotated weights are quantized afterwards, so their scales see the rotated values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from zqcompile.ops import hadamard_matrix
from zqcompile.passes.infra import (
    META_PLAN, META_ROLE, CompileContext, PassResult, drop_if_unused, get_attr_tensor, is_op, is_stored,
    set_attr_tensor,
)
from zqcompile.passes.patterns import Miss, Rule, RMSNorm, apply_rules, match_rms_norm

aten = torch.ops.aten
LINEAR = aten.linear.default
EMBEDDING = aten.embedding.default
MIN_BLOCK = 16  # a Hadamard block smaller than this hardly spreads an outlier
ROTATION_SEED = 0
ONLINE_ROLES = ("mlp_out", "attn_out")
FULL_SLICE_END = 2 ** 62
HARMLESS_USES = (aten.sym_size.int,)  # shape queries: the rotation keeps shapes
CASTS = (aten.to.dtype, aten.to.dtype_layout)


def power_of_two_block(n: int) -> int:
    """The largest power of two that divides ``n``."""
    return n & -n


def rotation_matrix(n: int, seed: int = ROTATION_SEED) -> torch.Tensor:
    """A seeded random orthogonal ``n x n`` matrix: ``diag(signs) (O_m kron H_b)``, float64 (see the docstring)."""
    block = power_of_two_block(n)
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n // block, n // block, generator=generator, dtype=torch.float64))
    orthogonal = (q * torch.sign(torch.diagonal(r))).contiguous()  # Haar-distributed
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * torch.kron(orthogonal, hadamard_matrix(block))


# ---- the residual stream ------------------------------------------------------------------------------

@dataclass
class Stream:
    """What carries the residual stream and what touches it (see the module docstring)."""

    members: set[Node] = field(default_factory=set)
    embeddings: list[Node] = field(default_factory=list)  # token embeddings starting the stream
    writers: list[Node] = field(default_factory=list)  # values added into the stream
    # RMSNorms reading the stream: norm output -> the (member, node inside the norm) pairs where it reads it
    norms: dict[Node, list[tuple[Node, Node]]] = field(default_factory=dict)
    exits: list[tuple[Node, Node]] = field(default_factory=list)  # (member, reader) read un-rotated

    def substitute(self, old: Node, new: Node) -> None:
        """``new`` carries the stream where ``old`` did (an online rotation of an embedding)."""
        self.members = (self.members - {old}) | {new}
        swap = lambda pair: (new if pair[0] is old else pair[0], pair[1])  # noqa: E731
        self.norms = {x: [swap(p) for p in pairs] for x, pairs in self.norms.items()}
        self.exits = [swap(p) for p in self.exits]


def _is_full_slice(node: object) -> bool:
    if not is_op(node, aten.slice.Tensor):
        return False
    start, end, step = list(node.args[2:]) + [None, None, 1][len(node.args) - 2:]
    return start in (0, None) and (end is None or end >= FULL_SLICE_END) and step == 1


def _same_last_dim(*args: object) -> bool:
    """Two tensors of the same channels (broadcasting over the leading dims is fine: Q acts on the last)."""
    return len(args) == 2 and all(isinstance(a, Node) and "val" in a.meta for a in args) \
        and str(args[0].meta["val"].shape[-1]) == str(args[1].meta["val"].shape[-1])


def _norm_interiors(gm: GraphModule) -> dict[Node, Node]:
    """{node inside an RMSNorm: the norm's output}; the interior stops at the norm's input and its casts."""
    interiors = {}
    for x in gm.graph.nodes:
        match = match_rms_norm(x)
        if not isinstance(match, RMSNorm):
            continue
        stop = {match.input} | {u for u in match.input.users if is_op(u, aten.to.dtype)}
        pending = [a for a in x.all_input_nodes if a is not match.weight]
        while pending:
            node = pending.pop()
            if node in stop or node.op != "call_function" or node in interiors:
                continue
            interiors[node] = x
            pending += node.all_input_nodes
    return interiors


def _linear_readers(x: Node) -> list[Node] | None:
    """The linears reading ``x`` (through full slices) as their input; None if anything else reads it."""
    readers = []
    for user in x.users:
        if _is_full_slice(user):
            inner = _linear_readers(user)
            if inner is None:
                return None
            readers += inner
        elif is_op(user, LINEAR) and user.args[0] is x and is_stored(user.args[1]) and x not in user.args[1:]:
            readers.append(user)
        else:
            return None
    return readers


def _shared(gm: GraphModule, stored: Node) -> bool:
    """Whether the tensor behind a get_attr is read anywhere else (a tied embedding / LM head)."""
    tensor = get_attr_tensor(gm, stored)
    others = [n for n in gm.graph.nodes if n.op == "get_attr" and n is not stored]
    return len(stored.users) > 1 or any(get_attr_tensor(gm, n).untyped_storage().data_ptr()
                                        == tensor.untyped_storage().data_ptr() for n in others)


def find_stream(gm: GraphModule) -> Stream | Miss:
    """Walk the residual stream from the token embeddings (see the module docstring)."""
    interiors = _norm_interiors(gm)
    stream = Stream()
    stream.embeddings = [n for n in gm.graph.nodes if is_op(n, EMBEDDING) and is_stored(n.args[0])]
    if not stream.embeddings:
        return Miss("no token embedding starts a residual stream")
    stream.members = set(stream.embeddings)
    pending = list(stream.embeddings)
    while pending:
        member = pending.pop()
        for user in member.users:
            if user in stream.members or is_op(user, *HARMLESS_USES):
                continue
            if user in interiors:
                stream.norms.setdefault(interiors[user], []).append((member, user))
            elif is_op(user, *CASTS):
                stream.members.add(user)
                pending.append(user)
            elif is_op(user, aten.add.Tensor) and _same_last_dim(*user.args) and not user.kwargs:
                other = user.args[1] if user.args[0] is member else user.args[0]
                if other not in stream.members:
                    stream.writers.append(other)
                stream.members.add(user)
                pending.append(user)
            elif is_op(user, aten.layer_norm.default):
                return Miss("a LayerNorm reads the residual stream; it subtracts the mean, so it is not "
                            "rotation-invariant (rotation needs RMSNorm models, the Llama family)")
            else:
                stream.exits.append((member, user))
    if not stream.norms:
        readers = sorted({getattr(user.target, "__name__", str(user.target)) for _, user in stream.exits})
        return Miss(f"no RMSNorm reads the residual stream (its readers: {', '.join(readers)})")
    stream.writers = [w for w in dict.fromkeys(stream.writers) if w not in stream.members]
    return stream


class _Rotator:
    """Folds ``Q`` into stored tensors and inserts online rotations, counting what it did."""

    def __init__(self, gm: GraphModule, q: torch.Tensor):
        self.gm, self.q, self.counters = gm, q, Counter()

    def _stored(self, target: str, tensor: torch.Tensor, where: Node, after: bool = False) -> Node:
        """A get_attr of a new buffer ``target`` holding ``tensor``, inserted before (or after) ``where``."""
        set_attr_tensor(self.gm, target, tensor.detach().contiguous())
        with (self.gm.graph.inserting_after(where) if after else self.gm.graph.inserting_before(where)):
            node = self.gm.graph.get_attr(target)
        return node

    def replace(self, reader: Node, stored: Node, tensor: torch.Tensor) -> None:
        """Give ``reader`` a new buffer in place of the get_attr ``stored``."""
        new = self._stored(f"{stored.target}_rotated", tensor.to(get_attr_tensor(self.gm, stored).dtype), stored)
        new.meta = {k: v for k, v in stored.meta.items() if k == "val"}
        reader.replace_input_with(stored, new)
        drop_if_unused(self.gm, stored)  # frees the unrotated tensor once nothing reads it

    def online(self, value: Node, matrix: torch.Tensor, readers: list[Node], kind: str) -> Node:
        """``readers`` read ``value @ matrix`` instead of ``value``; returns the product's node."""
        stored = self._stored(f"{value.name}_{kind}_rotation", matrix.to(value.meta["val"].dtype), value, after=True)
        with self.gm.graph.inserting_after(stored):
            rotated = self.gm.graph.call_function(aten.matmul.default, (value, stored))
        rotated.meta["val"] = value.meta["val"]
        for reader in readers:
            reader.replace_input_with(value, rotated)
        self.counters[f"rotate.online_{kind}"] += 1
        return rotated


def _rotate_stream(gm: GraphModule, stream: Stream, rotator: _Rotator) -> None:
    q = rotator.q
    for embedding in stream.embeddings:
        table = embedding.args[0]
        if _shared(gm, table):  # a tied LM head reads the table too: rotate the looked-up rows instead
            rotated = rotator.online(embedding, q, list(embedding.users), "entry")
            stream.substitute(embedding, rotated)
        else:
            rotator.replace(embedding, table, get_attr_tensor(gm, table).float() @ q)
            rotator.counters["rotate.embedding"] += 1
    for writer in stream.writers:
        bias = writer.args[2] if is_op(writer, LINEAR) and len(writer.args) > 2 else None
        if (is_op(writer, LINEAR) and len(writer.users) == 1 and is_stored(writer.args[1])
                and not _shared(gm, writer.args[1]) and (bias is None or is_stored(bias))):
            rotator.replace(writer, writer.args[1], q.T @ get_attr_tensor(gm, writer.args[1]).float())
            if bias is not None:
                rotator.replace(writer, bias, get_attr_tensor(gm, bias).float() @ q)
            rotator.counters["rotate.writer"] += 1
        else:
            rotator.online(writer, q, [u for u in writer.users if u in stream.members], "entry")
    for x, inputs in stream.norms.items():
        norm = match_rms_norm(x)
        readers = _linear_readers(x)
        if not isinstance(norm, RMSNorm) or readers is None or any(_shared(gm, r.args[1]) for r in readers):
            stream.exits += inputs  # the norm reads the stream un-rotated, its weight stays
            continue
        scale = get_attr_tensor(gm, norm.weight).float()
        for reader in readers:
            weight = get_attr_tensor(gm, reader.args[1]).float()
            rotator.replace(reader, reader.args[1], (weight * scale) @ q)
        rotator.replace(x, norm.weight, torch.ones_like(scale))
        rotator.counters["rotate.norm_folded"] += 1
    by_member: dict[Node, list[Node]] = {}
    for member, user in stream.exits:
        by_member.setdefault(member, []).append(user)
    for member, users in by_member.items():
        rotator.online(member, q.T, list(dict.fromkeys(users)), "exit")


# ---- online Hadamard on the output projections' inputs --------------------------------------------------

def match_projection(linear: Node) -> int | Miss | None:
    """The Hadamard block for a quantized output projection's input."""
    if not is_op(linear, LINEAR) or linear.meta.get(META_ROLE) not in ONLINE_ROLES:
        return None
    if not linear.meta[META_PLAN].quantized:
        return Miss("kept in floating point")
    if not is_stored(linear.args[1]):
        return Miss("its weight is computed at run time")
    width = int(linear.args[0].meta["val"].shape[-1])
    if power_of_two_block(width) < MIN_BLOCK:
        return Miss(f"input size {width} has no power-of-two block >= {MIN_BLOCK}")
    return power_of_two_block(width)


def emit_online_hadamard(gm: GraphModule, ctx: CompileContext, linear: Node, block: int) -> None:
    x, weight = linear.args[0], linear.args[1]
    rotated = torch.ops.zq.hadamard(get_attr_tensor(gm, weight).float(), block)
    _Rotator(gm, torch.empty(0)).replace(linear, weight, rotated)  # W H: each row through the same transform
    with gm.graph.inserting_before(linear):
        node = gm.graph.call_function(torch.ops.zq.hadamard.default, (x, block))
    node.meta["val"] = x.meta["val"]
    linear.replace_input_with(x, node)


RULES = (Rule("online_hadamard", match_projection, emit_online_hadamard),)


def rotate_hadamard(gm: GraphModule, ctx: CompileContext) -> PassResult:
    if not ctx.recipe.rotate:
        return PassResult(gm, False)
    counters: Counter = Counter()
    stream = find_stream(gm)
    if isinstance(stream, Miss):
        ctx.rotate_skipped["residual stream"] = stream.reason
    else:
        hidden = stream.embeddings[0].meta["val"].shape[-1]
        device = get_attr_tensor(gm, stream.embeddings[0].args[0]).device  # the model's (a CUDA model's) device
        rotator = _Rotator(gm, rotation_matrix(int(hidden)).float().to(device))  # float32: exact to ~1e-7, 4x faster
        _rotate_stream(gm, stream, rotator)
        counters.update(rotator.counters)
    linears = [n for n in gm.graph.nodes if is_op(n, LINEAR)]
    applied = apply_rules(gm, ctx, linears, RULES, "rotate", lambda n: "")
    ctx.rotate_skipped.update({name: reason for name, reason in applied.misses.items() if reason})
    counters.update(applied.counters)
    return PassResult(gm, bool(counters), counters)
