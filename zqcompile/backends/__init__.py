"""Backends: which kernels run the zq ops. The graph is the same for every backend.

- ``cpu``: the reference implementations in zqcompile/ops.py (any device, plain torch).
- ``cuda``: Numba-CUDA fused elementwise+quant kernels and Triton INT8 GEMMs registered as the ops' CUDA
  kernels, with the whole forward captured in CUDA graphs.
- ``auto``: ``cuda`` for a model on a CUDA device, else ``cpu``.
"""

from __future__ import annotations

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
