"""Backends: which kernels run the zq ops, and how the executed graph is called. Backends never rewrite a graph:
the pipeline makes the graph each target executes (pipeline.TARGET_PHASES).

- ``cpu``: the reference implementations in zqcompile/ops.py (any device, plain torch).
- ``cuda``: Numba-CUDA fused elementwise+quant kernels and Triton INT8 GEMMs registered as the ops' CUDA
  kernels, with the whole forward captured in CUDA graphs.
- ``auto``: ``cuda`` for a model on a CUDA device, else ``cpu``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch

from zqcompile.errors import ZQError

BACKENDS = ("auto", "cpu", "cuda")


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend for ``name`` and a model on ``device``; ZQError when it cannot run there."""
    if name not in BACKENDS:
        raise ZQError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
    if name == "auto":
        return "cuda" if device.type == "cuda" else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ZQError("backend='cuda' needs a CUDA GPU, and torch sees none on this machine; use "
                          "backend='cpu' (or 'auto')")
        if device.type != "cuda":
            raise ZQError(f"backend='cuda' needs the model on a CUDA device, it is on {device}; call "
                          f"model.half().cuda() before compiling")
    if name == "cpu" and device.type != "cpu":
        raise ZQError(f"backend='cpu' runs the reference kernels on the CPU but the model is on {device}; "
                      f"call model.cpu() or use backend='cuda'")
    return name


def register_cuda_kernels() -> dict[str, str]:
    """Make the zq ops run the GPU kernels on CUDA tensors (idempotent): Numba for the fused activation-quant
    ops, Triton (or the torch._int_mm fallback) for the integer GEMMs and, with Triton, the weight-only GEMM and
    the LLM.int8() outlier GEMM (without Triton that op runs its reference).
    Returns which GEMM path is in use."""
    from zqcompile.backends import numba_cuda, triton_gemm

    numba_cuda.register_cuda_kernels()
    gemm = triton_gemm.register_cuda_kernels()
    _CUDA_KERNEL_OPS.update((*numba_cuda.OPS, "int8_linear", "int4_linear"))
    if gemm == "triton":  # decode-size (M <= 64) GEMMs in front, the weight-only and LLM.int8() outlier GEMMs
        from zqcompile.backends import triton_outlier, triton_small_m

        triton_small_m.register_cuda_kernels()
        triton_outlier.register_cuda_kernels()
        _CUDA_KERNEL_OPS.update(("weight_only_linear", "outlier_int8_linear"))
    return {"activation_quant": "numba", "gemm": gemm}


_CUDA_KERNEL_OPS: set[str] = set()  # the zq ops that register_cuda_kernels gave a "cuda" kernel


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run the reference implementations (zqcompile/ops.py) on CUDA tensors too, inside the block.

    The reference is plain torch, so on a GPU it computes what the CPU backend computes; tests and benchmarks
    check the CUDA kernels against it with the same compiled graph and inputs.
    """
    from zqcompile import ops

    with contextlib.ExitStack() as stack:
        for name in sorted(_CUDA_KERNEL_OPS):
            stack.enter_context(getattr(ops, name).set_kernel_enabled("cuda", False))
        yield


def build_runner(executed: torch.fx.GraphModule, backend: str, cuda_graphs: bool | None,
                 index_rows: Mapping[int, int] | None = None) -> Callable[..., Any]:
    """What calls the executed graph (the pipeline's graph for this backend's target): the graph itself or, for the
    cuda backend, a CUDA-graph runner replaying it. For ``backend='cuda'`` this registers the GPU kernels;
    ``cuda_graphs`` defaults to on there. ``index_rows`` (input position -> rows of the embedding it indexes): the
    runner's graphs clamp those inputs and flag out-of-range values (cuda_graphs.IndexGuard)."""
    if backend != "cuda":
        if cuda_graphs:
            raise ZQError(f"cuda_graphs=True needs backend='cuda' (a CUDA model), the backend is {backend!r}; "
                          "leave cuda_graphs unset")
        return executed
    register_cuda_kernels()
    from zqcompile.backends.cuda_graphs import CUDAGraphRunner

    return executed if cuda_graphs is False else CUDAGraphRunner(executed, index_rows=index_rows)
