"""Compiling and timing the GEMM candidates (zqcompile/backends/autotune.py) on the CPU: the first runs (compiles)
are concurrent, the timer sizes its graphs and cuts clearly slower candidates short. The GPU pieces (streams, CUDA
graphs, events) are replaced by fakes that record what the code asked of them."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from zqcompile.backends import autotune, triton_gemm, tuning_cache


class _FakeStream:
    device = -1  # torch.cuda.device(-1) does nothing

    def __init__(self):
        self.synchronized_in = set()  # threads that synchronized on this stream

    def wait_stream(self, other):
        pass

    def synchronize(self):
        self.synchronized_in.add(threading.get_ident())


CALLERS_STREAM = _FakeStream()


@pytest.fixture
def no_streams(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: CALLERS_STREAM)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    streams = []

    def stream(s):
        streams.append(s)
        return contextlib.nullcontext()
    monkeypatch.setattr(torch.cuda, "stream", stream)
    return streams


def test_first_runs_compile_the_other_candidates_concurrently(monkeypatch, no_streams):
    monkeypatch.setattr(autotune, "COMPILE_THREADS", 4)
    candidates = triton_gemm.candidate_configs(4096, 768, None, tma=True)[:5]
    together = threading.Barrier(4, timeout=30)  # the 4 after the first: passes only if they run at the same time
    order, caller = [], threading.get_ident()

    def run(cfg):
        # The thread's CUDA context is bound (a stream synchronization) before its first launch.
        assert threading.get_ident() in CALLERS_STREAM.synchronized_in
        order.append(cfg)
        if cfg == candidates[0]:
            assert threading.get_ident() == caller  # alone, before any other
            return
        together.wait()
        if cfg == candidates[2]:
            raise autotune.OutOfResources(300_000, 232_448, "shared memory")

    assert autotune.first_runs(candidates, run) == [c for c in candidates if c != candidates[2]]
    assert order[0] == candidates[0] and sorted(map(repr, order)) == sorted(map(repr, candidates))
    assert all(stream is CALLERS_STREAM for stream in no_streams)  # every run on the caller's stream and device


class _FakeGraph:
    def __init__(self, launches):
        self.launches = launches

    def replay(self):
        pass


def test_timer_sizes_the_graph_and_cuts_slower_candidates_short(monkeypatch):
    """One launch takes ``per_launch`` ms (a fake replay takes launches x that): the graph is sized to about
    TIMING_MS, a candidate is timed TIMING_REPLAYS times, or twice when both are SLOWER_CUT x slower than the best."""
    per_launch = {"value": 0.0}
    graphs, replays = [], []
    monkeypatch.setattr(autotune, "_graph_of", lambda fn, launches: graphs.append(launches) or _FakeGraph(launches))

    def replays_ms(graph, count):
        replays.append((graph.launches, count))
        return [graph.launches * per_launch["value"]] * count
    monkeypatch.setattr(autotune, "_replays_ms", replays_ms)

    per_launch["value"] = 0.01
    assert autotune._time_launches(lambda: None, best_ms=None) == pytest.approx(0.01)
    assert graphs == [1, 100] and replays == [(1, 1), (100, 2), (100, autotune.TIMING_REPLAYS - 2)]
    graphs.clear(), replays.clear()
    per_launch["value"] = 0.5  # a large kernel: two launches per timed graph, 2 replays (slower than the cut)
    assert autotune._time_launches(lambda: None, best_ms=0.3) == pytest.approx(0.5)
    assert graphs == [1, 2] and replays == [(1, 1), (2, 2)]
    graphs.clear(), replays.clear()
    per_launch["value"] = 1e-5  # tiny: bounded launches per graph
    autotune._time_launches(lambda: None, best_ms=1.0)
    assert graphs == [1, autotune.MAX_LAUNCHES] and replays[-1] == (autotune.MAX_LAUNCHES, autotune.TIMING_REPLAYS - 2)


def test_compile_time_is_counted(monkeypatch, no_streams):
    monkeypatch.setattr(tuning_cache, "STATS", tuning_cache.TuningStats())
    monkeypatch.setattr(autotune, "_time_launches", lambda fn, best, min_launches=1: 1.0)
    candidates = triton_gemm.candidate_configs(64, 768, None)
    assert autotune.time_candidates(candidates, lambda cfg: None) == {cfg: 1.0 for cfg in candidates}
    assert tuning_cache.STATS.compile_seconds > 0


def test_cycled_runs_put_a_whole_cycle_of_weight_copies_in_each_timed_graph(monkeypatch, no_streams):
    """With ``cycled_runs`` the timed launches go round the weight copies in turn (each from HBM, not the L2),
    every graph holds at least one whole cycle, and the copies are made once, after compiling, for all candidates."""
    candidates = triton_gemm.candidate_configs(64, 768, None)[:2]
    made, launches, graph_sizes = [], [], []

    def cycled_runs():
        made.append(True)
        return [lambda cfg, copy=copy: launches.append((cfg, copy)) for copy in range(3)]

    def fake_time(fn, best_ms, min_launches=1):
        graph_sizes.append(min_launches)
        for _ in range(7):
            fn()
        return 1.0

    monkeypatch.setattr(autotune, "_time_launches", fake_time)
    timings = autotune.time_candidates(candidates, lambda cfg: None, cycled_runs)
    assert timings == {cfg: 1.0 for cfg in candidates} and made == [True] and graph_sizes == [3, 3]
    assert launches == [(cfg, i % 3) for cfg in candidates for i in range(7)]
