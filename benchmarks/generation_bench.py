"""GPU generation speed (issue 13): prefill 128 tokens, then 128 decode steps, fp16, B in ``--batches``.

For each model (``--models``: ``smollm2`` = SmolLM2-135M's architecture, ``llama1b`` = hidden 2048, 16 layers,
32 heads, 8 KV heads (Llama-3.2-1B's shape), ``llama7b`` = hidden 4096, 32 layers, intermediate 11008
(Llama-2-7B's shape); weights random unless ``--smollm2-weights`` names a local HF directory), in one run:

* ``fp16-eager``: transformers' own ``generate`` of the FP16 model (dynamic cache, eager PyTorch);
* ``fp16-zq``: zqcompile's decode runtime with every linear kept in FP16 (same static cache, same CUDA graphs,
  no quantization): the fastest compiled FP16 decode here (transformers' static cache + ``torch.compile`` failed
  on this image, see BENCHMARKS.md, and is not retried);
* ``w8a8``, ``w8a16``, ``w4a8``: zqcompile; ``w8a8-rot``, ``w4a8-rot``: the same after the Hadamard rotation, whose
  online transform before every o_proj and down_proj runs fused with the activation quantization (its speed cost).

Each zqcompile variant is compiled with ``max_cache_len`` = 256 and warmed up for the batch sizes first
(``qmodel.warmup``: every CUDA graph captured, every GEMM tuned), and the run checks that generating captured no
further graph. Per-token decode latency = (time of ``generate`` with 128 new tokens - time with 1) / 127 (the
decode steps), each the median of ``--reps`` runs, CUDA-synchronised (so it includes the sampling and the Python
loop, as a user sees it); prefill = the time with 1 new token. ``fp16-eager`` uses 33 new tokens instead of 128
(it is Python-bound, about constant per token). The bandwidth floor of a decode step is the bytes of weights
it reads (every tensor of the compiled model but the input-embedding rows it does not gather) over the measured
device-to-device copy bandwidth. Models run in the order given until ``--budget-s`` is spent; what did not run
is listed as cut.

    PYTHONPATH=. python benchmarks/generation_bench.py --models smollm2,llama1b,llama7b --batches 1,8,32
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zqcompile  # noqa: E402
from common import (LLAMA_CONFIGS, Results, copy_bandwidth_gbps, cuda_rewrites, default_out_dir,  # noqa: E402
                    profile_kernels, profile_tables, summarise_kernels, table)

PROMPT, NEW, EAGER_NEW, CACHE = 128, 128, 33, 256
FP16_KEPT = {"base": "w8a8", "keep_fp": ["*"]}
VARIANTS = {"fp16-zq": FP16_KEPT, **{preset: preset for preset in (
    "w8a8", "w8a16", "w4a8", "w4a16", "w8a8-rot", "w4a8-rot", "w4a8-asym", "w4a16-asym")}}


def build(name: str, weights: str | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if weights:
        model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float16)
    else:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIGS[name], dtype=torch.float16)).half()
    model = model.cuda().eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def seconds(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of ``fn()`` with the device synchronised around it."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_token(generate: Callable[[int], Any], new: int, reps: int) -> tuple[float, float]:
    """(prefill ms, decode ms per token) from generations of 1 and ``new`` tokens (``new - 1`` decode steps)."""
    generate(2)  # warm-up
    first = seconds(lambda: generate(1), reps)
    full = seconds(lambda: generate(new), reps)
    return first * 1e3, (full - first) / (new - 1) * 1e3


def decode_weight_bytes(qmodel, model: torch.nn.Module, batch: int) -> int:
    """Bytes of weights one decode step reads: every tensor but the input embedding rows it does not gather."""
    embedding = model.get_input_embeddings().weight
    unread = 0 if model.config.tie_word_embeddings else (embedding.shape[0] - batch) * embedding.shape[1] * 2
    return qmodel.weight_memory().total - unread


def decode_step_profile(qmodel, ids: torch.Tensor) -> tuple[float, dict[str, Any], list[dict[str, Any]]]:
    """One decode step alone, after a prefill of ``ids``: its synchronised wall ms (the CUDA-graph replay, without
    ``generate``'s sampling and Python loop), its kernels' total and the kernels per name."""
    steps = qmodel.generation.steps
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    steps.prefill(ids, mask, positions, NEW)
    token, position = ids[:, -1], positions[:, -1] + 1
    step_ms = seconds(lambda: steps.decode(token, position), reps=20) * 1e3
    total, kernels = summarise_kernels(profile_kernels(lambda: steps.decode(token, position)))
    return step_ms, total, kernels


def measure_variant(model: torch.nn.Module, name: str, variant: str, recipe: Any, args: argparse.Namespace,
                    res: Results) -> None:
    params = sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    qmodel = zqcompile.compile(model, recipe, max_cache_len=CACHE, target_passes=cuda_rewrites(args.cuda_rewrites))
    compiled = time.perf_counter()
    qmodel.warmup(batch_sizes=args.batches, prompt_lens=[PROMPT], max_new_tokens=NEW)
    warmed = time.perf_counter()
    captures = qmodel.generation.captures
    for batch in args.batches:
        ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device="cuda")
        prefill, decode = per_token(lambda n: qmodel.generate(ids, max_new_tokens=n, eos_token_id=[]), NEW,
                                    args.reps)
        weights = decode_weight_bytes(qmodel, model, batch)
        row = dict(model=name, params=params, variant=variant, batch=batch, prefill_ms=prefill, decode_ms=decode,
                   tokens_per_s=batch / decode * 1e3, weight_bytes=weights,
                   floor_ms=weights / res.data["copy_gbps"] / 1e6,
                   compile_s=compiled - started, warmup_s=warmed - compiled)
        if args.profile:
            row["step_ms"], total, kernels = decode_step_profile(qmodel, ids)
            row["kernel_ms"] = total["us"] / 1e3
            res.data["profiles"][f"{name} {variant} B={batch}, one decode step"] = kernels[:12]
        res.add("rows", row)
    if qmodel.generation.captures != captures:
        res.add("rows", dict(model=name, variant=variant,
                             error=f"generate captured {qmodel.generation.captures - captures} graphs after warm-up"))


def run_model(name: str, args: argparse.Namespace, res: Results, deadline: float) -> None:
    model = build(name, args.smollm2_weights if name == "smollm2" else None)
    params = sum(p.numel() for p in model.parameters())
    for batch in args.batches:
        ids = torch.randint(0, model.config.vocab_size, (batch, PROMPT), device="cuda")
        with torch.no_grad():
            prefill, decode = per_token(lambda n: model.generate(ids, max_new_tokens=n, do_sample=False),
                                        EAGER_NEW, args.reps)
        res.add("rows", dict(model=name, params=params, variant="fp16-eager", batch=batch, prefill_ms=prefill,
                             decode_ms=decode, tokens_per_s=batch / decode * 1e3))
    for variant in args.variants:
        recipe = VARIANTS[variant]
        if time.perf_counter() > deadline:
            res.add("rows", dict(model=name, variant=variant, cut="time budget spent"))
            continue
        measure_variant(model, name, variant, recipe, args, res)
        gc.collect()  # the compiled model, its CUDA graphs and cache
        torch.cuda.empty_cache()


def render(data: dict[str, Any]) -> str:
    """The command, the table and the decode-step profiles of one run (``Results`` adds the environment line, notes
    and errors)."""
    rows = data["rows"]

    def cells(row: dict[str, Any]) -> list[Any]:
        if "decode_ms" not in row:
            return [row["model"], "", row["variant"], row.get("cut") or row.get("error"), *[""] * 6]
        fp16 = [r["decode_ms"] for r in rows if r["model"] == row["model"] and r.get("batch") == row["batch"]
                and r["variant"].startswith("fp16") and "decode_ms" in r]
        step = [f"{row['step_ms']:.3f}", f"{row['kernel_ms']:.3f}"] if "step_ms" in row else ["", ""]
        return [row["model"], row["batch"], row["variant"], f"{row['prefill_ms']:.1f}", f"{row['decode_ms']:.2f}",
                f"{row['tokens_per_s']:.0f}", f"{min(fp16) / row['decode_ms']:.2f}x" if fp16 else "",
                f"{row['floor_ms']:.2f}" if "floor_ms" in row else "", *step]

    lines = [f"copy bandwidth {data['copy_gbps']:.0f} GB/s", f"`{data['command']}`", ""]
    lines += table(["model", "B", "variant", "prefill 128 ms", "decode ms/token", "tokens/s", "vs fastest FP16",
                    "weights floor ms", "one step ms (replay)", "its kernels ms"], [cells(row) for row in rows])
    return "\n".join(lines + profile_tables(data["profiles"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,llama1b,llama7b")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="zqcompile variants, in order")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=3600.0, help="start no new zqcompile variant after this")
    parser.add_argument("--profile", action="store_true", help="also time and profile one decode step alone")
    parser.add_argument("--cuda-rewrites", default=None,
                        help="comma-separated cuda target passes to keep (default: all), e.g. "
                             "fuse_sibling_linears,additive_attention_mask for the rewrites before issue 14")
    parser.add_argument("--smollm2-weights", default=None, help="a local HF directory with SmolLM2's weights")
    parser.add_argument("--out", type=Path, default=default_out_dir())
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variants = args.variants.split(",")
    deadline = time.perf_counter() + args.budget_s
    res = Results(args.out, "generation_bench", args, {"copy_gbps": copy_bandwidth_gbps(), "rows": [],
                  "profiles": {}, "command": "PYTHONPATH=. python " + " ".join(sys.argv)}, render)
    for name in args.models.split(","):
        if time.perf_counter() > deadline:
            res.add("rows", dict(model=name, variant="all", cut="time budget spent"))
            continue
        try:
            run_model(name, args, res, deadline)
        except Exception as err:  # keep what the other models measured
            summary = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
            res.add("rows", dict(model=name, variant="?", error=summary[:200]))
            traceback.print_exc()
        gc.collect()
        torch.cuda.empty_cache()
    print(res.markdown())


if __name__ == "__main__":
    main()
