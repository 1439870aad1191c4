"""CUDAGraphRunner: replay a forward as one CUDA graph per input signature, all graphs in one memory pool.

A zqcompile forward is hundreds of small launches (a Numba launch costs 40-140 us of CPU, a torch op
~10 us), so at small batch the CPU, not the GPU, sets the latency. The runner captures the forward into a
``torch.cuda.CUDAGraph`` the first time it sees an input signature (shapes, dtypes, devices) and afterwards
only copies the inputs into that graph's static buffers and replays it. It is the one graph mechanism of the
project: the encoder path (``QuantizedModel`` with shape buckets) and decode runtimes use it the same way.

API:
- ``CUDAGraphRunner(forward, *, max_graphs=128, warmup_runs=WARMUP_RUNS, pool=None, copy_outputs=True,
  index_rows=None)``.
- ``runner(*inputs)``: replay the graph of this signature (capturing it first if new).
- ``runner.index_guard``: with ``index_rows`` (input position -> rows of the embedding table it indexes), an
  ``IndexGuard`` run inside every graph before the forward (see below); ``None`` without.
- ``runner.warmup(input_tuples, progress=True) -> int``: capture every new signature ahead of traffic, with a
  progress bar; returns how many graphs it captured.
- ``runner.captures`` (graphs captured so far), ``runner.eager_calls`` (calls run without a graph because the
  bound was reached), ``runner.cached_signatures``, ``runner.memory_report() -> GraphMemory``.
- ``runner.pool``: the memory-pool handle. Every graph of a runner is captured into this one pool, and a
  second runner given ``pool=first.pool`` (e.g. prefill and decode of one model) shares it too.

Sharing one pool: a graph's intermediates are dead once its replay ends, so the next capture may reuse their
memory; total graph memory is then about the largest graph's intermediates plus every graph's static outputs,
not the sum over graphs. This is safe because replays run one after another on the caller's stream and each
graph's outputs are copied out right after its replay (``copy_outputs=True``). With ``copy_outputs=False`` the
returned tensors are the graph's static outputs: valid until the next replay of any graph in the pool.

Graphs are never evicted (an evicted graph would be re-captured on the next request of its shape, which is
the stall that warm-up exists to avoid). ``max_graphs`` is an explicit bound: past it, a new signature runs
eagerly (counted in ``eager_calls``, one warning) until the caller adds buckets or raises the bound.

Before a capture the forward runs ``warmup_runs`` times eagerly on a side stream, so that Numba's JIT
compilation and the Triton GEMMs' autotuning (which synchronise the device and cannot be captured) happen
outside the graph. One run does all of it (every kernel is compiled, tuned and its per-shape plan built by the
end of its first call; torch.compile's CUDA-graph trees also record after one eager run); a second one only
cost an eager forward (40-55 ms at BERT-base sizes) per captured shape. The runner is for inference: it runs
under ``torch.no_grad()``, and outside inference mode even when called inside it (a graph captured from an
inference-mode call would otherwise hold inference tensors as its static inputs, which a later call outside
inference mode may not write).

Token ids out of an embedding's range: on the GPU the gather would fail with a device-side assert, which kills
the process's CUDA context, and checking the ids on the host before the replay costs a device-to-host
synchronisation on every call (the GPU idles while the host reads the result back and launches the graph). With
``index_rows``, the graph itself clamps each index input into its table and records in a flag on the device
whether it had to (``IndexGuard``); the caller reads the flag after the replay (``index_guard.tripped()``, one
read-back once the GPU work is done) and raises then, discarding the outputs, which were computed from
clamped ids.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

from zqcompile.errors import ZQError

DEFAULT_MAX_GRAPHS = 128
WARMUP_RUNS = 1  # eager runs before each capture (see the module doc)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_inputs: list[Any]
    static_outputs: Any

    def __post_init__(self) -> None:  # what every replay reads, flattened once
        self.static_tensors = [x for x in self.static_inputs if isinstance(x, torch.Tensor)]
        self.output_leaves, self.output_spec = pytree.tree_flatten(self.static_outputs)


@dataclass(frozen=True)
class GraphMemory:
    """GPU memory held by a runner's CUDA graphs."""

    graphs: int
    pool_reserved: int  # bytes of the shared pool's segments: intermediates and static outputs of every graph
    pool_allocated: int  # of which still allocated (static outputs)
    static_inputs: int  # bytes of the graphs' input buffers (outside the pool)

    def __str__(self) -> str:
        mb = 1 / 2 ** 20
        return (f"{self.graphs} CUDA graphs in one memory pool: {self.pool_reserved * mb:.1f} MB reserved "
                f"({self.pool_allocated * mb:.1f} MB held by static outputs), static inputs "
                f"{self.static_inputs * mb:.1f} MB")


def _tensor_bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


def _signature(inputs: Sequence[Any]) -> tuple:
    return tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else ("const", x) for x in inputs)


class IndexGuard:
    """Clamps the index inputs of a forward into their embedding tables and flags, on their device, that it had to:
    the work is tensor ops, so it runs inside a captured graph (no host synchronisation before the replay)."""

    def __init__(self, rows: Mapping[int, int]):
        self.rows = dict(rows)  # input position -> rows of the table it indexes
        self.flag: torch.Tensor | None = None  # made outside any capture, by prepare()

    def prepare(self, device: torch.device) -> None:
        """Allocate the flag on ``device`` (the runner calls it before a capture: a graph must not allocate the flag
        in its pool)."""
        if self.flag is None or self.flag.device != device:
            self.flag = torch.zeros((), dtype=torch.bool, device=device)

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        """``inputs`` with every index input clamped to ``[0, rows)``; ORs "some value was out of range" into the
        flag (four tensor ops per index input)."""
        inputs = list(inputs)
        self.prepare(inputs[next(iter(self.rows))].device)
        for position, rows in self.rows.items():
            ids = inputs[position]
            inputs[position] = clamped = ids.clamp(0, rows - 1)
            self.flag.logical_or_(clamped.ne(ids).any())
        return inputs

    def tripped(self) -> bool:
        """Whether an index was out of range in a run since the last reset; resets the flag. Reads it back: waits
        for the work queued on the current stream so far."""
        if self.flag is None or not self.flag.item():
            return False
        self.flag.zero_()
        return True


class CUDAGraphRunner:
    """Calls ``forward(*inputs)`` through CUDA graphs captured per input signature into one memory pool."""

    def __init__(self, forward: Callable[..., Any], *, max_graphs: int = DEFAULT_MAX_GRAPHS,
                 warmup_runs: int = WARMUP_RUNS, pool: tuple | None = None, copy_outputs: bool = True,
                 index_rows: Mapping[int, int] | None = None):
        if max_graphs < 1:
            raise ZQError(f"max_graphs must be at least 1, got {max_graphs}")
        self.forward = forward
        self.index_guard = IndexGuard(index_rows) if index_rows else None
        self.max_graphs = max_graphs
        self.warmup_runs = warmup_runs
        self.copy_outputs = copy_outputs
        self._pool = pool
        self._side_stream: torch.cuda.Stream | None = None  # one for all warm-up runs (cuBLAS keeps a workspace per stream)
        self._graphs: dict[tuple, _Captured] = {}
        self.captures = 0  # graphs captured so far (tests and benchmarks read it)
        self.eager_calls = 0  # calls past max_graphs, run without a graph

    @property
    def pool(self) -> tuple:
        """The memory-pool handle all graphs are captured into (created on first use; needs a GPU)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool

    @property
    def cached_signatures(self) -> list[tuple]:
        return list(self._graphs)

    @torch.no_grad()
    @torch.inference_mode(False)  # static buffers stay normal tensors, so any later call may copy into them
    def __call__(self, *inputs: Any) -> Any:
        _check_cuda_inputs(inputs)
        entry = self._graphs.get(_signature(inputs))
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return self._run_eagerly(inputs)
            entry = self._capture(inputs)
        self._replay(entry, inputs)
        if not self.copy_outputs:
            return entry.static_outputs
        return pytree.tree_unflatten([t.clone() if isinstance(t, torch.Tensor) else t for t in entry.output_leaves],
                                     entry.output_spec)

    @torch.no_grad()
    @torch.inference_mode(False)
    def warmup(self, input_tuples: Iterable[Sequence[Any]], progress: bool = True) -> int:
        """Capture a graph for every signature among ``input_tuples`` not captured yet; returns how many were.
        The largest inputs go first, so that the smaller graphs reuse the pool memory its intermediates freed
        (captured the other way round, each larger graph would need segments of its own). A tqdm progress bar
        shows the shapes while ``progress`` is on. Each new graph is then run once as a call runs it: a graph's
        first replay also uploads it to the GPU, and the first input copy loads its kernel (CUDA's lazy module
        loading), which would otherwise cost the first requests (BENCHMARKS.md, "Serving")."""
        from tqdm.auto import tqdm

        input_tuples = sorted(input_tuples, key=_tensor_bytes, reverse=True)
        captured = []
        bar = tqdm(input_tuples, desc="capturing CUDA graphs", unit="graph", disable=not progress)
        for inputs in bar:
            _check_cuda_inputs(inputs)
            key = _signature(inputs)
            bar.set_postfix_str(" x ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, torch.Tensor))[:60])
            if key not in self._graphs:
                if len(self._graphs) >= self.max_graphs:
                    raise ZQError(f"warm-up needs more than max_graphs={self.max_graphs} CUDA graphs; raise "
                                  "max_graphs or warm up fewer shapes")
                captured.append((self._capture(inputs), inputs))
        for entry, inputs in captured:
            self._replay(entry, inputs)
        return len(captured)

    @staticmethod
    def _replay(entry: _Captured, inputs: Sequence[Any]) -> None:
        # one launch for all inputs (a kernel launch costs ~5 us of host time, on the latency path at small batch)
        torch._foreach_copy_(entry.static_tensors, [x for x in inputs if isinstance(x, torch.Tensor)])
        entry.graph.replay()

    def memory_report(self) -> GraphMemory:
        """What the graphs hold: the shared pool's segments (from the caching allocator) and the input buffers."""
        reserved = allocated = 0
        if self._graphs:
            for segment in torch.cuda.memory_snapshot():
                if tuple(segment.get("segment_pool_id", ())) == tuple(self.pool):
                    reserved += segment["total_size"]
                    allocated += segment["allocated_size"]
        inputs = sum(_tensor_bytes(entry.static_inputs) for entry in self._graphs.values())
        return GraphMemory(len(self._graphs), reserved, allocated, inputs)

    def _run_eagerly(self, inputs: Sequence[Any]) -> Any:
        if self.eager_calls == 0:
            warnings.warn(f"CUDA-graph runner holds max_graphs={self.max_graphs} graphs; new input shapes such as "
                          f"{_signature(inputs)} run without a graph (slower); use shape buckets or raise max_graphs",
                          stacklevel=3)
        self.eager_calls += 1
        return self._guarded_forward(*inputs)

    def _guarded_forward(self, *inputs: Any) -> Any:
        """What a graph runs: the forward, after the index guard where there is one."""
        return self.forward(*(inputs if self.index_guard is None else self.index_guard(inputs)))

    def _capture(self, inputs: Sequence[Any]) -> _Captured:
        static_inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
        self._side_stream = self._side_stream or torch.cuda.Stream()
        if self.index_guard is not None:
            self.index_guard.prepare(static_inputs[next(iter(self.index_guard.rows))].device)
        graph, static_outputs = capture_graph(self._guarded_forward, static_inputs, pool=self.pool,
                                              warmup_runs=self.warmup_runs, side_stream=self._side_stream)
        self.captures += 1
        entry = _Captured(graph, static_inputs, static_outputs)
        self._graphs[_signature(inputs)] = entry
        return entry


def capture_graph(fn: Callable[..., Any], args: Sequence[Any], *, pool: Any, warmup_runs: int = WARMUP_RUNS,
                  side_stream: torch.cuda.Stream | None = None) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn(*args)`` ``warmup_runs`` times eagerly on a side stream (JIT compilation and autotuning happen
    there, outside the graph), then capture one call into a CUDA graph in ``pool``; returns the graph and the
    call's static outputs. The caller keeps ``args`` alive as long as the graph: a replay reads their memory."""
    side = side_stream or torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup_runs):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn(*args)
    return graph, outputs


def _check_cuda_inputs(inputs: Sequence[Any]) -> None:
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors or any(not t.is_cuda for t in tensors):
        raise ZQError("the CUDA-graph runner needs CUDA tensor inputs; move the inputs to the model's device "
                      "or compile with cuda_graphs=False")
