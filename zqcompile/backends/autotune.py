"""Compiling and timing a GEMM's candidate configs: the measuring half of the Triton GEMMs' tuner
(``triton_gemm._pick_config`` decides what to time and keeps the choice).

A cold warm-up of BERT-base's 63 buckets tunes 40 GEMM shapes with 5-17 candidates each, and the tuner used to
spend 47 s of a 63 s warm-up there (H200): every candidate compiled one after the other, then timed by Triton's
``do_bench_cudagraph(rep=10)``, ten replays of a 10 ms graph (about 100 ms of GPU time per candidate at the large
shapes, plus an ``empty_cache`` per capture). Here:

- **Compiling concurrently**: each candidate runs once before timing, which compiles it. The first runs in the
  caller's thread (so that state a kernel creates on first use, such as a split-K workspace, is made once); the
  others run in a thread pool. Triton's compiler releases the GIL in its MLIR / LLVM passes and runs ``ptxas`` as
  a subprocess (its own ``AsyncCompileMode`` compiles in threads the same way), so the compiles overlap on the
  host's cores. A Triton binary depends on the config, the constexprs and the integer arguments' divisibility by
  16, not on M, N, K themselves, so later shapes find most candidates compiled (Triton's in-memory cache).
- **Timing leanly**: a CUDA graph of ``n`` back-to-back launches, ``n`` sized so that one replay takes about
  ``TIMING_MS`` of GPU time; the median of ``TIMING_REPLAYS`` replays queued back to back, cut short once the first
  two are both ``SLOWER_CUT`` times slower than the best candidate so far (it cannot win). Graphs are captured with
  ``capture_begin`` / ``capture_end`` directly: ``torch.cuda.graph`` empties the caching allocator on entry.
- **Weights from HBM** for the decode-size kernels, which are bound by reading a weight that may fit in the L2
  (50 MB on the H200): replayed back to back on one weight they would be timed reading it from the L2. The caller
  then gives runs on copies of the weight that together fill the L2 several times over, and the timed graph
  cycles through them, as a decode step's layers do. (Triton's ``do_bench``, used before, flushes the L2 by
  writing a 256 MB buffer before each call and times each call alone: on the H200 it picked configs up to 2x
  slower than the best one timed on cycled weights, W4A8 4096x4096 at M = 1.)

Candidates that do not fit the GPU (Triton's ``OutOfResources``, e.g. too much shared memory) are dropped.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Hashable, Sequence, TypeVar

import torch

try:
    from triton.runtime.errors import OutOfResources
except Exception:  # noqa: BLE001 - no (working) Triton: nothing is ever tuned, see triton_gemm._require_triton
    OutOfResources = RuntimeError

from zqcompile.backends import tuning_cache

Config = TypeVar("Config", bound=Hashable)

COMPILE_THREADS = min(16, os.cpu_count() or 1)  # concurrent first runs (compiles) of a shape's candidates
TIMING_MS = 1.0  # GPU time of one timed graph replay
TIMING_REPLAYS = 5  # timed replays per candidate; the median is its time
MAX_LAUNCHES = 256  # launches per timed graph, for the smallest kernels
SLOWER_CUT = 1.25  # stop timing a candidate once two replays are both this much slower than the best so far


def time_candidates(candidates: Sequence[Config], run: Callable[[Config], None],
                    cycled_runs: Callable[[], Sequence[Callable[[Config], None]]] | None = None
                    ) -> dict[Config, float]:
    """Milliseconds per launch of ``run(cfg)`` for every candidate that fits this GPU (the clearly slower ones
    timed with fewer replays). Compile time goes to ``tuning_cache.STATS.compile_seconds``. ``cycled_runs``: makes
    the runs on copies of the weight (see the module docstring) that the timed launches cycle through, so that each
    reads its weight from HBM."""
    start = time.perf_counter()
    fitting = first_runs(candidates, run)
    tuning_cache.STATS.compile_seconds += time.perf_counter() - start
    runs = cycled_runs() if cycled_runs is not None and fitting else [run]
    stream = torch.cuda.Stream()  # captures need a stream other than the legacy default one
    stream.wait_stream(torch.cuda.current_stream())
    timings: dict[Config, float] = {}
    with torch.cuda.stream(stream):
        for cfg in fitting:
            timings[cfg] = _time_launches(_cycling(runs, cfg), min(timings.values(), default=None), len(runs))
    torch.cuda.current_stream().wait_stream(stream)
    return timings


def first_runs(candidates: Sequence[Config], run: Callable[[Config], None]) -> list[Config]:
    """Run every candidate once (compiling it), the first in this thread and the others concurrently in a pool of
    ``COMPILE_THREADS`` threads, all on the caller's stream; returns the candidates that fit the GPU, in order."""
    stream = torch.cuda.current_stream()

    def fits(cfg: Config) -> bool:
        try:
            with torch.cuda.device(stream.device), torch.cuda.stream(stream):  # a pool thread starts on device 0
                # A pool thread has no current CUDA context until a runtime call needs one (switching to device 0
                # from "device 0" calls nothing), and Triton's TMA descriptors are made with the driver API, which
                # then fails with "invalid device context" (seen on the H200). A stream synchronization binds it.
                stream.synchronize()
                run(cfg)
        except OutOfResources:
            return False
        return True

    if not candidates:
        return []
    ok = [fits(candidates[0])]
    with ThreadPoolExecutor(max(1, min(COMPILE_THREADS, len(candidates) - 1))) as pool:
        ok += pool.map(fits, candidates[1:])
    return [cfg for cfg, fit in zip(candidates, ok) if fit]


def _graph_of(fn: Callable[[], None], launches: int) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin()
    try:
        for _ in range(launches):
            fn()
    finally:
        graph.capture_end()
    return graph


def _replays_ms(graph: torch.cuda.CUDAGraph, count: int) -> list[float]:
    """GPU milliseconds of ``count`` back-to-back replays. One untimed replay first keeps the GPU busy while the
    host queues the timed ones, so no sample includes the host's launch latency (for graphs of more than it)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(count + 1)]
    graph.replay()
    for index in range(count):
        events[index].record()
        graph.replay()
    events[count].record()
    events[count].synchronize()
    return [start.elapsed_time(end) for start, end in zip(events, events[1:])]


def _cycling(runs: Sequence[Callable[[Config], None]], cfg: Config) -> Callable[[], None]:
    """A launch of ``cfg`` on the next of ``runs`` at each call (captured in a graph, the replays cycle too); one
    run without weight copies."""
    turn = itertools.cycle(runs)
    return lambda: next(turn)(cfg)


def _time_launches(fn: Callable[[], None], best_ms: float | None, min_launches: int = 1) -> float:
    """Milliseconds per ``fn()`` launch, from graph replays on the current (non-default) stream: 2 replays, then
    the rest of ``TIMING_REPLAYS`` unless both were ``SLOWER_CUT`` times slower than ``best_ms``. The graph holds at
    least ``min_launches`` launches (a whole cycle of weight copies)."""
    single_ms = _replays_ms(_graph_of(fn, 1), 1)[0]  # with the launch latency: sizes the graph on the safe side
    launches = max(min_launches, min(MAX_LAUNCHES, round(TIMING_MS / max(single_ms, 1e-3))))
    graph = _graph_of(fn, launches)
    samples = [ms / launches for ms in _replays_ms(graph, 2)]
    if best_ms is None or min(samples) <= SLOWER_CUT * best_ms:
        samples += [ms / launches for ms in _replays_ms(graph, TIMING_REPLAYS - 2)]
    return statistics.median(samples)
