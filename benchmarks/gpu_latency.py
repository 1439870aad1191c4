"""GPU latency of zqcompile's cuda backend against FP16 baselines (issue 3). Needs a CUDA GPU.

One run builds and times, with CUDA events (warm-up, then the median of many synchronised repetitions):

* models (``--parts bert,gpt``): FP16 eager, FP16 in a CUDA graph (the same runner zqcompile uses), FP16
  ``torch.compile`` (``--compile-mode``, default ``max-autotune``), zqcompile W8A8 (CUDA graphs, and eagerly
  for the large-batch comparison) and W4A8, for BERT-base (random weights) at B in ``--bert-batches``, S=128,
  and decoders (``--gpt-sizes``: GPT-2 architecture 350m / 1.3b, Llama architecture llama1b / llama7b; prefill
  B=8 S=128). Before timing, each zqcompile variant's output
  is checked against the reference implementations of the same ops (zqcompile/ops.py, the CPU backend's
  code) run on the same GPU tensors; a variant over ``--max-rel-err`` is reported and not timed.
* ``kernels``: achieved GB/s of each fused Numba kernel at BERT-base B=32 S=128 shapes (the online-Hadamard ones
  at Llama-3.2-1B's widths, 4096 rows; launches replayed
  from a CUDA graph, so the Python launch cost is not counted), against a device-to-device copy, and each
  kernel's registers and local memory; ``sweep`` adds block shapes (threads per row x rows per block), word
  widths and the tree reduction for three of them.
* ``gemm``: the Triton INT8 (and W4A8) GEMM against cuBLAS FP16 and ``torch._int_mm`` at M x N x K shapes.
* ``profile``: the CUDA kernels that dominate zqcompile W8A8 and FP16 eager BERT-base at B=32.

Results go to ``--out`` (default ``$OUT``, else the git-ignored benchmarks/results/) as ``gpu_latency.json``
and ``gpu_latency.md``, rewritten after every measurement, so a run cut short keeps what it measured.

    PYTHONPATH=. python benchmarks/gpu_latency.py --parts bert,gpt,kernels,gemm,profile
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

import zqcompile
from common import (
    LLAMA_CONFIGS, SEQ, Results, bert_base, copy_bandwidth_gbps, cuda_rewrites, default_out_dir, gpt_decoder, profile_kernels, profile_tables, rel_err,
    summarise_kernels, table, time_in_graph_ms, time_ms, token_inputs,
)
from zqcompile import ops
from zqcompile.backends import reference_kernels, register_cuda_kernels
from zqcompile.backends.cuda_graphs import CUDAGraphRunner


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------

SECTIONS = ("models", "checks", "kernels", "gemm", "kernel_resources")
"""The lists of rows a run fills (``profile`` is a mapping: variant -> kernels)."""


def render(data: dict[str, Any]) -> str:
    """The tables of one run (``Results`` adds the environment line, notes and errors)."""

    def vs_fastest_fp16(row: dict[str, Any]) -> str:
        best = min((r["ms"] for r in data["models"] if r["model"] == row["model"] and r["batch"] == row["batch"]
                    and r["variant"].startswith("fp16") and r.get("ms")), default=None)
        return f"{best / row['ms']:.2f}x" if best and row.get("ms") else ""

    lines = table(["model", "B", "variant", "median ms", "vs fastest FP16"],
                  [[r["model"], r["batch"], r["variant"], f"{r['ms']:.3f}" if r.get("ms") else "n/a",
                    vs_fastest_fp16(r)] for r in data["models"]])
    lines += table(["check", "worst op rel err (same inputs)", "max int8 diff", "model: cuda vs reference ops",
                    "cuda vs FP16", "reference ops vs FP16"],
                   [[c["name"], f"{max(c['op_float_rel_err'].values()):.1e}",
                     max(c["op_int8_max_diff"].values(), default=0), f"{c['rel_err']:.2e}", f"{c['cuda_vs_fp16']:.2e}",
                     f"{c['reference_vs_fp16']:.2e}"] for c in data["checks"]])
    lines += table(["kernel (B=32 S=128)", "us", "GB/s", "% of copy", "unfused torch us"],
                   [[k["kernel"], f"{k['us']:.1f}", f"{k['gbps']:.0f}", f"{k['pct_of_copy']:.0f}%",
                     f"{k.get('reference_us', float('nan')):.1f}"] for k in data["kernels"]])
    lines += table(["GEMM MxNxK", "variant", "us", "TOPS", "vs cuBLAS FP16"],
                   [[g["shape"], g["variant"], f"{g['us']:.1f}", f"{g['tops']:.0f}", f"{g['speedup_vs_fp16']:.2f}x"]
                    for g in data["gemm"]])
    lines += profile_tables(data["profile"])
    lines += table(["Numba kernel (build parameters)", "registers", "local memory bytes"],
                   [[r["kernel"], r["regs_per_thread"], r["local_mem_per_thread"]] for r in data["kernel_resources"]])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------

class OpByOpCheck(torch.fx.Interpreter):
    """Runs the graph on the reference ops and, at every zq op, also runs the CUDA kernel on the same inputs:
    the worst relative error of each op's floating-point outputs and the largest int8 difference."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.float_err: dict[str, float] = {}
        self.int8_diff: dict[str, int] = {}

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if getattr(target, "namespace", None) != "zq":
            return super().call_function(target, args, kwargs)
        got = target(*args, **kwargs)
        with reference_kernels():
            ref = target(*args, **kwargs)
        name = target.__name__.split(".")[0]
        for g, r in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, ref))):
            if r.dtype == torch.int8:
                self.int8_diff[name] = max(self.int8_diff.get(name, 0), (g.int() - r.int()).abs().max().item())
            else:
                self.float_err[name] = max(self.float_err.get(name, 0.0), rel_err(g, r))
        return ref


def check_against_reference(res: Results, name: str, model: torch.nn.Module, qmodel: zqcompile.QuantizedModel,
                            inputs: dict[str, torch.Tensor], max_rel_err: float) -> bool:
    """Op by op: each zq op's CUDA kernel against its reference implementation (zqcompile/ops.py, plain torch,
    run on the same GPU tensors) on identical inputs; this gates the timing. Whole model: the output through
    the CUDA kernels and through the reference ops, each against the other and against the FP16 model. Over
    12-24 layers independent rounding of the +-1 LSB ties grows, so the whole-model difference between two
    correct implementations is about that of either one against FP16; it is reported, not gated."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference INT GEMM needs exact float32 GEMMs
    with torch.inference_mode():
        graph_inputs = qmodel.graph_inputs(**inputs)
        check = OpByOpCheck(qmodel.executed_graph)  # the graph the runner replays (fused q/k/v GEMMs)
        ref = check.run(*graph_inputs)[0]
        out = qmodel(**inputs)[0]
        fp16 = model(**inputs)[0]
    worst_float = max(check.float_err.values())
    ok = worst_float <= max_rel_err and max(check.int8_diff.values(), default=0) <= 1
    res.add("checks", {"name": name, "rel_err": rel_err(out, ref), "ok": ok,
                       "cuda_vs_fp16": rel_err(out, fp16), "reference_vs_fp16": rel_err(ref, fp16),
                       "op_float_rel_err": check.float_err, "op_int8_max_diff": check.int8_diff})
    return ok


def bench_model(res: Results, model_name: str, model: torch.nn.Module, batches: list[int], args: argparse.Namespace,
                with_types: bool) -> None:
    vocab = model.config.vocab_size
    reps = args.reps

    def record(variant: str, batch: int, fn: Callable[[], Any], **extra: Any) -> None:
        try:
            ms = time_ms(fn, warmup=args.warmup, reps=reps)
            res.add("models", {"model": model_name, "batch": batch, "variant": variant, "ms": ms, **extra})
        except Exception as exc:  # noqa: BLE001 - record and go on with the other variants
            res.add("errors", {"where": f"{model_name} B={batch} {variant}", "error": f"{type(exc).__name__}: {exc}",
                               "trace": traceback.format_exc()[-2000:]})

    names = list(token_inputs(vocab, 1, with_types))
    with torch.inference_mode():
        fp16_graph = CUDAGraphRunner(lambda *xs: model(**dict(zip(names, xs)))[0])
        for batch in batches:
            inputs = token_inputs(vocab, batch, with_types)
            record("fp16 eager", batch, lambda: model(**inputs))
            record("fp16 cuda graph", batch, lambda: fp16_graph(*inputs.values()))

    for recipe in () if args.fp16_only else args.recipes.split(","):
        t0 = time.perf_counter()
        try:
            qmodel = zqcompile.compile(model, recipe, backend="cuda", target_passes=cuda_rewrites(args.cuda_rewrites))
            compile_s = time.perf_counter() - t0
            check_batch = min(batches[-1], 8)
            ok = check_against_reference(res, f"{model_name} {recipe} B={check_batch}", model, qmodel,
                                         token_inputs(vocab, check_batch, with_types), args.max_rel_err)
        except Exception as exc:  # noqa: BLE001
            res.add("errors", {"where": f"compile/check {model_name} {recipe}", "error": f"{type(exc).__name__}: {exc}",
                               "trace": traceback.format_exc()[-3000:]})
            continue
        if not ok:
            res.data["notes"].append(f"{model_name} {recipe}: an op's CUDA kernel is off its reference, not timed")
            continue
        for batch in batches:
            inputs = token_inputs(vocab, batch, with_types)
            record(f"zq {recipe} cuda graph", batch, lambda: qmodel(**inputs), compile_s=round(compile_s, 1))
            if recipe == "w8a8":  # the executed graph called directly: the same kernels, launched eagerly
                with torch.inference_mode():
                    record(f"zq {recipe} eager", batch,
                           lambda: qmodel.executed_graph(*qmodel.graph_inputs(**inputs)))
        qmodel = None  # free the GPU memory before the next recipe

    if args.compile_mode != "none":
        torch._dynamo.config.cache_size_limit = 64
        t0 = time.perf_counter()
        compiled = torch.compile(model, mode=args.compile_mode, dynamic=False)
        compile_batches = [int(b) for b in args.compile_batches.split(",")] if args.compile_batches else batches
        for batch in (b for b in batches if b in compile_batches):
            inputs = token_inputs(vocab, batch, with_types)
            with torch.inference_mode():
                t1 = time.perf_counter()
                try:
                    compiled(**inputs)
                except Exception as exc:  # noqa: BLE001
                    res.add("errors", {"where": f"torch.compile {model_name} B={batch}",
                                       "error": f"{type(exc).__name__}: {exc}",
                                       "trace": traceback.format_exc()[-3000:]})
                    continue
                build_s = time.perf_counter() - t1
                record(f"fp16 torch.compile {args.compile_mode}", batch, lambda: compiled(**inputs),
                       compile_s=round(build_s, 1))
        res.data["notes"].append(f"{model_name}: torch.compile({args.compile_mode}) total build+timing "
                                 f"{time.perf_counter() - t0:.0f} s")


# ---------------------------------------------------------------------------------------------------------
# Kernels and GEMMs
# ---------------------------------------------------------------------------------------------------------

SWEPT_KERNELS = ("quantize_per_token K=768", "add_layernorm_quant K=768", "gelu_quant erf K=3072")
"""The kernels whose block shapes and word widths the ``sweep`` part compares (each variant is a Numba build)."""


def bench_kernels(res: Results, sweep: bool) -> None:
    from zqcompile.backends.numba_cuda import kernels, torch_ops

    register_cuda_kernels()
    defaults = dict(torch_ops.LAUNCH_OPTIONS)
    copy = copy_bandwidth_gbps()
    res.data["notes"].append(f"device-to-device copy: {copy:.0f} GB/s (bytes read + written)")
    rows, h, f = 32 * SEQ, 768, 3072
    g = torch.Generator(device="cuda").manual_seed(0)
    x, r = (torch.randn(rows, h, device="cuda", generator=g).half() for _ in range(2))
    w, b = torch.randn(h, device="cuda", generator=g).half(), torch.randn(h, device="cuda", generator=g).half()
    big, up = (torch.randn(rows, f, device="cuda", generator=g).half() for _ in range(2))
    attn = torch.randn(rows, 2048, device="cuda", generator=g).half()
    wide, wide_up = (torch.randn(rows, 8192, device="cuda", generator=g).half() for _ in range(2))
    fp, i8, sc = 2, 1, 4 * rows  # bytes of an fp16 element, an int8 element, the scales
    cases = [
        ("quantize_per_token K=768", lambda: ops.quantize_per_token(x), rows * h * (fp + i8) + sc),
        ("layernorm_quant K=768", lambda: ops.layernorm_quant(x, w, b, 1e-12), rows * h * (2 * fp + i8) + sc),
        ("add_layernorm_quant K=768", lambda: ops.add_layernorm_quant(x, r, w, b, 1e-12),
         rows * h * (3 * fp + i8) + sc),
        ("rmsnorm_quant K=768", lambda: ops.rmsnorm_quant(x, w, 1e-6), rows * h * (2 * fp + i8) + sc),
        ("gelu_quant erf K=3072", lambda: ops.gelu_quant(big, None, "none"), rows * f * (fp + i8) + sc),
        ("gelu_quant tanh K=3072", lambda: ops.gelu_quant(big, None, "tanh"), rows * f * (fp + i8) + sc),
        ("silu_mul_quant K=3072", lambda: ops.silu_mul_quant(big, up), rows * f * (2 * fp + i8) + sc),
        # the rotation presets' online Hadamard + quant at Llama-3.2-1B's o_proj / down_proj input widths
        ("hadamard_quant K=2048", lambda: ops.hadamard_quant(attn, 2048), rows * 2048 * (fp + i8) + sc),
        ("silu_mul_hadamard_quant K=8192", lambda: ops.silu_mul_hadamard_quant(wide, wide_up, 8192),
         rows * 8192 * (2 * fp + i8) + sc),
    ]
    for name, fn, nbytes in cases:
        k = int(name.rsplit("=", 1)[1])
        variants = [("", {})]
        if sweep and name in SWEPT_KERNELS:
            variants += [(f" [T={t}, R={r}, vec=4]", {"threads": t, "rows_per_block": r, "vec": 4})
                         for t in (32, 64, 128, 256) for r in (1, 2, 4) if t * r <= 512 and -(-k // (t * 4)) <= 12]
            variants += [(" [vec=2]", {"vec": 2}), (" [vec=1]", {"vec": 1}),
                         (" [tree reduction]", {"reduction": "tree"})]
        for suffix, options in variants:
            try:
                torch_ops.LAUNCH_OPTIONS.update(options)
                us = time_in_graph_ms(fn) * 1e3
                row = {"kernel": name + suffix, "us": us, "gbps": nbytes / us / 1e3, "bytes": nbytes}
                row["pct_of_copy"] = 100 * row["gbps"] / copy
                if not suffix:
                    with reference_kernels():
                        row["reference_us"] = time_in_graph_ms(fn) * 1e3
                res.add("kernels", row)
            except Exception as exc:  # noqa: BLE001
                res.add("errors", {"where": f"kernel {name}{suffix}", "error": f"{type(exc).__name__}: {exc}",
                                   "trace": traceback.format_exc()[-3000:]})
            finally:
                torch_ops.LAUNCH_OPTIONS.clear()
                torch_ops.LAUNCH_OPTIONS.update(defaults)
    for key, kernel in kernels.BUILT_KERNELS.items():
        usage: dict[str, Any] = {}
        for what in ("regs_per_thread", "local_mem_per_thread"):
            try:
                value = getattr(kernel, f"get_{what}")()
                usage[what] = max(value.values()) if isinstance(value, dict) else value
            except Exception as exc:  # noqa: BLE001 - resource queries differ between numba-cuda versions
                usage[what] = f"n/a ({type(exc).__name__})"
        res.data["kernel_resources"].append({"kernel": str(key), **usage})
    res.save()


def bench_gemm(res: Results, shapes: list[tuple[int, int, int]]) -> None:
    from zqcompile.backends import triton_gemm
    from zqcompile.quant import pack_int4

    for m, n, k in shapes:
        g = torch.Generator(device="cuda").manual_seed(m + n + k)
        a16 = torch.randn(m, k, device="cuda", generator=g).half()
        w16 = torch.randn(n, k, device="cuda", generator=g).half()
        a8 = torch.randint(-127, 128, (m, k), device="cuda", generator=g, dtype=torch.int8)
        w8 = torch.randint(-127, 128, (n, k), device="cuda", generator=g, dtype=torch.int8)
        w4 = pack_int4(torch.randint(-7, 8, (n, k), device="cuda", generator=g, dtype=torch.int8), 64)
        s_x = torch.rand(m, 1, device="cuda", generator=g) * 0.01
        s_w = torch.rand(n, 1, device="cuda", generator=g) * 0.01
        s_w_groups = torch.rand(n, k // 64, device="cuda", generator=g) * 0.01
        bias = torch.randn(n, device="cuda", generator=g).half()
        variants = {
            "cuBLAS FP16 (F.linear)": lambda: torch.nn.functional.linear(a16, w16, bias),
            "triton W8A8 (dequant+bias fused)": lambda: triton_gemm.triton_int_linear(
                a8, s_x, w8, s_w, bias, torch.float16, int4=False),
            "torch._int_mm + dequant": lambda: triton_gemm.int_mm_linear(
                a8, s_x, w8, s_w, bias, torch.float16, int4=False),
            "triton W4A8 groups of 64": lambda: triton_gemm.triton_int_linear(
                a8, s_x, w4, s_w_groups, bias, torch.float16, int4=True),
        }
        fp16_us = None
        for name, fn in variants.items():
            try:
                fn()  # autotune outside the graph
                us = time_in_graph_ms(fn, calls=10) * 1e3
            except Exception as exc:  # noqa: BLE001
                res.add("errors", {"where": f"gemm {m}x{n}x{k} {name}", "error": f"{type(exc).__name__}: {exc}",
                                   "trace": traceback.format_exc()[-3000:]})
                continue
            fp16_us = fp16_us or us
            res.add("gemm", {"shape": f"{m}x{n}x{k}", "variant": name, "us": us, "tops": 2 * m * n * k / us / 1e6,
                             "speedup_vs_fp16": fp16_us / us})


def bench_profile(res: Results, batch: int = 32) -> None:
    model = bert_base()
    qmodel = zqcompile.compile(model, "w8a8", backend="cuda", cuda_graphs=False)
    inputs = token_inputs(model.config.vocab_size, batch, with_types=True)
    for name, fn in (("zq w8a8 eager B=32", lambda: qmodel(**inputs)), ("fp16 eager B=32", lambda: model(**inputs))):
        with torch.inference_mode():
            total, rows = summarise_kernels(profile_kernels(fn))
        res.data["profile"][name] = rows[:12]
        res.data["profile"][name + " total us"] = [total]
        res.save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_out_dir())
    parser.add_argument("--parts", default="kernels,gemm,bert,gpt,profile")
    parser.add_argument("--bert-batches", default="1,8,32,128")
    parser.add_argument("--gpt-sizes", default="350m,1.3b", help="decoders: 350m, 1.3b (GPT-2), llama1b, llama7b")
    parser.add_argument("--gpt-batch", type=int, default=8)
    parser.add_argument("--compile-mode", default="max-autotune",
                        help="torch.compile mode of the FP16 baseline, or 'none' to skip it")
    parser.add_argument("--compile-batches", default=None,
                        help="batch sizes that get the torch.compile baseline (default: every batch size)")
    parser.add_argument("--fp16-only", action="store_true", help="time the FP16 variants only")
    parser.add_argument("--recipes", default="w8a8,w4a8", help="zqcompile recipes to time")
    parser.add_argument("--cuda-rewrites", default=None,
                        help="comma-separated passes of the cuda target (pipeline.TARGET_PHASES) to keep "
                             "(default: all; '' for none; cleanup always runs), "
                             "to measure what each rewrite of the executed graph buys")
    parser.add_argument("--gemm-shapes", default="4096x768x3072,16384x4096x1024")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--max-rel-err", type=float, default=1e-2)
    parser.add_argument("--deadline-s", type=float, default=1e9,
                        help="start no new part (or GPT size) after this many seconds; what ran is kept")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_latency.py needs a CUDA GPU")
    parts = set(args.parts.split(","))
    res = Results(args.out, "gpu_latency", args, {**{name: [] for name in SECTIONS}, "profile": {}}, render)
    if args.cuda_rewrites is not None:
        res.data["notes"].append(f"cuda rewrites: {cuda_rewrites(args.cuda_rewrites)} (+ cleanup)")
    res.data["env"]["gemm_backend"] = register_cuda_kernels()["gemm"]
    t0 = time.perf_counter()

    def due(what: str) -> bool:
        if time.perf_counter() - t0 <= args.deadline_s:
            return True
        res.data["notes"].append(f"skipped {what}: past --deadline-s {args.deadline_s:.0f}")
        return False

    if "kernels" in parts and due("kernels"):
        bench_kernels(res, sweep="sweep" in parts)
    if "gemm" in parts and due("gemm"):
        bench_gemm(res, [tuple(int(v) for v in s.split("x")) for s in args.gemm_shapes.split(",")])
    if "bert" in parts and due("bert"):
        bench_model(res, "bert-base", bert_base(), [int(b) for b in args.bert_batches.split(",")], args,
                    with_types=True)
        torch.cuda.empty_cache()
    if "profile" in parts and due("profile"):
        bench_profile(res)
    if "gpt" in parts:
        for size in args.gpt_sizes.split(","):
            name = size if size in LLAMA_CONFIGS else f"gpt-{size}"
            if due(name):
                bench_model(res, name, gpt_decoder(size), [args.gpt_batch], args, with_types=False)
                torch.cuda.empty_cache()
    res.data["notes"].append(f"benchmark wall time {time.perf_counter() - t0:.0f} s")
    res.save()
    print(res.markdown())


if __name__ == "__main__":
    main()
