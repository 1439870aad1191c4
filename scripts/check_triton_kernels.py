"""Compile zqcompile's Triton GEMM kernels for sm_90 without a GPU, with whatever Triton is importable.

The CPU tests run the kernels in Triton's interpreter, which does not go through the compiler's front end; a
kernel can pass them and still fail to compile on the GPU image's (older) Triton, as Triton 3.6 does with a
``return`` inside a static ``if`` followed by more code. This script intercepts every launch of the small-M (MMA and
GEMV) and tiled kernels over their candidate configs (INT8 / INT4, symmetric / asymmetric, per-channel and grouped,
INT8 and fp16 activations, decode and prefill M; the LLM.int8() outlier GEMM and its row quantization with fp16,
bf16 and fp32 activations) and compiles it to a cubin for an H100/H200 instead of running it (``--only
_gemv_kernel`` compiles one kernel's variants).
To check against the GPU image's Triton (3.6), install that version into a separate folder and put it first:

    pip download triton==3.6.0 --no-deps -d /tmp/triton36
    pip install --no-deps --target /tmp/triton36/site /tmp/triton36/triton-3.6.0-*.whl
    PYTHONPATH=/tmp/triton36/site:. python scripts/check_triton_kernels.py

Exit status 1 if any kernel fails to compile (the first lines of each error are printed).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource, compile as compile_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zqcompile.backends import triton_gemm, triton_outlier, triton_small_m  # noqa: E402
from zqcompile.backends.triton_gemm import _Problem  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


class CompileInsteadOfLaunch:
    """``kernel[grid](*args, **constexprs)`` compiles the kernel for TARGET with those arguments' types, specialized
    as a launch specializes them (integers equal to 1 become constants; 16-byte aligned pointers and integers
    divisible by 16 are marked so, which turns on vectorized loads)."""

    def __init__(self, kernel: Any, results: dict[tuple, str | None], only: set[str]):
        self.kernel, self.results, self.only = kernel, results, only

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return self.compile

    def compile(self, *args: Any, num_warps: int = 4, num_stages: int = 3, **constexprs: Any) -> None:
        names = self.kernel.arg_names
        kinds, attrs = {}, {}
        for i, (name, value) in enumerate(zip(names, args)):
            kinds[name], spec = native_specialize_impl(BaseBackend, value, False, True, True)
            if kinds[name] == "constexpr":
                constexprs[name] = value
            else:
                attrs[(i,)] = BaseBackend.parse_attr(spec)
        signature = {name: "constexpr" if name in constexprs else kinds[name] for name in names}
        fixed = {(names.index(name),): value for name, value in constexprs.items()}
        key = (self.kernel.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), repr(attrs),
               num_warps, num_stages)
        if self.kernel.__name__ not in self.only:
            return
        if key in self.results:
            return
        try:
            compile_kernel(ASTSource(self.kernel, signature, constexprs=fixed, attrs=attrs), target=TARGET,
                           options={"num_warps": num_warps, "num_stages": num_stages})
            self.results[key] = None
        except Exception as err:  # noqa: BLE001 - report every failing variant, not just the first
            self.results[key] = "\n    ".join(str(err).splitlines()[:12])


KERNELS = ((triton_small_m, "_stream_kernel"), (triton_small_m, "_gemv_kernel"), (triton_gemm, "_int_linear_kernel"),
           (triton_outlier, "_outlier_linear_kernel"), (triton_outlier, "_quantize_inliers_kernel"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(name for _, name in KERNELS),
                        help="comma-separated kernel names to compile (default: all)")
    only = set(parser.parse_args().only.split(","))
    results: dict[tuple, str | None] = {}
    for module, name in KERNELS:
        setattr(module, name, CompileInsteadOfLaunch(getattr(module, name), results, only))
    triton_small_m._num_sms = lambda device: 132
    triton_small_m._workspace = lambda device: (torch.empty(1, dtype=torch.int32), torch.empty(1, dtype=torch.int32))
    n, k = 256, 512
    for int4, asym, width, acts, m in itertools.product((False, True), (False, True), (None, 32, 64),
                                                        (torch.int8, torch.float16), (1, 5, 200)):
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
            gemv = triton_small_m.gemv_kernel_applies(a, w, p, int4)
            for cfg in triton_small_m.candidate_configs(p, int4, gemv, int8_acts=acts == torch.int8):
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
