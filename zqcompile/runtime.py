"""The decode runtime: runs the cached step graph (zqcompile.kv_cache) as prefill and decode steps over a KV cache
it owns.

- :class:`EagerSteps` (CPU, or a GPU without CUDA graphs) calls the graph directly on a cache allocated per
  ``generate`` call.
- :class:`CUDAGraphSteps` replays CUDA graphs: the decode step is captured once per batch bucket
  (:data:`BATCH_BUCKETS`; a batch runs in the next bucket up, its extra rows masked out), the prefill once per
  (batch bucket, prompt-length bucket; a prompt is left-padded to its bucket, which only adds masked slots).
  All graphs read and write one cache (and attention-mask) buffer allocated for the largest batch bucket so far
  (bucket b uses its first b rows, which are contiguous), and they share one CUDA memory pool. Numba's JIT and
  the Triton GEMMs' autotuning run in the eager warm-up before each capture; afterwards a step only writes its
  few input values into the static buffers and replays, so after :meth:`CUDAGraphSteps.warmup` a generation
  captures and tunes nothing (``captures`` counts the captures).

Both keep the same state machine: ``prefill`` writes the prompt to slots ``0..S-1`` and returns the logits of
its last position, then each ``decode`` writes one token at the next slot. Slot j is visible to the batch's row
b when ``mask[b, j]`` is 1 (prompt tokens that are not padding, and every generated token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.fx import GraphModule

from zqcompile.backends.cuda_graphs import capture_graph
from zqcompile.errors import ZQError
from zqcompile.kv_cache import CacheLayout

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MIN_SEQ_BUCKET = 16  # prompt-length buckets are the powers of two from here up to the cache length


def batch_bucket(batch: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
    """The smallest bucket that holds ``batch`` rows; past the largest, the next multiple of it."""
    fitting = [b for b in buckets if b >= batch]
    return min(fitting) if fitting else -(-batch // buckets[-1]) * buckets[-1]


def seq_bucket(length: int, capacity: int) -> int:
    """The smallest power of two (at least MIN_SEQ_BUCKET) that holds ``length`` and leaves its slots within
    ``capacity`` (the prompt length plus the tokens to generate must fit the cache); else ``length`` itself."""
    bucket = MIN_SEQ_BUCKET
    while bucket < length:
        bucket *= 2
    return bucket if bucket <= capacity else length


class EagerSteps:
    """Prefill and decode by calling the graph; a cache of exactly ``max_cache_len`` slots per generation."""

    def __init__(self, graph: Callable[..., Any], layout: CacheLayout, device: torch.device, max_cache_len: int):
        self.graph, self.layout, self.device, self.max_cache_len = graph, layout, device, max_cache_len
        self.captures = 0  # never captures; the attribute keeps the interface of CUDAGraphSteps
        self.cache: list[torch.Tensor] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.slot = 0

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                max_new_tokens: int) -> torch.Tensor:
        batch, seq = input_ids.shape
        self.cache = self.layout.allocate(batch, self.max_cache_len, self.device)
        self.mask = torch.zeros(batch, self.max_cache_len, dtype=torch.long, device=self.device)
        self.mask[:, :seq] = attention_mask
        self.slot = seq
        cache_position = torch.arange(seq, device=self.device)
        return self.graph(input_ids, self.mask, position_ids, cache_position, *self.cache)[0][:, -1]

    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        self.mask[:, self.slot] = 1
        cache_position = torch.tensor([self.slot], device=self.device)
        logits = self.graph(input_ids[:, None], self.mask, position_ids[:, None], cache_position, *self.cache)[0]
        self.slot += 1
        return logits[:, -1]


@dataclass
class _Replay:
    """One captured step: its graph, the static input buffers to fill before a replay, its static logits, and
    every other tensor the graph reads (a replay reads their addresses: freed, they would be reused)."""

    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    logits: torch.Tensor
    static_inputs: tuple[torch.Tensor, ...]


class CUDAGraphSteps:
    """Prefill and decode replayed from CUDA graphs per batch / prompt-length bucket (see the module doc)."""

    def __init__(self, graph: Callable[..., Any], layout: CacheLayout, device: torch.device, max_cache_len: int):
        self.graph, self.layout, self.device, self.max_cache_len = graph, layout, device, max_cache_len
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for every captured step
        self.captures = 0
        self.rows = 0  # rows of the shared buffers (the largest batch bucket so far)
        self.cache: list[torch.Tensor] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)  # the decode step's slot
        self._decode: dict[int, _Replay] = {}
        self._prefill: dict[tuple[int, int], _Replay] = {}
        self.bucket = 0  # the running generation's batch bucket
        self.batch = 0
        self.slot = 0

    # ---- buffers and captures ------------------------------------------------------------------------
    def _reserve(self, rows: int) -> None:
        """Buffers for ``rows`` rows; growing them re-allocates and drops every graph (they point at the old ones)."""
        if rows <= self.rows:
            return
        self._decode.clear()
        self._prefill.clear()
        self.cache = []  # free the old cache before allocating the larger one
        self.cache = self.layout.allocate(rows, self.max_cache_len, self.device)
        self.mask = torch.zeros(rows, self.max_cache_len, dtype=torch.long, device=self.device)
        self.rows = rows

    def _capture(self, bucket: int, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 cache_position: torch.Tensor) -> _Replay:
        args = (input_ids, self.mask[:bucket], position_ids, cache_position, *(t[:bucket] for t in self.cache))
        graph, outputs = capture_graph(self.graph, args, pool=self.pool)
        self.captures += 1
        return _Replay(graph, input_ids, position_ids, outputs[0], args)

    def _decode_step(self, bucket: int) -> _Replay:
        if bucket not in self._decode:
            ids = torch.zeros(bucket, 1, dtype=torch.long, device=self.device)
            self._decode[bucket] = self._capture(bucket, ids, torch.zeros_like(ids), self.cache_position)
        return self._decode[bucket]

    def _prefill_step(self, bucket: int, seq: int) -> _Replay:
        if (bucket, seq) not in self._prefill:
            ids = torch.zeros(bucket, seq, dtype=torch.long, device=self.device)
            cache_position = torch.arange(seq, device=self.device)
            self._prefill[bucket, seq] = self._capture(bucket, ids, torch.zeros_like(ids), cache_position)
        return self._prefill[bucket, seq]

    @torch.no_grad()
    @torch.inference_mode(False)  # static buffers stay normal tensors (see backends/cuda_graphs.py)
    def warmup(self, batch_sizes: Sequence[int], prompt_lens: Sequence[int], max_new_tokens: int) -> None:
        """Capture the decode step of each batch bucket and the prefill of each (batch bucket, prompt bucket)."""
        buckets = sorted({batch_bucket(b) for b in batch_sizes})
        self._reserve(buckets[-1])
        for bucket in buckets:
            self._decode_step(bucket)
            for length in prompt_lens:
                self._prefill_step(bucket, seq_bucket(length, self.max_cache_len - max_new_tokens))

    # ---- the steps -----------------------------------------------------------------------------------
    @torch.no_grad()
    @torch.inference_mode(False)
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                max_new_tokens: int) -> torch.Tensor:
        batch, seq = input_ids.shape
        self.batch, self.bucket = batch, batch_bucket(batch)
        self._reserve(self.bucket)
        padded = seq_bucket(seq, self.max_cache_len - max_new_tokens)
        step = self._prefill_step(self.bucket, padded)
        # left-pad to the bucket (masked slots, position 1 as for padding) and fill the extra rows with padding
        step.input_ids.zero_()
        step.input_ids[:batch, padded - seq:] = input_ids
        step.position_ids.fill_(1)
        step.position_ids[:batch, padded - seq:] = position_ids
        mask = self.mask[:self.bucket]
        mask.zero_()
        mask[:batch, padded - seq:padded] = attention_mask
        step.graph.replay()
        self.slot = padded
        return step.logits[:batch, -1]

    @torch.no_grad()
    @torch.inference_mode(False)
    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # The slot first: a capture's eager warm-up run writes its (placeholder) keys and values at this slot,
        # which the replay below overwrites; at any other slot it would corrupt a visible token's cache entry.
        self.cache_position.fill_(self.slot)
        step = self._decode_step(self.bucket)
        step.input_ids[:self.batch, 0] = input_ids
        step.position_ids[:self.batch, 0] = position_ids
        self.mask[:self.bucket, self.slot] = 1
        step.graph.replay()
        self.slot += 1
        return step.logits[:self.batch, -1]


def build_steps(graph: Callable[..., Any] | GraphModule, layout: CacheLayout, device: torch.device,
                max_cache_len: int, cuda_graphs: bool) -> EagerSteps | CUDAGraphSteps:
    if cuda_graphs and device.type != "cuda":
        raise ZQError(f"CUDA-graph decoding needs a CUDA model, this one is on {device}")
    return (CUDAGraphSteps if cuda_graphs else EagerSteps)(graph, layout, device, max_cache_len)
