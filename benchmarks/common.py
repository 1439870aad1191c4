"""What the benchmark scripts share: where results go, the environment they ran in, timing, the results files,
kernel profiling, and the models and inputs the GPU scripts time.

Results go to ``--out``, by default ``$OUT`` when set (the device machine's output folder), else
``benchmarks/results/``, which git ignores: a run never dirties the tree. BENCHMARKS.md keeps the current
figures, each with the command that measured it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("triton", "numba", "numba-cuda", "numpy", "transformers", "onnxruntime")
"""Versions recorded with every result besides Python and torch (those not installed are left out)."""
SEQ = 128


def default_out_dir() -> Path:
    return Path(os.environ.get("OUT") or RESULTS_DIR)


# ---------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    """Date, device and package versions, read now (a result file is never labelled by hand)."""
    env: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability())))
    for package in PACKAGES:
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return env


def environment_line(env: dict[str, Any]) -> str:
    """One line: device, date, versions."""
    device = (f"GPU: {env['gpu']} ({env['sm_count']} SMs)" if "gpu" in env
              else f"CPU: {env['machine']}, {env['cpu_count']} cores")
    cuda = f" (CUDA {env['cuda']})" if env.get("cuda") else ""
    others = "".join(f", {p} {env[p]}" for p in PACKAGES if p in env)
    return f"{device}, {env['date_utc']}; Python {env['python']}, torch {env['torch']}{cuda}{others}"


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------

def time_ms(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Median latency of ``fn()`` in ms: CUDA events around each call, synchronised after each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_in_graph_ms(fn: Callable[[], Any], calls: int = 20, reps: int = 30) -> float:
    """Median device time of one ``fn()`` call: ``calls`` calls captured in one CUDA graph, replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, warmup=3, reps=reps) / calls


def interleaved_median_ms(runners: dict[str, Callable[[], Any]], rounds: int, warmup: int = 2) -> dict[str, float]:
    """CPU wall time (perf_counter) of each runner, median over ``rounds`` rounds that run every runner once:
    a load spike from other processes on a shared machine hits all runners alike."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) * 1000 for name, samples in times.items()}


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth (read + write) in GB/s: the bandwidth floor figures are measured against it."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=5, reps=20)
    return 2 * src.numel() * 4 / ms / 1e6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------

class Results:
    """One run's measurements as ``out_dir/<name>.json`` (environment, arguments, sections) and ``<name>.md``
    (the environment line, then ``render(data)``), both rewritten after every measurement so that a run cut
    short keeps what it measured."""

    def __init__(self, out_dir: Path, name: str, args: Any, sections: dict[str, Any],
                 render: Callable[[dict[str, Any]], str]):
        self.out_dir = Path(out_dir)
        self.name = name
        self.render = render
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"env": environment(), "args": vars(args), **sections, "notes": [],
                                     "errors": []}

    def add(self, section: str, row: Any) -> None:
        self.data[section].append(row)
        print(f"[{section}] {json.dumps(row, default=str)}", flush=True)
        self.save()

    def markdown(self) -> str:
        lines = [environment_line(self.data["env"]), "", self.render(self.data).rstrip("\n")]
        lines += [f"- {note}" for note in self.data["notes"]]
        lines += [f"- ERROR {err['where']}: {err['error']}" for err in self.data["errors"]]
        return "\n".join(lines) + "\n"

    def save(self) -> None:
        (self.out_dir / f"{self.name}.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out_dir / f"{self.name}.md").write_text(self.markdown())


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown table's lines (empty when there are no rows), with a blank line after it."""
    if not rows:
        return []
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows), ""]


# ---------------------------------------------------------------------------------------------------------
# Kernel profiling
# ---------------------------------------------------------------------------------------------------------

def profile_kernels(fn: Callable[[], Any]) -> list[tuple[str, float]]:
    """(kernel name, device us) of every kernel that one ``fn()`` call runs (after 3 warm-up calls), in launch order."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [(e.name, e.device_time) for e in sorted(events, key=lambda e: e.time_range.start)]


def summarise_kernels(kernels: list[tuple[str, float]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The total over all kernels, and per kernel name its total us and calls, largest first."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, us in kernels:
        totals[name][0] += us
        totals[name][1] += 1
    rows = [{"name": k, "us": v[0], "calls": v[1]} for k, v in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    return {"name": "all kernels", "us": sum(us for _, us in kernels), "calls": len(kernels)}, rows


def profile_tables(profiles: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One table of kernels (total us, calls) per profiled variant."""
    lines: list[str] = []
    for name, rows in profiles.items():
        lines += [f"Top CUDA kernels, {name}:", ""]
        lines += table(["kernel", "total us", "calls"], [[r["name"][:90], f"{r['us']:.0f}", r["calls"]] for r in rows])
    return lines


# ---------------------------------------------------------------------------------------------------------
# Models and inputs of the GPU benchmarks (random weights: speed does not depend on the values)
# ---------------------------------------------------------------------------------------------------------

def bert_base() -> torch.nn.Module:
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig()).eval().half().cuda()


# Llama-architecture shapes shared by the prefill and generation benchmarks (random weights)
LLAMA_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=8192),
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                    max_position_embeddings=131072),
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
                    max_position_embeddings=4096),
}


def gpt_decoder(size: str) -> torch.nn.Module:
    """A decoder without its LM head (hidden states out): GPT-2 architecture at GPT-2-medium (``350m``) or
    GPT-3-XL-like (``1.3b``) width, or a Llama of ``LLAMA_CONFIGS`` (``llama1b``, ``llama7b``)."""
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel
    torch.manual_seed(0)
    if size in LLAMA_CONFIGS:
        with torch.device("cuda"):
            return LlamaModel(LlamaConfig(**LLAMA_CONFIGS[size], dtype=torch.float16)).eval().half()
    width = {"350m": 1024, "1.3b": 2048}[size]
    return GPT2Model(GPT2Config(n_embd=width, n_layer=24, n_head=16)).eval().half().cuda()


def token_inputs(vocab: int, batch: int, with_types: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, SEQ), generator=g).cuda()
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if with_types:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def cuda_rewrites(names: str | None) -> list[str] | None:
    """``--cuda-rewrites`` as zqcompile.compile's ``target_passes`` (None: all of the cuda target's passes)."""
    return None if names is None else [n for n in names.split(",") if n]
