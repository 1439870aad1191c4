"""Sweep every candidate config of the Triton INT8 GEMMs (tiled and persistent TMA) against cuBLAS FP16. Needs a GPU.

For each M x N x K shape (activations int8 [M, K], weight int8 [N, K], per-token and per-channel scales, fp16
bias and output) it times cuBLAS FP16 ``F.linear`` with bias, then every config that ``candidate_configs``
offers for the shape (both kernels where ``tma_kernel_applies``), each forced with ``config=``, and the
autotuned default. Each config's output is first checked against ``ops._int_linear_reference`` (relative
error <= ``--max-rel-err``); a config that fails to compile, to run or the check is reported, not timed.
Times are CUDA-graph replays (``common.time_in_graph_ms``: 10 calls per graph, median of 30 replays).

Results go to ``--out`` (default ``$OUT``, else the git-ignored benchmarks/results/) as ``gemm_sweep.md`` and
``gemm_sweep.json``, rewritten after every shape.

    PYTHONPATH=. python benchmarks/gemm_sweep.py [--shapes 4096x768x3072,...]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from common import Results, default_out_dir, rel_err, table, time_in_graph_ms
from zqcompile import ops
from zqcompile.backends import triton_gemm
from zqcompile.backends.triton_gemm import GemmConfig

SHAPES = ("4096x768x3072,4096x768x768,4096x3072x768,4096x2304x768,128x768x3072,"
          "1024x2048x2048,1024x8192x2048,1024x2048x8192,16384x4096x1024")
CALLS, REPS = 10, 30


def label(cfg: GemmConfig) -> str:
    return (f"{cfg.kernel} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"
            + (" subtile" if cfg.subtile else "") + (f" {cfg.ctas_per_sm}cta/SM" if cfg.ctas_per_sm > 1 else ""))


def measure(fn: Callable[[], torch.Tensor], ref: torch.Tensor, max_err: float) -> dict[str, Any]:
    """Check ``fn()`` against ``ref``, then time it; a failure becomes an error entry."""
    try:
        err = rel_err(fn(), ref)
        if not err <= max_err:
            return {"status": "wrong", "rel_err": err}
        return {"status": "ok", "rel_err": err, "us": time_in_graph_ms(fn, calls=CALLS, reps=REPS) * 1e3}
    except Exception as exc:  # noqa: BLE001 - a config that cannot compile or run is a result too
        torch.cuda.synchronize()
        return {"status": "failed", "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                "trace": traceback.format_exc()[-2000:]}


def sweep_shape(m: int, n: int, k: int, max_err: float) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    a8 = torch.randint(-127, 128, (m, k), device="cuda", generator=g, dtype=torch.int8)
    w8 = torch.randint(-127, 128, (n, k), device="cuda", generator=g, dtype=torch.int8)
    s_x = torch.rand(m, 1, device="cuda", generator=g) * 0.01 + 1e-4
    s_w = torch.rand(n, 1, device="cuda", generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, device="cuda", generator=g).half()
    a16 = (a8.float() * s_x).half()  # the FP16 GEMM on the same values, so its check is meaningful too
    w16 = (w8.float() * s_w).half()
    ref = ops._int_linear_reference(a8, s_x, w8, s_w, bias, torch.float16)
    tops = 2 * m * n * k / 1e6  # / us -> TOPS

    rows: list[dict[str, Any]] = []

    def add(variant: str, kernel: str, res: dict[str, Any]) -> None:
        if "us" in res:
            res["tops"] = tops / res["us"]
            res["speedup_vs_fp16"] = rows[0]["us"] / res["us"] if rows and "us" in rows[0] else None
        rows.append({"variant": variant, "kernel": kernel, **res})
        shown = {key: val for key, val in rows[-1].items() if key != "trace"}
        print(f"[{m}x{n}x{k}] {json.dumps(shown, default=str)}", flush=True)

    add("cuBLAS FP16 F.linear", "cublas",
        measure(lambda: torch.nn.functional.linear(a16, w16, bias), ref, max_err))
    out = torch.empty(m, n, dtype=torch.float16, device="cuda")
    tma = triton_gemm.tma_kernel_applies(a8, w8, out, int4=False, g_in=1)
    for cfg in triton_gemm.candidate_configs(m, k, None, tma=tma):
        add(label(cfg), cfg.kernel, measure(lambda cfg=cfg: triton_gemm.triton_int_linear(
            a8, s_x, w8, s_w, bias, torch.float16, int4=False, config=cfg), ref, max_err))

    def autotuned() -> torch.Tensor:
        return triton_gemm.triton_int_linear(a8, s_x, w8, s_w, bias, torch.float16, int4=False)

    t0 = time.perf_counter()
    res = measure(autotuned, ref, max_err)  # the first call tunes, outside the graph
    chosen = triton_gemm._TUNED.get(triton_gemm.tuning_key(m, n, k, None, False, tma, True, torch.float16, None,
                                                           a8.device.index))
    add(f"autotuned -> {label(chosen) if chosen else '?'}", "autotuned",
        {**res, "tune_s": round(time.perf_counter() - t0, 1)})
    return {"shape": f"{m}x{n}x{k}", "tma_applies": tma, "rows": rows}


def render(data: dict[str, Any]) -> str:
    """The best config of each kernel per shape, then every config timed."""
    best_rows = []
    for shape in data["shapes"]:
        rows = shape["rows"]
        fp16 = rows[0].get("us")
        cells = [shape["shape"], f"{fp16:.1f}" if fp16 else "n/a"]
        for kernel in ("tiled", "tma_persistent"):
            timed = [r for r in rows if r["kernel"] == kernel and "us" in r]
            best = min(timed, key=lambda r: r["us"], default=None)
            cells += ([best["variant"].split(" ", 1)[1], f"{best['us']:.1f}", f"{best['speedup_vs_fp16']:.2f}"]
                      if best and fp16 else ["-", "-", "-"])
        tuned = next((r for r in rows if r["kernel"] == "autotuned"), {})
        cells.append(f"{tuned['speedup_vs_fp16']:.2f}" if tuned.get("us") and fp16 else "-")
        best_rows.append(cells)
    every_row = [[shape["shape"], r["variant"], r["status"], f"{r['us']:.1f}" if "us" in r else "-",
                  f"{r['tops']:.0f}" if "tops" in r else "-",
                  f"{r['speedup_vs_fp16']:.2f}x" if r.get("speedup_vs_fp16") else "-",
                  f"{r['rel_err']:.1e}" if "rel_err" in r else r.get("error", "-")[:80].replace("|", "/")]
                 for shape in data["shapes"] for r in shape["rows"]]
    lines = ["Best of each kernel per shape (speedup vs cuBLAS FP16 F.linear with bias, CUDA-graph timed):", ""]
    lines += table(["MxNxK", "cuBLAS FP16 us", "best tiled", "us", "x", "best tma_persistent", "us", "x",
                    "autotuned x"], best_rows)
    lines += table(["MxNxK", "variant", "status", "us", "TOPS", "vs cuBLAS FP16", "rel err"], every_row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_out_dir())
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--max-rel-err", type=float, default=1e-2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gemm_sweep.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's float32 GEMMs must stay exact
    res = Results(args.out, "gemm_sweep", args, {"shapes": []}, render)
    t0 = time.perf_counter()
    for spec in args.shapes.split(","):
        m, n, k = (int(v) for v in spec.split("x"))
        res.data["shapes"].append(sweep_shape(m, n, k, args.max_rel_err))
        res.save()
    res.data["notes"].append(f"sweep wall time {time.perf_counter() - t0:.0f} s")
    res.save()
    print(res.markdown())


if __name__ == "__main__":
    main()
