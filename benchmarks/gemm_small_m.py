"""Decode-size GEMMs: the weight-streaming kernels (triton_small_m) against the prefill kernels and cuBLAS FP16.

For each N x K (Llama-7B's 4096x4096, 11008x4096, 4096x11008) and M in ``--ms`` it times, as CUDA-graph
replays (each call of a graph on its own copy of the weight, with enough copies to cycle through 3x the L2, so
the weight comes from HBM as it does in a decode step):

* ``fp16``: cuBLAS ``F.linear`` with bias (fp16 weight);
* ``w8a8`` / ``w4a8`` (INT4 weights in input-dim groups of 64, the w4a8 preset): ``new`` is the registered CUDA
  kernel of ``zq.int8_linear`` / ``zq.int4_linear`` (the weight-streaming kernel for M <= 64, else the prefill
  kernels), ``old`` is ``triton_gemm.triton_int_linear`` alone (the prefill kernels at every M);
* ``w8a16`` / ``w4a16`` (groups of 64): ``new`` is the registered kernel of ``zq.weight_only_linear``, ``old``
  its reference (dequantize the weight, then cuBLAS), the only GPU path before;
* ``w4a8-asym`` / ``w4a16-asym``: asymmetric INT4 in groups of 32 (a scale and a min per group, the ``*-asym``
  presets), ``new`` only.

Every variant is first checked against the reference op on the same GPU tensors (``--max-rel-err``); configs are
autotuned on the first call. Achieved bandwidth = weight bytes (values + scales) / time, also as a fraction
of the device-to-device copy bandwidth measured in the same run. Results go to ``--out`` (default ``$OUT`` or
benchmarks/results/) as ``gemm_small_m.json`` / ``.md``, rewritten after every shape, and the run stops starting new shapes
after ``--budget-s`` seconds.

    PYTHONPATH=. python benchmarks/gemm_small_m.py [--ms 1,8,64] [--shapes 4096x4096] [--variants w4a8,w4a8-asym]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from common import Results, copy_bandwidth_gbps, default_out_dir, rel_err, time_in_graph_ms
from zqcompile import ops
from zqcompile.backends import reference_kernels, register_cuda_kernels, triton_gemm
from zqcompile.quant import pack_int4

SHAPES = "4096x4096,11008x4096,4096x11008"  # N x K
MS = "1,2,4,8,16,32,64,128,1024,4096"
GROUP = 64  # the w4a8 / w4a16 presets' input-dim group
ASYM_GROUP = 32  # the w4a8-asym / w4a16-asym presets' group
L2_CYCLE_BYTES = 3 * 50 * 2**20  # weight copies cycled per graph: 3x the H200's 50 MB L2
VARIANTS = ("fp16", "w8a8", "w4a8", "w8a16", "w4a16", "w4a8-asym", "w4a16-asym")


def weight_copies(n: int, k: int, g: torch.Generator, variants: tuple[str, ...]) -> dict[str, list[tuple]]:
    """Each variant's (weight, scale[, mins]) tuples: as many copies as make up ``L2_CYCLE_BYTES``."""
    def copies(nbytes: int, make: Callable[[], tuple]) -> list:
        return [make() for _ in range(max(1, min(24, -(-L2_CYCLE_BYTES // nbytes))))]

    def int8() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(-127, 128, (n, k), device="cuda", generator=g, dtype=torch.int8),
                torch.rand(n, 1, device="cuda", generator=g) * 0.01 + 1e-4)

    def int4() -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.randint(-7, 8, (n, k), device="cuda", generator=g, dtype=torch.int8)
        return pack_int4(q, GROUP), torch.rand(n, k // GROUP, device="cuda", generator=g) * 0.05 + 1e-3

    def int4_asym() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = torch.randint(0, 16, (n, k), device="cuda", generator=g, dtype=torch.int8)
        groups = (n, k // ASYM_GROUP)
        return (pack_int4(q, ASYM_GROUP, symmetric=False), torch.rand(groups, device="cuda", generator=g) * 0.01 + 1e-3,
                torch.randn(groups, device="cuda", generator=g) * 0.05)

    def fp16() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(n, k, device="cuda", generator=g) * 0.02).half(), torch.empty(0)

    makers = {"fp16": (2 * n * k, fp16), "int8": (n * k, int8), "int4": (n * k // 2, int4),
              "int4_asym": (n * k // 2, int4_asym)}
    kinds = {"fp16": "fp16", "w8a8": "int8", "w8a16": "int8", "w4a8": "int4", "w4a16": "int4",
             "w4a8-asym": "int4_asym", "w4a16-asym": "int4_asym"}
    sets = {kind: copies(*makers[kind]) for kind in {kinds[v] for v in variants}}
    return {variant: sets[kinds[variant]] for variant in variants}


def weight_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def time_cycled(call: Callable[..., Any], copies: list) -> float:
    """Device time per call in us: one graph calls ``call`` once on each weight copy, replayed."""
    state = {"i": 0}

    def fn() -> Any:
        weight = copies[state["i"] % len(copies)]
        state["i"] += 1
        return call(*weight)

    return time_in_graph_ms(fn, calls=len(copies), reps=20) * 1e3


def bench_shape(m: int, n: int, k: int, weights: dict, copy_gbps: float, max_err: float,
                impls: tuple[str, ...] = ("new", "old", "cublas")) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    x16 = torch.randn(m, k, device="cuda", generator=g).half()
    x_q, x_scale = ops.quantize_per_token(x16)
    bias = torch.randn(n, device="cuda", generator=g).half() * 0.1
    calls: dict[str, dict[str, Callable]] = {
        "fp16": {"cublas": lambda w, s: F.linear(x16, w, bias)},
        "w8a8": {"new": lambda w, s: torch.ops.zq.int8_linear(x_q, x_scale, w, s, bias, torch.float16),
                 "old": lambda w, s: triton_gemm.triton_int_linear(x_q, x_scale, w, s, bias, torch.float16,
                                                                   int4=False)},
        "w4a8": {"new": lambda w, s: torch.ops.zq.int4_linear(x_q, x_scale, w, s, bias, torch.float16),
                 "old": lambda w, s: triton_gemm.triton_int_linear(x_q, x_scale, w, s, bias, torch.float16,
                                                                   int4=True)},
        "w8a16": {"new": lambda w, s: torch.ops.zq.weight_only_linear(x16, w, s, bias)},
        "w4a16": {"new": lambda w, s: torch.ops.zq.weight_only_linear(x16, w, s, bias)},
        "w4a8-asym": {"new": lambda w, s, mins: torch.ops.zq.int4_linear(x_q, x_scale, w, s, bias, torch.float16,
                                                                         mins)},
        "w4a16-asym": {"new": lambda w, s, mins: torch.ops.zq.weight_only_linear(x16, w, s, bias, mins)},
    }
    calls = {variant: {impl: call for impl, call in by_impl.items() if impl in impls}
             for variant, by_impl in calls.items() if variant in weights}
    for name in ("w8a16", "w4a16"):  # the reference is the old path
        if name in calls and "old" in impls:
            calls[name]["old"] = lambda w, s, new=calls[name]["new"]: _reference(new, w, s)
    if m > 64:  # the registered kernels are the prefill kernels: "old" would time the same code again
        for name in ("w8a8", "w4a8"):
            calls.get(name, {}).pop("old", None)
    row: dict[str, Any] = {"m": m, "n": n, "k": k}
    for variant, by_impl in calls.items():
        first = weights[variant][0]
        with reference_kernels():
            ref = by_impl.get("new", by_impl.get("old"))(*first) if variant != "fp16" and by_impl else None
        for impl, call in by_impl.items():
            key = f"{variant}_{impl}"
            tuned_before = set(triton_gemm._TUNED)
            try:
                if ref is not None:
                    err = rel_err(call(*first), ref)
                    if not err <= max_err:
                        row[key] = {"status": "wrong", "rel_err": err}
                        continue
                us = time_cycled(call, weights[variant])
                gbps = weight_bytes(*first) / us / 1e3
                row[key] = {"status": "ok", "us": us, "weight_gbps": gbps, "of_copy": gbps / copy_gbps,
                            # the config the autotuner chose on this call (kernel variants: block sizes, split-K)
                            "tuned": [str(triton_gemm._TUNED[k]) for k in set(triton_gemm._TUNED) - tuned_before]}
            except Exception as exc:  # noqa: BLE001 - a failure is a result too
                torch.cuda.synchronize()
                row[key] = {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                            "trace": traceback.format_exc()[-1500:]}
            print(f"[M={m} {n}x{k}] {key}: {json.dumps({a: b for a, b in row[key].items() if a != 'trace'})}",
                  flush=True)
    return row


def _reference(kernel_call: Callable, *weight: torch.Tensor) -> torch.Tensor:
    with reference_kernels():
        return kernel_call(*weight)


def _us(row: dict, key: str) -> float | None:
    return row.get(key, {}).get("us")


def markdown(data: dict[str, Any]) -> str:
    lines = [f"Copy bandwidth {data['copy_gbps']:.0f} GB/s.", "",
             "Device time per GEMM in us (CUDA-graph replays, weights cycled through 3x L2); `new` = the registered "
             "CUDA kernel (weight-streaming for M <= 64), `old` = the prefill Triton kernel (W8A8, W4A8) or the "
             "reference dequantize + cuBLAS (W8A16, W4A16); `%cp` = weight bytes / time against the copy bandwidth; "
             "`W4A8 / W8A8` and `W4A8 / FP16` = the speed-ups of W4A8 new (issue 14's targets: >= 1.6x and >= 3x at "
             "M <= 64).",
             "",
             "| N x K | M | FP16 | %cp | W8A8 old | W8A8 new | %cp | W4A8 old | W4A8 new | %cp | W4A8 / W8A8 | "
             "W4A8 / FP16 | W8A16 old | W8A16 new | %cp | W4A16 old | W4A16 new | %cp | W4A8-asym | %cp | "
             "W4A16-asym | %cp |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(row: dict, key: str) -> str:
        us = _us(row, key)
        return f"{us:.1f}" if us else row.get(key, {}).get("status", "-")

    def pct(row: dict, key: str) -> str:
        frac = row.get(key, {}).get("of_copy")
        return f"{100 * frac:.0f}" if frac else "-"

    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "-"

    for row in data["rows"]:
        w8, w4, f16 = _us(row, "w8a8_new"), _us(row, "w4a8_new"), _us(row, "fp16_cublas")
        lines.append("| " + " | ".join([
            f"{row['n']}x{row['k']}", str(row["m"]), cell(row, "fp16_cublas"), pct(row, "fp16_cublas"),
            cell(row, "w8a8_old"), cell(row, "w8a8_new"), pct(row, "w8a8_new"),
            cell(row, "w4a8_old"), cell(row, "w4a8_new"), pct(row, "w4a8_new"), ratio(w8, w4), ratio(f16, w4),
            cell(row, "w8a16_old"), cell(row, "w8a16_new"), pct(row, "w8a16_new"),
            cell(row, "w4a16_old"), cell(row, "w4a16_new"), pct(row, "w4a16_new"),
            cell(row, "w4a8-asym_new"), pct(row, "w4a8-asym_new"),
            cell(row, "w4a16-asym_new"), pct(row, "w4a16-asym_new")]) + " |")
    picked = [f"- M={row['m']} {row['n']}x{row['k']} {key}: {', '.join(_short(c) for c in value['tuned'])}"
              for row in data["rows"] for key, value in row.items()
              if isinstance(value, dict) and value.get("tuned") and key.endswith("_new")]
    if picked:
        lines += ["", "Configs the autotuner picked for `new` (on its first call of each shape key; `gemv` = the GEMV "
                  "kernel, `mma` = the tensor-core weight-streaming kernel, else the prefill kernels):", "", *picked]
    return "\n".join(lines) + "\n"


def _short(config: str) -> str:
    """``StreamConfig(block_n=32, block_k=512, num_warps=4, num_stages=2, waves=4, kernel='gemv')`` -> ``gemv
    n32 k512 w4 s2 x4``; other configs as they are."""
    if not config.startswith("StreamConfig("):
        return config
    fields = dict(item.split("=") for item in config[len("StreamConfig("):-1].split(", "))
    return (f"{fields['kernel'].strip(chr(39))} n{fields['block_n']} k{fields['block_k']} w{fields['num_warps']} "
            f"s{fields['num_stages']} x{fields['waves']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(default_out_dir()))
    parser.add_argument("--shapes", default=SHAPES, help="N x K list")
    parser.add_argument("--ms", default=MS)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--impls", default="new,old,cublas",
                        help="which implementations to time: new (registered kernels), old (before them), cublas (FP16)")
    parser.add_argument("--max-rel-err", type=float, default=5e-3)
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new shape after this many seconds")
    args = parser.parse_args()
    variants = tuple(args.variants.split(","))
    if set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown --variants {sorted(set(variants) - set(VARIANTS))}; choose from {list(VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gemm_small_m.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    register_cuda_kernels()
    res = Results(Path(args.out), "gemm_small_m", args, {"copy_gbps": copy_bandwidth_gbps(), "rows": []}, markdown)
    t0 = time.perf_counter()
    g = torch.Generator(device="cuda").manual_seed(0)
    for spec in args.shapes.split(","):
        n, k = (int(v) for v in spec.split("x"))
        weights = weight_copies(n, k, g, variants)
        for m in (int(v) for v in args.ms.split(",")):
            if time.perf_counter() - t0 > args.budget_s:
                res.data["notes"].append(f"stopped at the {args.budget_s:.0f} s budget before M={m} {n}x{k}")
                break
            res.add("rows", bench_shape(m, n, k, weights, res.data["copy_gbps"], args.max_rel_err,
                                        tuple(args.impls.split(","))))
        del weights
        torch.cuda.empty_cache()
    res.data["notes"].append(f"wall time {time.perf_counter() - t0:.0f} s (including autotuning)")
    res.save()
    print(res.markdown())


if __name__ == "__main__":
    main()
