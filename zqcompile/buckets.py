"""Shape buckets: round a request's batch size and sequence length up to a few fixed sizes.

Every distinct input shape costs a CUDA-graph capture (and GEMM tuning) the first time the cuda backend sees
it, and a graph of its own afterwards. With buckets, a request of ``batch x seq`` runs at the smallest bucket
``B x S`` that holds it: the inputs are padded (token id 0, ``attention_mask`` 0 on the padded positions; padded
batch rows attend to their first position only, so their softmax is well defined), the graph runs, and every
output is sliced back to ``batch`` (and to ``seq`` where it has a sequence dim). A stream of arbitrary shapes
then touches at most ``len(batch_sizes) * len(seq_lens)`` graphs, all of which ``QuantizedModel.warmup`` can
capture ahead of traffic.

Why padding does not change what the caller sees:
- sequence: the padded key positions get attention mask 0, so their softmax weight is exactly 0 (HF adds the
  dtype's most negative value); the attention sums then differ from the unpadded call only by the kernels'
  summation order (float rounding). Decoders' real positions never see later positions anyway (causal mask),
  and positions are counted from the left, so right padding leaves them unchanged. A model without an
  ``attention_mask`` input is never padded along the sequence (ZQError if asked to).
- batch: every op of a compiled text model works per sequence (per-token activation scales, row-wise GEMMs),
  so extra rows do not touch the caller's rows beyond float rounding (GEMM tiles are chosen per row count).
  Plain modules are batch-padded only when the caller asks for it.
In W8A8 a last-bit change of an activation can flip one INT8 rounding decision, so padded and unpadded
results agree to well below the recipe's own error, not bit for bit (tests/test_buckets.py measures both).

Defaults: sequence buckets are multiples of 16 up to 128, then powers of two up to the model's maximum
positions (and the maximum itself); batch buckets are 1, 2, 4, ..., 64, and a larger batch runs as chunks of
64. A sequence longer than the largest sequence bucket runs at its own length.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from zqcompile.errors import ZQError

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
SEQ_STEP = 16  # sequence buckets are multiples of this up to SEQ_LINEAR_UP_TO, then powers of two
SEQ_LINEAR_UP_TO = 128
MASK_INPUT = "attention_mask"


@dataclass(frozen=True)
class Buckets:
    """Bucket sizes for ``compile(..., buckets=Buckets(...))``: ``None`` takes the model's default for that
    dim, ``()`` never pads it."""

    batch_sizes: tuple[int, ...] | None = None
    seq_lens: tuple[int, ...] | None = None

    @classmethod
    def from_value(cls, value: Buckets | Mapping[str, Any] | bool) -> Buckets:
        if isinstance(value, Buckets):
            return value
        if value is True:
            return cls()
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ZQError(f"unknown bucket keys {unknown}; use batch_sizes and/or seq_lens")
            return cls(**{k: None if v is None else tuple(v) for k, v in value.items()})
        raise ZQError(f"buckets must be True/False/None, a Buckets or a dict with batch_sizes / seq_lens, got "
                      f"{type(value).__name__}")


def default_seq_lens(max_positions: int) -> tuple[int, ...]:
    """Multiples of 16 up to 128, then powers of two, up to and including ``max_positions``."""
    sizes = list(range(SEQ_STEP, min(SEQ_LINEAR_UP_TO, max_positions) + 1, SEQ_STEP))
    size = SEQ_LINEAR_UP_TO * 2
    while size < max_positions:
        sizes.append(size)
        size *= 2
    if not sizes or sizes[-1] != max_positions:
        sizes.append(max_positions)
    return tuple(sizes)


def validate_sizes(sizes: Sequence[int], what: str, limit: int | None = None) -> tuple[int, ...]:
    """Sorted unique positive ints, at most ``limit``; ZQError naming ``what`` otherwise."""
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ZQError(f"{what} must be positive integers, got {list(sizes)}")
    if limit is not None and max(sizes, default=0) > limit:
        raise ZQError(f"{what} {list(sizes)} go beyond the model's maximum of {limit} positions; drop the larger ones")
    return tuple(sorted(set(sizes)))


def round_up(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``size``; ``size`` itself when it is larger than every bucket (or no buckets)."""
    index = bisect.bisect_left(buckets, size)
    return buckets[index] if index < len(buckets) else size


def _dim_exprs(node: torch.fx.Node) -> tuple | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(d.node.expr if isinstance(d, torch.SymInt) else d for d in value.shape)


def output_dims(gm: torch.fx.GraphModule) -> list[tuple[bool, bool]] | None:
    """Per output (in pytree leaf order): (has the batch dim at 0, has the sequence dim at 1), read from the
    symbolic shapes export recorded; None when an output's shape is unknown or its dim 0 is not the batch."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = _dim_exprs(placeholders[0]) if placeholders else None
    if not first:
        return None
    batch, seq = first[0], first[1] if len(first) > 1 else None
    output = next(n for n in gm.graph.nodes if n.op == "output")
    dims = []
    for leaf in pytree.tree_leaves(output.args[0]):
        shape = _dim_exprs(leaf)
        if not shape or shape[0] != batch:
            return None
        dims.append((True, seq is not None and len(shape) > 1 and shape[1] == seq))
    return dims


@dataclass(frozen=True)
class ShapeBuckets:
    """The resolved buckets of one compiled model, and the padding / slicing around its graph."""

    batch_sizes: tuple[int, ...]  # () = batch never padded
    seq_lens: tuple[int, ...]  # () = sequence never padded
    mask_index: int | None  # position of attention_mask among the graph inputs
    seq_outputs: tuple[bool, ...]  # per output leaf: sliced along dim 1 too

    def padded_shape(self, batch: int, seq: int | None) -> tuple[int, int | None]:
        return round_up(batch, self.batch_sizes), None if seq is None else round_up(seq, self.seq_lens)

    def __call__(self, run: Callable[..., Any], inputs: Sequence[Any]) -> Any:
        batch = inputs[0].shape[0]
        top = self.batch_sizes[-1] if self.batch_sizes else None
        if top is not None and batch > top:
            chunks = [self(run, [x[start:start + top] for x in inputs]) for start in range(0, batch, top)]
            return pytree.tree_map(lambda *parts: torch.cat(parts), *chunks)
        seq = inputs[0].shape[1] if self.seq_lens else None
        padded_batch, padded_seq = self.padded_shape(batch, seq)
        if padded_batch == batch and padded_seq == seq:
            return run(*inputs)
        outputs = run(*self.pad(inputs, padded_batch, padded_seq))
        leaves, spec = pytree.tree_flatten(outputs)
        sliced = [leaf[:batch, :seq].contiguous() if has_seq and seq is not None else leaf[:batch].contiguous()
                  for leaf, has_seq in zip(leaves, self.seq_outputs)]
        return pytree.tree_unflatten(sliced, spec)

    def pad(self, inputs: Sequence[torch.Tensor], batch: int, seq: int | None) -> list[torch.Tensor]:
        """Inputs zero-padded to ``batch`` rows (and ``seq`` positions); padded rows attend to position 0."""
        padded = []
        for index, x in enumerate(inputs):
            out = x.new_zeros((batch, *x.shape[1:]) if seq is None else (batch, seq))
            out[tuple(slice(0, n) for n in x.shape)] = x
            if index == self.mask_index:
                out[x.shape[0]:, 0] = 1
            padded.append(out)
        return padded


def warmup_shapes(buckets: ShapeBuckets | None, batch_sizes: Sequence[int] | None, seq_lens: Sequence[int] | None,
                  text_model: bool) -> list[tuple[int, int | None]]:
    """The distinct shapes that requests of these sizes run at (default: every bucket); a plain module's
    shapes have no sequence length."""
    batches = buckets.batch_sizes if batch_sizes is None and buckets else batch_sizes
    seqs = (buckets.seq_lens if seq_lens is None and buckets else seq_lens) if text_model else (None,)
    if not batches or not seqs:
        raise ZQError(f"warmup needs {'batch_sizes' if not batches else 'seq_lens'}: the model has no buckets "
                      "for that dim; pass them to warmup(...)")
    batches = validate_sizes(batches, "warm-up batch_sizes")
    if text_model:
        seqs = validate_sizes(seqs, "warm-up seq_lens")
    if buckets is None:
        return [(b, s) for b in batches for s in seqs]
    top = max(buckets.batch_sizes, default=None)
    batches = {min(b, top) if top else b for b in batches}  # larger batches run as chunks of the top bucket
    return sorted({buckets.padded_shape(b, s) for b in batches for s in seqs}, key=lambda bs: (bs[0], bs[1] or 0))


def warmup_inputs(batch: int, seq: int | None, input_names: Sequence[str] | None,
                  examples: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Graph inputs of one warm-up shape: token id 0 with a full attention mask for text models (int64, as
    tokenizers return them: the graphs are captured per input dtype), rows of the captured example for modules."""
    if input_names is None:
        return [x[:1].expand(batch, *x.shape[1:]).contiguous().to(device) for x in examples]
    ones = torch.ones((batch, seq), dtype=torch.long, device=device)
    return [ones if name == MASK_INPUT else torch.zeros_like(ones) for name in input_names]


def resolve_buckets(value: Buckets | Mapping[str, Any] | bool | None, *, backend: str,
                    input_names: Sequence[str] | None, max_seq_len: int | None,
                    graph_module: torch.fx.GraphModule) -> ShapeBuckets | None:
    """The buckets of a compiled model from ``compile(..., buckets=value)``, or None for no padding.

    ``None`` means: the defaults for the cuda backend with a text model (sequence padding only when it has an
    attention mask), no padding otherwise. ``False`` turns padding off. Explicit buckets that cannot be applied
    exactly (sequence buckets without an attention mask or without known output shapes) raise ZQError.
    """
    if value is False or (value is None and (backend != "cuda" or input_names is None)):
        return None
    explicit = value is not None
    spec = Buckets.from_value(True if value is None else value)
    dims = output_dims(graph_module)
    model = "this plain module" if input_names is None else "this model"
    if dims is None:
        if explicit:
            raise ZQError(f"cannot pad {model}: the compiled graph does not record which outputs have a batch dim; "
                          "compile with buckets=False")
        return None
    has_mask = input_names is not None and MASK_INPUT in input_names
    if spec.seq_lens is None:
        seq_lens = default_seq_lens(max_seq_len) if has_mask and max_seq_len else ()
    else:
        seq_lens = validate_sizes(spec.seq_lens, "seq_lens buckets", max_seq_len)
        if seq_lens and not has_mask:
            raise ZQError(f"seq_lens buckets need an attention_mask input to hide the padding, and {model} has "
                          f"none (inputs {list(input_names or [])}); use Buckets(seq_lens=()) to pad only the batch")
    if spec.batch_sizes is None:
        batch_sizes = DEFAULT_BATCH_SIZES if input_names is not None else ()
    else:
        batch_sizes = validate_sizes(spec.batch_sizes, "batch_sizes buckets")
    if not batch_sizes and not seq_lens:
        return None
    mask_index = list(input_names).index(MASK_INPUT) if has_mask else None
    return ShapeBuckets(batch_sizes, seq_lens, mask_index, tuple(has_seq for _, has_seq in dims))
