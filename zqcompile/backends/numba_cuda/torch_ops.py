"""Torch-facing wrappers of the Numba kernels: the "cuda" kernels of the fused zq activation-quant ops (the
online-Hadamard ones and ``add_rmsnorm_quant`` included), of ``zq.add_rmsnorm`` (a decoder's final norm) and of
``zq.rotary_embedding`` (with the KV-cache write: ``rotary_embedding_kv_cache``).

Each wrapper takes the op's torch CUDA tensors, views them zero-copy as Numba device arrays
(``__cuda_array_interface__``; bfloat16 as its int16 bits, see ``kernels``), allocates the outputs with
torch's caching allocator and launches on torch's current stream (``cuda.external_stream``), so the
launches order with torch's own kernels and are captured by ``torch.cuda.graph``.

Inputs the kernels do not cover (rows longer than ``kernels.MAX_K``, or than ``kernels.MAX_HADAMARD_ROW`` for a
Hadamard, dtypes other than float32/float16/bfloat16, mixed dtypes the kernels do not implement) run the op's
reference implementation instead, with the same results.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from zqcompile import ops
from zqcompile.backends.numba_cuda import kernels
from zqcompile.backends.numba_cuda.kernels import cuda

kernels.numba.config.CUDA_LOW_OCCUPANCY_WARNINGS = False  # decode-size launches are small grids on purpose

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_streams: dict[int, Any] = {}

LAUNCH_OPTIONS: dict[str, Any] = {}
"""Keyword options every launch gets (threads, rows_per_block, vec, reduction; unset = the kernels' defaults):
benchmarks/gpu_latency.py compares the variants through them."""


def _stream() -> Any:
    """Numba's handle of torch's current CUDA stream (cached per stream pointer)."""
    ptr = torch.cuda.current_stream().cuda_stream
    stream = _streams.get(ptr)
    if stream is None:
        stream = _streams[ptr] = cuda.external_stream(ptr)
    return stream


def _nb(t: Tensor) -> Any:
    """A zero-copy Numba view; no stream sync is needed, the launch goes on the same stream as the producer.

    Detached because torch refuses ``__cuda_array_interface__`` on tensors that require grad (parameters);
    the ops are inference-only.
    """
    t = t.detach()
    return cuda.as_cuda_array(t.view(torch.int16) if t.dtype == torch.bfloat16 else t, sync=False)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def _kernel_ok(*tensors: Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    return (all(t.dtype in _KERNEL_DTYPES and t.is_cuda for t in present)
            and present[0].dim() >= 1 and present[0].shape[-1] <= kernels.MAX_K)


def _reference(op: Callable, *args: Any) -> Any:
    """The op's reference implementation on these (CUDA) tensors."""
    with op.set_kernel_enabled("cuda", False):
        return op(*args)


def _quant_outputs(x2: Tensor) -> tuple[Tensor, Tensor]:
    return (torch.empty(x2.shape, dtype=torch.int8, device=x2.device),
            torch.empty(x2.shape[0], dtype=torch.float32, device=x2.device))


def _shaped(x: Tensor, q: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    return q.view(x.shape), scale.view(*x.shape[:-1], 1)


def _unary_quant(op: Callable, launch: Callable, x: Tensor, *flags: Any) -> tuple[Tensor, Tensor]:
    """``op(x, *flags)`` (row-wise, then per-token INT8) through its one-input kernel ``launch``."""
    if not _kernel_ok(x) or not _hadamard_ok(x, op, flags):
        return _reference(op, x, *flags)
    x2 = _rows(x)
    q, scale = _quant_outputs(x2)
    launch(_nb(x2), *flags, _nb(q), _nb(scale), stream=_stream(), **LAUNCH_OPTIONS)
    return _shaped(x, q, scale)


_HADAMARD_OPS = (ops.hadamard_quant, ops.silu_mul_hadamard_quant, ops.gelu_mul_hadamard_quant)


def _hadamard_ok(x: Tensor, op: Callable, flags: tuple) -> bool:
    """Whether the kernels take the op's Hadamard (its last flag): a power-of-two block dividing a row that fits
    in shared memory; True for the ops without one."""
    if op not in _HADAMARD_OPS:
        return True
    k, block = x.shape[-1], flags[-1]
    return k <= kernels.MAX_HADAMARD_ROW and block >= 2 and block & (block - 1) == 0 and k % block == 0


def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    return _unary_quant(ops.quantize_per_token, kernels.quantize_per_token, x)


def hadamard_quant(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    return _unary_quant(ops.hadamard_quant, kernels.hadamard_quant, x, block)


def _norm_quant(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float
                ) -> tuple[Tensor, Tensor, Tensor]:
    x2 = _rows(x)
    y = torch.empty_like(x2)
    q, scale = _quant_outputs(x2)
    kernels.layernorm_quant(
        _nb(x2), None if weight is None else _nb(weight.contiguous()), None if bias is None else _nb(bias.contiguous()),
        eps, _nb(y), _nb(q), _nb(scale), residual=None if residual is None else _nb(_rows(residual)),
        stream=_stream(), **LAUNCH_OPTIONS)
    return (y.view(x.shape), *_shaped(x, q, scale))


def layernorm_quant(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                    ) -> tuple[Tensor, Tensor, Tensor]:
    if not _kernel_ok(x, weight, bias):
        return _reference(ops.layernorm_quant, x, weight, bias, eps)
    return _norm_quant(x, None, weight, bias, eps)


def add_layernorm_quant(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    if not _kernel_ok(x, residual, weight, bias) or residual.dtype != x.dtype or residual.shape != x.shape:
        return _reference(ops.add_layernorm_quant, x, residual, weight, bias, eps)
    return _norm_quant(x, residual, weight, bias, eps)


def rmsnorm_quant(x: Tensor, weight: Tensor, eps: float, weight_first: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor]:
    if not _kernel_ok(x, weight):
        return _reference(ops.rmsnorm_quant, x, weight, eps, weight_first)
    x2 = _rows(x)
    y_dtype = x.dtype if weight_first else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty(x2.shape, dtype=y_dtype, device=x.device)
    q, scale = _quant_outputs(x2)
    kernels.rmsnorm_quant(_nb(x2), _nb(weight.contiguous()), eps, _nb(y), _nb(q), _nb(scale),
                          weight_first=weight_first, stream=_stream(), **LAUNCH_OPTIONS)
    return (y.view(x.shape), *_shaped(x, q, scale))


def add_rmsnorm_quant(x: Tensor, residual: Tensor, weight: Tensor, eps: float, weight_first: bool = False
                      ) -> tuple[Tensor, Tensor, Tensor]:
    # the kernel rounds the norm to x's dtype: a Llama weight of another dtype (promoted output) runs the reference
    if (not _kernel_ok(x, residual, weight) or residual.dtype != x.dtype or residual.shape != x.shape
            or not (weight_first or weight.dtype == x.dtype)):
        return _reference(ops.add_rmsnorm_quant, x, residual, weight, eps, weight_first)
    x2 = _rows(x)
    h = torch.empty_like(x2)
    q, scale = _quant_outputs(x2)
    kernels.add_rmsnorm_quant(_nb(x2), _nb(_rows(residual)), _nb(weight.contiguous()), eps, _nb(h), _nb(q),
                              _nb(scale), weight_first=weight_first, stream=_stream(), **LAUNCH_OPTIONS)
    return (h.view(x.shape), *_shaped(x, q, scale))


def add_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    if not _kernel_ok(x, residual, weight) or residual.dtype != x.dtype or residual.shape != x.shape:
        return _reference(ops.add_rmsnorm, x, residual, weight, eps)
    x2 = _rows(x)
    h = torch.empty_like(x2)
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    kernels.add_rmsnorm(_nb(x2), _nb(_rows(residual)), _nb(weight.contiguous()), eps, _nb(h), _nb(y),
                        stream=_stream(), **LAUNCH_OPTIONS)
    return h.view(x.shape), y.view(x.shape)


def gelu_quant(x: Tensor, bias: Tensor | None, approximate: str) -> tuple[Tensor, Tensor]:
    if not _kernel_ok(x, bias) or (bias is not None and bias.dtype != x.dtype):
        return _reference(ops.gelu_quant, x, bias, approximate)
    x2 = _rows(x)
    q, scale = _quant_outputs(x2)
    kernels.gelu_quant(_nb(x2), None if bias is None else _nb(bias.contiguous()), approximate, _nb(q), _nb(scale),
                       stream=_stream(), **LAUNCH_OPTIONS)
    return _shaped(x, q, scale)


def relu_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    return _unary_quant(ops.relu_quant, kernels.relu_quant, x)


def _gated(op: Callable, launch: Callable, gate: Tensor, up: Tensor, *flags: Any) -> tuple[Tensor, Tensor]:
    if (not _kernel_ok(gate, up) or up.dtype != gate.dtype or up.shape != gate.shape
            or not _hadamard_ok(gate, op, flags)):
        return _reference(op, gate, up, *flags)
    g2 = _rows(gate)
    q, scale = _quant_outputs(g2)
    launch(_nb(g2), _nb(_rows(up)), *flags, _nb(q), _nb(scale), stream=_stream(), **LAUNCH_OPTIONS)
    return _shaped(gate, q, scale)


def silu_mul_quant(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return _gated(ops.silu_mul_quant, kernels.silu_mul_quant, gate, up)


def gelu_mul_quant(gate: Tensor, up: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    return _gated(ops.gelu_mul_quant, kernels.gelu_mul_quant, gate, up, approximate)


def silu_mul_hadamard_quant(gate: Tensor, up: Tensor, block: int) -> tuple[Tensor, Tensor]:
    return _gated(ops.silu_mul_hadamard_quant, kernels.silu_mul_hadamard_quant, gate, up, block)


def gelu_mul_hadamard_quant(gate: Tensor, up: Tensor, approximate: str, block: int) -> tuple[Tensor, Tensor]:
    return _gated(ops.gelu_mul_hadamard_quant, kernels.gelu_mul_hadamard_quant, gate, up, approximate, block)


def _heads(t: Tensor) -> kernels.Heads:
    """``t`` [B, H, S, D] as the kernels read it in place: its elements from the first on as a flat view, and its
    strides (a tensor whose last dim is not contiguous is copied first)."""
    if t.stride(3) != 1:
        t = t.contiguous()
    span = 1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride())) if t.numel() else 0
    return kernels.Heads(_nb(t.as_strided((span,), (1,))), t.shape[1], tuple(t.stride()[:3]))


def _rotary_ok(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *more: Tensor) -> bool:
    return (_kernel_ok(q, k, cos, sin, *more) and len({t.dtype for t in (q, k, cos, sin, *more)}) == 1
            and q.dim() == k.dim() == cos.dim() == 4 and cos.shape == sin.shape and q.shape[-1] % 2 == 0
            and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:] and cos.shape[0] in (1, q.shape[0])
            and cos.shape[1] == 1 and cos.shape[2] in (1, q.shape[2]) and cos.shape[3] == q.shape[3])


def _cos_sin(cos: Tensor, sin: Tensor, seq: int, dim: int) -> list[Any]:
    return [_nb(t.expand(-1, 1, seq, dim).contiguous().view(-1, dim)) for t in (cos, sin)]


def rotary_embedding(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    if not _rotary_ok(q, k, cos, sin):
        return _reference(ops.rotary_embedding, q, k, cos, sin)
    batch, _, seq, dim = q.shape
    q_out, k_out = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k))
    kernels.rotary_embedding(_heads(q), _heads(k), *_cos_sin(cos, sin, seq, dim), _nb(q_out), _nb(k_out), batch,
                             seq, stream=_stream())
    return q_out, k_out


def rotary_embedding_kv_cache(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_cache: Tensor,
                              value_cache: Tensor, cache_position: Tensor) -> Tensor:
    if (not _rotary_ok(q, k, cos, sin, v, key_cache, value_cache) or v.shape != k.shape
            or not key_cache.is_contiguous() or not value_cache.is_contiguous() or key_cache.dim() != 4
            or key_cache.shape != value_cache.shape or key_cache.shape[:2] != k.shape[:2]
            or key_cache.shape[3] != k.shape[3] or cache_position.dtype != torch.int64
            or cache_position.shape != (q.shape[2],) or not cache_position.is_cuda):
        return _reference(ops.rotary_embedding_kv_cache, q, k, v, cos, sin, key_cache, value_cache, cache_position)
    batch, _, seq, dim = q.shape
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    kernels.rotary_embedding(_heads(q), _heads(k), *_cos_sin(cos, sin, seq, dim), _nb(q_out),
                             _nb(key_cache.view(-1)), batch, seq, v=_heads(v), v_out=_nb(value_cache.view(-1)),
                             slots=_nb(cache_position), stream=_stream())
    return q_out
