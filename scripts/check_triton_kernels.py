"""Compile zqcompile's Triton GEMM kernels for sm_90 without a GPU, with whatever Triton is importable.

The CPU tests run the kernels in Triton's interpreter, which does not go through the compiler's front end; a
kernel can pass them and still fail to compile on the GPU image's (older) Triton, as Triton 3.6 does with a
``return`` inside a static ``if`` followed by more code. This script intercepts every launch of the small-M and
tiled kernels over their candidate configs (INT8 / INT4, symmetric / asymmetric, per-channel and grouped,
INT8 and fp16 activations, decode and prefill M; the LLM.int8() outlier GEMM and its row quantization with fp16,
bf16 and fp32 activations) and compiles it to a cubin for an H100/H200 instead of running it.
To check against the GPU image's Triton (3.6), install that version into a separate folder and put it first:

    pip download triton==3.6.0 --no-deps -d /tmp/triton36
    pip install --no-deps --target /tmp/triton36/site /tmp/triton36/triton-3.6.0-*.whl
    PYTHONPATH=/tmp/triton36/site:. python scripts/check_triton_kernels.py

Exit status 1 if any kernel fails to compile (the first lines of each error are printed).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as compile_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zqcompile.backends import triton_gemm, triton_outlier, triton_small_m  # noqa: E402
from zqcompile.backends.triton_gemm import _Problem  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {torch.int8: "*i8", torch.uint8: "*u8", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                 torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}


class CompileInsteadOfLaunch:
    """``kernel[grid](*args, **constexprs)`` compiles the kernel for TARGET with those arguments' types."""

    def __init__(self, kernel: Any, results: dict[tuple, str | None]):
        self.kernel, self.results = kernel, results

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return self.compile

    def compile(self, *args: Any, num_warps: int = 4, num_stages: int = 3, **constexprs: Any) -> None:
        names = self.kernel.arg_names
        values = dict(zip(names, args), **constexprs)
        signature = {name: "constexpr" if name in constexprs else
                     POINTER_TYPES[value.dtype] if isinstance(value, torch.Tensor) else "i32"
                     for name, value in values.items()}
        fixed = {(names.index(name),): value for name, value in constexprs.items()}
        key = (self.kernel.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), num_warps, num_stages)
        if key in self.results:
            return
        try:
            compile_kernel(ASTSource(self.kernel, signature, constexprs=fixed), target=TARGET,
                           options={"num_warps": num_warps, "num_stages": num_stages})
            self.results[key] = None
        except Exception as err:  # noqa: BLE001 - report every failing variant, not just the first
            self.results[key] = "\n    ".join(str(err).splitlines()[:12])


def main() -> int:
    results: dict[tuple, str | None] = {}
    triton_small_m._stream_kernel = CompileInsteadOfLaunch(triton_small_m._stream_kernel, results)
    triton_gemm._int_linear_kernel = CompileInsteadOfLaunch(triton_gemm._int_linear_kernel, results)
    for name in ("_outlier_linear_kernel", "_quantize_inliers_kernel"):
        setattr(triton_outlier, name, CompileInsteadOfLaunch(getattr(triton_outlier, name), results))
    triton_small_m._num_sms = lambda device: 132
    triton_small_m._workspace = lambda device: (torch.empty(1, dtype=torch.int32), torch.empty(1, dtype=torch.int32))
    n, k = 256, 512
    for int4, asym, width, acts, m in itertools.product((False, True), (False, True), (None, 32, 64),
                                                        (torch.int8, torch.float16), (1, 200)):
        if asym and not int4:
            continue
        g_in = k // width if width else 1
        p = _Problem(m, n, k, n, g_in)
        a = torch.empty(m, k, dtype=acts)
        w = torch.empty(n, k // 2 if int4 else k, dtype=torch.uint8 if int4 else torch.int8)
        scale = torch.empty(n, g_in)
        w_min = torch.empty(n, g_in) if asym else None
        s_x = torch.empty(m) if acts == torch.int8 else None
        out = torch.empty(m, n, dtype=torch.float16)
        if triton_small_m.stream_kernel_applies(p, acts == torch.int8, acts):
            for cfg in triton_small_m.candidate_configs(p, int4):
                triton_small_m.launch(a, s_x, w, scale, w_min, None, out, p, int4, cfg)
        if acts == torch.int8:
            for cfg in triton_gemm.candidate_configs(m, k, width, tma=False)[:2]:
                triton_gemm._launch(a, s_x, w, scale, w_min, None, out, p, int4, cfg)
    columns = torch.empty(5, dtype=torch.int64)
    for int4, width, x_dtype, m in itertools.product((False, True), (None, 64), (torch.float16, torch.bfloat16,
                                                                                 torch.float32), (1, 200)):
        g_in = k // width if width else 1
        p = _Problem(m, n, k, n, g_in)
        x = torch.empty(m, k, dtype=x_dtype)
        q, s_x = triton_outlier.quantize_inliers(x, columns)
        w = torch.empty(n, k // 2 if int4 else k, dtype=torch.uint8 if int4 else torch.int8)
        for cfg in triton_gemm.candidate_configs(m, k, width)[:2]:
            triton_outlier.launch(q, s_x, w, torch.empty(n, g_in), torch.empty(n, dtype=x_dtype),
                                  torch.empty(m, n, dtype=x_dtype), x, columns,
                                  torch.empty(n, 5, dtype=torch.float16), p, cfg)
    failed = {key: err for key, err in results.items() if err is not None}
    print(f"Triton {triton.__version__}: {len(results) - len(failed)} kernel variants compiled for sm_90, "
          f"{len(failed)} failed")
    for (name, _, constexprs, *_), err in list(failed.items())[:5]:
        print(f"FAILED {name} {dict(constexprs)}\n    {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
