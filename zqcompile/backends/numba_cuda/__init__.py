"""Numba-CUDA kernels for the fused "elementwise + per-token INT8 quantization" zq ops.

``register_cuda_kernels()`` makes them the CUDA implementations of ``torch.ops.zq.quantize_per_token``,
``layernorm_quant``, ``add_layernorm_quant``, ``rmsnorm_quant``, ``add_rmsnorm_quant``, ``add_rmsnorm`` (not
quantized: a decoder's final norm), ``gelu_quant``, ``relu_quant``, ``silu_mul_quant``, ``gelu_mul_quant``, the same
with the online Hadamard (``hadamard_quant``, ``silu_mul_hadamard_quant``, ``gelu_mul_hadamard_quant``),
``rotary_embedding`` and ``rotary_embedding_kv_cache``
(the CPU reference in zqcompile/ops.py stays the implementation on every other device).

Modules: ``kernels`` holds the device code and a launch layer that takes any array that Numba can view
(NumPy arrays under the CUDA simulator, torch CUDA tensors on a GPU); ``torch_ops`` holds the torch-facing
wrappers that the ops dispatch to. Importing this package does not import Numba; registering does.
"""

from __future__ import annotations

from zqcompile.backends.numba_cuda import _numpy_compat  # noqa: F401  (must precede any numba.cuda import)

OPS = ("quantize_per_token", "layernorm_quant", "add_layernorm_quant", "rmsnorm_quant", "add_rmsnorm_quant",
       "add_rmsnorm", "gelu_quant", "relu_quant", "silu_mul_quant", "gelu_mul_quant", "hadamard_quant",
       "silu_mul_hadamard_quant", "gelu_mul_hadamard_quant", "rotary_embedding", "rotary_embedding_kv_cache")

_registered = False


def register_cuda_kernels() -> None:
    """Register the Numba kernels as the "cuda" kernels of the zq ops (idempotent)."""
    global _registered
    if _registered:
        return
    from zqcompile import ops
    from zqcompile.errors import ZQError

    try:
        from zqcompile.backends.numba_cuda import torch_ops
    except ImportError as exc:
        raise ZQError(f"backend='cuda' needs Numba's CUDA target, which failed to import ({exc}); install it with "
                      "pip install 'zqcompile[gpu]' (numba and numba-cuda)") from exc

    for name in OPS:
        getattr(ops, name).register_kernel("cuda")(getattr(torch_ops, name))
    _registered = True
