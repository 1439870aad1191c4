"""Where the time of one compiled-model call goes besides the CUDA-graph replay (BERT-base W8A8, S=128). Needs a GPU.

For each batch size, after the graph is captured and warmed:

* latency (CUDA events, synchronised after each call, as ``gpu_latency.py`` times it) of ``qmodel(**inputs)``
  against a bare ``graph.replay()`` of the same captured graph: the difference is what the Python wrapper adds;
* host time per call (``perf_counter``, no profiler), split at the replay: before it (input checks, bucketing, the
  copy into the graph's buffers: on the latency path, the GPU idles meanwhile), the replay launch, and after it
  (output copies and the HF output object, overlapped with the graph's GPU work, then the read-back of the index
  guard's flag, which waits for the graph to finish: this part includes GPU time);
* ``torch.profiler`` over ``--calls`` calls and over as many bare replays: the CUDA kernels and memory copies of the
  calls minus those of the replays (what runs outside the graph), and the CUDA runtime calls per call
  (kernel launches, copies, synchronisations) outside the replay;
* then a call with an out-of-vocabulary token id, which the graph's index guard must turn into a ZQError (not a
  device-side assert), and a call after it, whose output must equal the earlier one's (the CUDA context survived).

    PYTHONPATH=. python benchmarks/call_profile.py --batches 1,32     # < 60 s on an H200 with a warm tuning cache
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

import zqcompile
from common import Results, bert_base, default_out_dir, table, time_ms, token_inputs


class _TimedReplay:
    """Wraps ``torch.cuda.CUDAGraph.replay`` to record the host time at which each replay starts and returns."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float]] = []
        self.original = torch.cuda.CUDAGraph.replay

    def __enter__(self) -> _TimedReplay:
        original, marks = self.original, self.marks

        def replay(graph: torch.cuda.CUDAGraph) -> None:
            start = time.perf_counter()
            original(graph)
            marks.append((start, time.perf_counter()))

        torch.cuda.CUDAGraph.replay = replay
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.CUDAGraph.replay = self.original


def host_split_us(call: Callable[[], Any], reps: int) -> dict[str, float]:
    """Median host microseconds per call before, during and after the (single) graph replay it makes."""
    parts: dict[str, list[float]] = {"before replay": [], "replay launch": [], "after replay": [], "call": []}
    for _ in range(reps):
        torch.cuda.synchronize()
        with _TimedReplay() as timed:
            start = time.perf_counter()
            call()
            end = time.perf_counter()
        (replay_start, replay_end), = timed.marks
        parts["before replay"].append(replay_start - start)
        parts["replay launch"].append(replay_end - replay_start)
        parts["after replay"].append(end - replay_end)
        parts["call"].append(end - start)
    return {name: statistics.median(values) * 1e6 for name, values in parts.items()}


RUNTIME_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync",
                 "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaGraphLaunch",
                 "cudaMemsetAsync")


def profile_counts(fn: Callable[[], Any], calls: int) -> tuple[Counter, Counter]:
    """Per name, how many device events (kernels, copies) and CUDA runtime calls ``calls`` calls of ``fn`` made."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device, runtime = Counter(), Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            device[event.name] += 1
        elif event.name in RUNTIME_CALLS:
            runtime[event.name] += 1
    return device, runtime


def outside(full: Counter, bare: Counter, calls: int) -> list[list[Any]]:
    """Names whose count over the calls exceeds that over the bare replays, per call."""
    return [[name[:90], f"{(count - bare[name]) / calls:g}"] for name, count in full.most_common()
            if count > bare[name]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--recipe", default="w8a8")
    parser.add_argument("--calls", type=int, default=20, help="calls under the profiler")
    parser.add_argument("--reps", type=int, default=200, help="calls timed without the profiler")
    parser.add_argument("--out", default=str(default_out_dir()))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/call_profile.py needs a CUDA GPU")

    def render(data: dict[str, Any]) -> str:
        lines = table(["B", "call ms", "bare replay ms", "wrapper adds ms", "host us before replay",
                       "replay launch us", "after replay us", "host us per call"],
                      [[r["batch"], f"{r['call_ms']:.3f}", f"{r['replay_ms']:.3f}",
                        f"{r['call_ms'] - r['replay_ms']:.3f}", *(f"{r['host_us'][k]:.1f}" for k in
                        ("before replay", "replay launch", "after replay", "call"))] for r in data["rows"]])
        for r in data["rows"]:
            lines += [f"B={r['batch']}: device work per call outside the graph replay:", ""]
            lines += table(["kernel / copy", "per call"], r["kernels_outside"]) or ["(none)", ""]
            lines += [f"B={r['batch']}: CUDA runtime calls per call outside the replay:", ""]
            lines += table(["runtime call", "per call"], r["runtime_outside"]) or ["(none)", ""]
        return "\n".join(lines)

    res = Results(args.out, "call_profile", args, {"rows": []}, render)
    model = bert_base()
    t0 = time.perf_counter()
    qmodel = zqcompile.compile(model, args.recipe, backend="cuda")
    res.data["notes"].append(f"compile {time.perf_counter() - t0:.1f} s")
    for batch in (int(b) for b in args.batches.split(",")):
        inputs = token_inputs(model.config.vocab_size, batch, with_types=True)
        t0 = time.perf_counter()
        qmodel(**inputs)  # captures (and tunes) this shape
        res.data["notes"].append(f"B={batch}: first call (capture) {time.perf_counter() - t0:.1f} s")
        call = lambda: qmodel(**inputs)  # noqa: E731
        (graph,) = [entry.graph for entry in qmodel.runner._graphs.values()  # noqa: SLF001 - a probe
                    if entry.static_inputs[0].shape == inputs["input_ids"].shape]
        full_device, full_runtime = profile_counts(call, args.calls)
        bare_device, bare_runtime = profile_counts(graph.replay, args.calls)
        res.add("rows", {
            "batch": batch,
            "call_ms": time_ms(call, warmup=10, reps=args.reps),
            "replay_ms": time_ms(graph.replay, warmup=10, reps=args.reps),
            "host_us": host_split_us(call, args.reps),
            "kernels_outside": outside(full_device, bare_device, args.calls),
            "runtime_outside": outside(full_runtime, bare_runtime, args.calls),
        })
        res.data["notes"].append(f"B={batch}: {bad_id_check(qmodel, inputs, model.config.vocab_size)}")
    print(res.markdown())


def bad_id_check(qmodel: Any, inputs: dict[str, torch.Tensor], vocab: int) -> str:
    """What an out-of-vocabulary id does: the ZQError expected, then a good call equal to one made before it."""
    before = qmodel(**inputs).last_hidden_state
    bad = {**inputs, "input_ids": inputs["input_ids"].clone()}
    bad["input_ids"][0, -1] = vocab
    try:
        qmodel(**bad)
        outcome = "out-of-vocabulary id: NO error raised"
    except zqcompile.ZQError as err:
        outcome = f"out-of-vocabulary id: ZQError ({str(err)[:80]}...)"
    same = torch.equal(qmodel(**inputs).last_hidden_state, before)
    return f"{outcome}; the next call {'equals' if same else 'DIFFERS FROM'} the one before"


if __name__ == "__main__":
    main()
