"""Does the lean tuner (zqcompile/backends/autotune.py) pick as fast a config as the timing it replaced? Needs a GPU.

For each M x N x K shape (W8A8 operands as BERT-base has them: int8 activations and weights, per-token and
per-channel scales, fp16 bias and output) it times every candidate config of the Triton INT8 GEMM twice: with
``autotune.time_candidates`` (what the tuner runs now) and with Triton's ``do_bench_cudagraph(rep=10)``, median (what
it ran before). Reported per shape: the seconds each took, both picks, and the reference time of the new pick over
the reference's best (1.000: no speed lost), and the largest disagreement between the two timings of a candidate
that the new timer timed fully.

    PYTHONPATH=. python benchmarks/tuner_check.py [--shapes 8192x2304x768,...]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from triton.testing import do_bench_cudagraph

from common import Results, default_out_dir, table
from zqcompile.backends import autotune, triton_gemm
from zqcompile.backends.triton_gemm import GemmConfig, _Problem

SHAPES = "8192x2304x768,4096x768x3072,1024x3072x768,256x768x768,128x768x3072"


def label(cfg: GemmConfig) -> str:
    return f"{cfg.kernel} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"


def check_shape(m: int, n: int, k: int) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    a = torch.randint(-127, 128, (m, k), device="cuda", generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), device="cuda", generator=g, dtype=torch.int8)
    s_x = torch.rand(m, device="cuda", generator=g) * 0.01 + 1e-4
    s_w = torch.rand(n, 1, device="cuda", generator=g) * 0.01 + 1e-4
    bias = torch.randn(n, device="cuda", generator=g, dtype=torch.float16)
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)
    tma = triton_gemm.tma_kernel_applies(a, w, out, int4=False, g_in=1)
    candidates = triton_gemm.candidate_configs(m, k, None, tma=tma)
    problem = _Problem(m, n, k, n, 1)

    def run(cfg: GemmConfig) -> None:
        triton_gemm._launch(a, s_x, w, s_w, None, bias, out, problem, False, cfg)  # noqa: SLF001 - the tuner's launch

    start = time.perf_counter()
    new = autotune.time_candidates(candidates, run)
    new_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = {cfg: do_bench_cudagraph(lambda: run(cfg), rep=10, return_mode="median") for cfg in new}
    reference_s = time.perf_counter() - start
    new_pick, reference_pick = min(new, key=new.get), min(reference, key=reference.get)
    cut = autotune.SLOWER_CUT * new[new_pick]  # candidates above it may have been timed with 2 replays only
    agreement = max(abs(new[c] / reference[c] - 1) for c in new if new[c] <= cut)
    best = reference[reference_pick]
    return {"shape": f"{m}x{n}x{k}", "candidates": len(candidates), "fitting": len(new), "new_s": round(new_s, 2),
            "reference_s": round(reference_s, 2), "new_pick": label(new_pick), "reference_pick": label(reference_pick),
            "speed_kept": round(best / reference[new_pick], 3), "new_pick_us": round(new[new_pick] * 1e3, 2),
            "reference_best_us": round(best * 1e3, 2), "max_timing_disagreement": round(agreement, 3)}


def render(data: dict[str, Any]) -> str:
    return "\n".join(table(
        ["shape", "candidates (fitting)", "new tuner s", "do_bench s", "new pick", "do_bench pick",
         "do_bench best / new pick", "new pick us", "do_bench best us", "max timing disagreement"],
        [[r["shape"], f"{r['candidates']} ({r['fitting']})", r["new_s"], r["reference_s"], r["new_pick"],
          r["reference_pick"], r["speed_kept"], r["new_pick_us"], r["reference_best_us"],
          r["max_timing_disagreement"]] for r in data["rows"]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--out", default=str(default_out_dir()))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/tuner_check.py needs a CUDA GPU")
    res = Results(args.out, "tuner_check", args, {"rows": []}, render)
    for shape in args.shapes.split(","):
        m, n, k = (int(x) for x in shape.split("x"))
        res.add("rows", check_shape(m, n, k))
    print(res.markdown())


if __name__ == "__main__":
    main()
