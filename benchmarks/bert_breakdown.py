"""Where zqcompile's BERT-base W8A8 forward spends its GPU time at B=32 S=128, and what the alternatives cost.

Needs a CUDA GPU. In one run (results in ``--out``, by default ``$OUT`` or the git-ignored benchmarks/results/,
as bert_breakdown.json and .md):

* ``graph``: the kernels of one CUDA-graph replay of zqcompile W8A8 and of FP16, from the profiler (the
  kernels as the runner replays them, not launched eagerly); the INT8 GEMMs listed by position in the layer.
* ``gemm``: each GEMM call of one layer re-run in isolation on the model's own tensors (the tuned config,
  the same call replayed from a CUDA graph), against its in-graph time above; the tuner's choices.
* ``sdpa``: attention at BERT-base B=32 shapes with no mask and with the mask forms a graph can hand to
  SDPA (boolean, additive materialised, additive broadcast over queries), under each SDPA backend.
* ``rewrites``: whole-model latency (CUDA graph) with each subset of the cuda backend's rewrites.

Commit 7de3caa of this script also timed GELU in the GEMM epilogue (op ``int8_linear_gelu``, since removed:
slower than the GEMM + the Numba GELU+quant kernel at every measured shape, see BENCHMARKS.md).

    PYTHONPATH=. python benchmarks/bert_breakdown.py --parts graph,gemm,sdpa,rewrites
"""

from __future__ import annotations

import argparse
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import zqcompile
from common import (
    Results, bert_base, cuda_rewrites, default_out_dir, profile_kernels, profile_tables, summarise_kernels, table,
    time_in_graph_ms, time_ms, token_inputs,
)
from zqcompile.backends.cuda_graphs import CUDAGraphRunner

BATCH, SEQ, HEADS, HEAD_DIM = 32, 128, 12, 64
GEMM_OPS = ("int8_linear",)


class GemmRecorder(torch.fx.Interpreter):
    """Runs the executed graph and keeps the arguments of its GEMM ops (the first ``limit`` calls)."""

    def __init__(self, gm: torch.fx.GraphModule, limit: int):
        super().__init__(gm)
        self.calls: list[tuple[Any, tuple, dict]] = []
        self.limit = limit

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if getattr(target, "namespace", None) == "zq" and target.__name__.split(".")[0] in GEMM_OPS \
                and len(self.calls) < self.limit:
            self.calls.append((target, args, kwargs))
        return super().call_function(target, args, kwargs)


def bench_graph_and_gemm(res: Results, parts: set[str]) -> None:
    from zqcompile.backends import triton_gemm

    model = bert_base()
    inputs = token_inputs(model.config.vocab_size, BATCH, with_types=True)
    names = list(inputs)
    qmodel = zqcompile.compile(model, "w8a8", backend="cuda")
    with torch.inference_mode():
        qmodel(**inputs)  # tunes the GEMMs and captures the graph
        fp16_graph = CUDAGraphRunner(lambda *xs: model(**dict(zip(names, xs)))[0])
        variants = {"zq w8a8 graph replay": lambda: qmodel(**inputs),
                    "fp16 graph replay": lambda: fp16_graph(*inputs.values())}
        gemm_times: list[float] = []
        for name, fn in variants.items():
            kernels = profile_kernels(fn)
            total, rows = summarise_kernels(kernels)
            res.data["profile"][name] = [total] + rows[:14]
            if name.startswith("zq"):
                gemm_times = [us for k, us in kernels if "int_linear" in k]
        by_position = defaultdict(list)
        for i, us in enumerate(gemm_times):
            by_position[i % 4].append(us)
        res.data["notes"].append("in-graph INT8 GEMM us by position in the layer (qkv, out, fc1, fc2): "
                                 + ", ".join(f"{sum(v) / len(v):.1f}" for _, v in sorted(by_position.items())))
        res.save()
        if "gemm" not in parts:
            return
        recorder = GemmRecorder(qmodel.executed_graph, limit=4)
        recorder.run(*qmodel.graph_inputs(**inputs))
        for position, (target, args, kwargs) in enumerate(recorder.calls):
            x_q, w = args[0], args[2]
            shape = f"{x_q.numel() // x_q.shape[-1]}x{w.shape[0]}x{w.shape[1]}"
            row = {"shape": shape, "op": target.__name__, "in_graph_us": sum(by_position[position]) / max(
                len(by_position[position]), 1)}
            row["isolated_us"] = time_in_graph_ms(lambda: target(*args, **kwargs)) * 1e3
            row["x_q strides"] = str(x_q.stride())
            row["w strides"] = str(w.stride())
            res.add("gemm_in_model", row)
        res.data["notes"].append("tuned GEMM configs: " + "; ".join(
            f"{key[:3]} gelu={key[8]} -> {cfg}" for key, cfg in triton_gemm._TUNED.items()))
        res.save()


def bench_sdpa(res: Results) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, device="cuda", generator=g).half() for _ in range(3))
    keep = torch.ones(BATCH, SEQ, dtype=torch.bool, device="cuda")
    keep[::2, SEQ // 2:] = False  # half the rows padded
    key_bool = keep[:, None, None, :]
    key_add = torch.where(key_bool, 0.0, float("-inf")).half()
    masks = {
        "no mask": None,
        "bool [B,1,S,S]": key_bool.expand(BATCH, 1, SEQ, SEQ).contiguous(),
        "additive [B,1,S,S]": key_add.expand(BATCH, 1, SEQ, SEQ).contiguous(),
        "additive [B,1,1,S] expanded to [B,1,S,S]": key_add.expand(BATCH, 1, SEQ, SEQ),
        "additive [B,1,1,S]": key_add,
    }
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                 attn_mask=key_bool)
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for mask_name, mask in masks.items():
        for backend_name, backend in backends.items():
            def fn() -> torch.Tensor:
                if backend is None:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                with sdpa_kernel([backend]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            try:
                out = fn()
                err = float("nan") if mask is None else \
                    ((out.double() - reference.double()).norm() / reference.double().norm()).item()
                res.add("sdpa", {"kernel": f"sdpa {mask_name} / {backend_name}", "us": time_in_graph_ms(fn) * 1e3,
                                 "rel_err_vs_fp32_masked": err})
            except Exception as exc:  # noqa: BLE001 - a backend refusing a mask form is a result
                res.add("errors", {"where": f"sdpa {mask_name} / {backend_name}",
                                   "error": f"{type(exc).__name__}: {str(exc)[:300]}"})


REWRITE_SETS = {
    "all": "fuse_sibling_linears,broadcast_padding_mask,additive_attention_mask",
    "no broadcast padding mask": "fuse_sibling_linears,additive_attention_mask",
    "no sibling fusion": "broadcast_padding_mask,additive_attention_mask",
    "no additive mask": "fuse_sibling_linears",
    "none": "",
}


def bench_rewrites(res: Results, batches: list[int]) -> None:
    model = bert_base()
    for label, names in REWRITE_SETS.items():
        try:
            qmodel = zqcompile.compile(model, "w8a8", backend="cuda", target_passes=cuda_rewrites(names))
            for batch in batches:
                inputs = token_inputs(model.config.vocab_size, batch, with_types=True)
                with torch.inference_mode():
                    ms = time_ms(lambda: qmodel(**inputs), warmup=10, reps=50)
                res.add("models", {"model": "bert-base", "batch": batch, "variant": f"zq w8a8 rewrites: {label}",
                                   "ms": ms})
        except Exception as exc:  # noqa: BLE001
            res.add("errors", {"where": f"rewrites {label}", "error": f"{type(exc).__name__}: {exc}",
                               "trace": traceback.format_exc()[-2000:]})


def render(data: dict[str, Any]) -> str:
    """The kernel profiles, the in-model GEMMs, the SDPA mask forms and the rewrite A/B of one run."""
    lines = profile_tables(data["profile"])
    lines += table(["GEMM MxNxK", "op", "in graph us", "isolated us"],
                   [[g["shape"], g["op"], f"{g['in_graph_us']:.1f}", f"{g['isolated_us']:.1f}"]
                    for g in data["gemm_in_model"]])
    lines += table(["SDPA (B=32 H=12 S=128 D=64) mask / backend", "us", "rel err vs FP32"],
                   [[r["kernel"], f"{r['us']:.1f}", f"{r['rel_err_vs_fp32_masked']:.1e}"] for r in data["sdpa"]])
    lines += table(["model", "B", "variant", "median ms"],
                   [[r["model"], r["batch"], r["variant"], f"{r['ms']:.3f}"] for r in data["models"]])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_out_dir())
    parser.add_argument("--parts", default="graph,gemm,sdpa,rewrites")
    parser.add_argument("--rewrite-batches", default="1,32")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/bert_breakdown.py needs a CUDA GPU")
    parts = set(args.parts.split(","))
    res = Results(args.out, "bert_breakdown", args, {"profile": {}, "models": [], "sdpa": [], "gemm_in_model": []},
                  render)
    zqcompile.backends.register_cuda_kernels()
    if parts & {"graph", "gemm"}:
        bench_graph_and_gemm(res, parts)
    if "sdpa" in parts:
        bench_sdpa(res)
    if "rewrites" in parts:
        bench_rewrites(res, [int(b) for b in args.rewrite_batches.split(",")])
    res.save()


if __name__ == "__main__":
    main()
