"""LLM.int8() on the GPU: ``zq.outlier_int8_linear``'s Triton kernel (backends/triton_outlier.py) against plain W8A8
and cuBLAS FP16 (issue 18). Needs a GPU.

For each N x K (Llama-7B's 4096x4096 and 11008x4096) and M in ``--ms`` it times, as CUDA-graph replays
(``common.time_in_graph_ms``; each call of a graph on its own copy of the weights, as many copies as cycle through
3x the L2, so the weights come from HBM as in a model's forward):

* ``fp16``: cuBLAS ``F.linear`` with bias;
* ``w8a8``: ``zq.int8_linear``'s registered kernel on an activation already quantized: what a compiled W8A8 model
  runs per linear, its per-token quantization being fused into the norm or activation before it;
* ``w8a8 + quant``: ``zq.quantize_per_token``'s kernel, then that GEMM: W8A8 where the quantization is not fused;
* ``outlier p%``: ``zq.outlier_int8_linear``'s registered kernel with p = ``--shares`` percent of K as outlier
  columns (their activations 30x the others'): the op quantizes its activation itself (one row-quantization launch,
  which nothing can fuse away: the outlier columns must stay in floating point), then one GEMM launch with the
  outlier product in its epilogue;
* ``outlier 1% reference``: the op's reference implementation in torch (what the GPU ran before this kernel).

Every variant is first checked against its reference op on the same tensors (relative error <= ``--max-rel-err``;
fp16 against the float64 product); a variant that fails the check is reported, not timed (``gemm_sweep.measure``:
10 calls per graph, median of 30 replays). Configs are autotuned on the first call, unless ``ZQ_TRITON_AUTOTUNE=0``
(every kernel then runs the first candidate of its M bucket: a run in seconds instead of minutes of tuning).
``--e2e`` adds one end-to-end number: prefill (B=8, S=128) of a random-weight decoder of
``common.LLAMA_CONFIGS`` compiled with ``w8a8`` and with ``outlier_threshold`` (the outlier columns calibrated on
8 x 128 random tokens; how many columns the threshold selected is reported: after a random-weight model's RMSNorms
the activations are about N(0, 1), whose maximum over 1,024 tokens passes 4.3 in 1-2% of the channels: 2-11 of 576
in the q/k/v and gate/up inputs of a 2-layer copy of ``smollm2``, none in the o_proj / down_proj inputs), each
checked against the reference kernels.

Results go to ``--out`` (default ``$OUT`` or benchmarks/results/) as ``gemm_outlier.json`` / ``.md``, rewritten after
every measurement; no new shape (nor ``--e2e``) starts after ``--budget-s`` seconds.

    PYTHONPATH=. python benchmarks/gemm_outlier.py [--ms 1,16,128,1024] [--shapes 4096x4096] [--e2e smollm2]
"""

from __future__ import annotations

import argparse
import itertools
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import zqcompile
from common import LLAMA_CONFIGS, SEQ, Results, default_out_dir, gpt_decoder, rel_err, table, time_ms, token_inputs
from gemm_sweep import measure
from zqcompile import ops
from zqcompile.backends import reference_kernels, register_cuda_kernels, triton_gemm
from zqcompile.quant import quantize_rows, quantize_weight

SHAPES = "4096x4096,11008x4096"  # N x K
MS = "1,16,128,1024"
SHARES = "0.5,1,2"  # outlier columns, percent of K
L2_CYCLE_BYTES = 3 * 50 * 2**20


def weight_sets(n: int, k: int, columns: list[torch.Tensor], g: torch.Generator) -> list[dict[str, Any]]:
    """Copies of one layer's weights in every form the variants read: FP16, INT8 per channel, and for each outlier
    set the INT8 weight with those columns zeroed plus their FP16 copy; enough copies to cycle through
    ``L2_CYCLE_BYTES`` of INT8 weights."""
    sets = []
    for _ in range(max(1, min(10, -(-L2_CYCLE_BYTES // (n * k))))):
        w = torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
        q, s, _ = quantize_weight(w, 8)
        outliers = []
        for cols in columns:
            q_o, s_o, _ = quantize_weight(w.index_fill(1, cols, 0), 8)
            outliers.append((q_o, s_o, cols, w[:, cols].half()))
        sets.append({"fp16": w.half(), "int8": (q, s), "outliers": outliers})
    return sets


def bench_shape(res: Results, m: int, n: int, k: int, shares: list[float], max_err: float) -> None:
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    perm = torch.randperm(k, device="cuda", generator=g)
    columns = [perm[: max(1, round(k * share / 100))].sort().values for share in shares]
    x = torch.randn(m, k, device="cuda", generator=g)
    x[:, columns[-1]] *= 30  # the largest set's columns are the outliers; smaller sets are subsets of it
    x = x.half()
    bias = torch.randn(n, device="cuda", generator=g).half()
    sets = weight_sets(n, k, columns, g)
    x_q, x_s = quantize_rows(x)
    first = sets[0]

    def cycled(call: Callable[[dict[str, Any]], torch.Tensor]) -> Callable[[], torch.Tensor]:
        it = itertools.cycle(sets)
        return lambda: call(next(it))

    def add(variant: str, fn: Callable[[dict[str, Any]], torch.Tensor], ref: torch.Tensor) -> None:
        row = {"shape": f"{m}x{n}x{k}", "m": m, "n": n, "k": k, "variant": variant,
               **measure(cycled(fn), ref, max_err)}
        res.add("gemm", row)

    fp16_ref = (x.double() @ first["fp16"].double().T + bias.double()).half()
    add("fp16", lambda s: F.linear(x, s["fp16"], bias), fp16_ref)
    w8a8_ref = ops._int_linear_reference(x_q, x_s, *first["int8"], bias, torch.float16)
    add("w8a8", lambda s: torch.ops.zq.int8_linear(x_q, x_s, *s["int8"], bias, torch.float16), w8a8_ref)
    add("w8a8 + quant",
        lambda s: torch.ops.zq.int8_linear(*torch.ops.zq.quantize_per_token(x), *s["int8"], bias, torch.float16),
        w8a8_ref)
    for i, share in enumerate(shares):
        def outlier(s: dict[str, Any], i: int = i) -> torch.Tensor:
            w, w_scale, cols, w_out = s["outliers"][i]
            return torch.ops.zq.outlier_int8_linear(x, w, w_scale, cols, w_out, bias, torch.float16)

        with reference_kernels():
            ref = outlier(first)
        add(f"outlier {share:g}%", outlier, ref)
        if share == 1:
            with reference_kernels():
                add(f"outlier {share:g}% reference", outlier, ref)


def bench_e2e(res: Results, model_name: str, threshold: float, max_err: float) -> None:
    """Prefill B=8 S=128 of a random-weight decoder compiled with w8a8 and with outlier_threshold."""
    model = gpt_decoder(model_name)
    vocab = LLAMA_CONFIGS[model_name]["vocab_size"]
    inputs = token_inputs(vocab, 8, with_types=False)
    calibration = torch.randint(0, vocab, (8, SEQ), generator=torch.Generator().manual_seed(0))
    for recipe in ("w8a8", {"base": "w8a8", "outlier_threshold": threshold}):
        name = recipe if isinstance(recipe, str) else f"w8a8 outlier_threshold={threshold}"
        try:
            t0 = time.perf_counter()
            qmodel = zqcompile.compile(model, recipe, backend="cuda", calibration_data=calibration)
            compile_s = time.perf_counter() - t0
            decomposed = [n.meta.get("zq_rounding", "") for n in qmodel.graph_module.graph.nodes
                          if n.target is torch.ops.zq.outlier_int8_linear.default]
            with torch.inference_mode():
                out = qmodel(**inputs)[0]
                with reference_kernels():
                    ref = qmodel.executed_graph(*qmodel.graph_inputs(**inputs))[0]
            err = rel_err(out, ref)
            row = {"model": model_name, "recipe": name, "compile_s": round(compile_s, 1), "rel_err": err,
                   "decomposed_linears": len(decomposed),
                   "outlier_columns": sum(int(d.split()[1]) for d in decomposed if d.startswith("llm.int8"))}
            if err <= max_err:
                with torch.inference_mode():
                    row["ms"] = time_ms(lambda: qmodel(**inputs), warmup=5, reps=30)
            res.add("e2e", row)
        except Exception as exc:  # noqa: BLE001
            res.add("errors", {"where": f"e2e {model_name} {name}", "error": f"{type(exc).__name__}: {exc}",
                               "trace": traceback.format_exc()[-3000:]})
        qmodel = None


def render(data: dict[str, Any]) -> str:
    rows = data["gemm"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["Latency in us (CUDA-graph replays, weights from HBM), and the outlier op's time over plain W8A8's:", ""]
    body = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        timed = {r["variant"]: r for r in rows if r["shape"] == shape}
        us = {v: timed[v].get("us") for v in timed}
        cells = [shape] + [f"{us[v]:.1f}" if us.get(v) else timed[v]["status"] if v in timed else "" for v in variants]
        w8a8 = us.get("w8a8")
        shares = [v for v in variants if v.startswith("outlier") and "reference" not in v and us.get(v)]
        cells += [" / ".join(f"{us[v] / w8a8:.2f}x" for v in shares) if w8a8 else ""]
        body.append(cells)
    lines += table(["MxNxK", *variants, "outlier / w8a8"], body)
    e2e = [[r["model"], r["recipe"], r["decomposed_linears"], r["outlier_columns"], f"{r['rel_err']:.1e}",
            f"{r['ms']:.2f}" if "ms" in r else "not timed", r["compile_s"]] for r in data["e2e"]]
    lines += table(["model", "recipe", "decomposed linears", "outlier columns", "rel err vs reference kernels",
                    "prefill B=8 S=128 ms", "compile s"], e2e)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_out_dir())
    parser.add_argument("--shapes", default=SHAPES, help="N x K, comma-separated")
    parser.add_argument("--ms", default=MS)
    parser.add_argument("--shares", default=SHARES, help="outlier columns in percent of K")
    parser.add_argument("--max-rel-err", type=float, default=1e-2)
    parser.add_argument("--e2e", default=None, help=f"a decoder of common.LLAMA_CONFIGS ({', '.join(LLAMA_CONFIGS)})")
    parser.add_argument("--threshold", type=float, default=4.3, help="outlier_threshold for --e2e")
    parser.add_argument("--budget-s", type=float, default=1e9)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gemm_outlier.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    register_cuda_kernels()
    res = Results(args.out, "gemm_outlier", args, {"gemm": [], "e2e": []}, render)
    t0 = time.perf_counter()
    shares = sorted(float(s) for s in args.shares.split(","))  # bench_shape scales the largest set's columns
    for m, spec in itertools.product((int(v) for v in args.ms.split(",")), args.shapes.split(",")):
        if time.perf_counter() - t0 > args.budget_s:
            res.data["notes"].append(f"budget of {args.budget_s:.0f} s spent: M={m} {spec} and later not run")
            break
        n, k = (int(v) for v in spec.split("x"))
        bench_shape(res, m, n, k, shares, args.max_rel_err)
    if args.e2e and time.perf_counter() - t0 > args.budget_s:
        res.data["notes"].append(f"budget of {args.budget_s:.0f} s spent: --e2e {args.e2e} not run")
    elif args.e2e:
        bench_e2e(res, args.e2e, args.threshold, args.max_rel_err)
    res.data["notes"].append(f"wall time {time.perf_counter() - t0:.0f} s, S={SEQ} for --e2e; GEMM configs "
                             + ("autotuned" if triton_gemm.AUTOTUNE else "untuned: the first candidate of each M "
                                "bucket, for every kernel (ZQ_TRITON_AUTOTUNE=0)"))
    res.save()
    print(res.markdown())


if __name__ == "__main__":
    main()
