"""Plain quantization arithmetic shared by the ops, the passes and LKD.

Symmetric quantization everywhere (ZeroQuant): q = clamp(round_half_even(x / s), -qmax, qmax) with
qmax = 2**(bits-1) - 1 and s = absmax / qmax. Scales are float32.

Weight scales have shape ``[G_out, G_in]``: ``G_out`` groups of consecutive output rows (ZeroQuant's
groups; ``G_out == N`` is per-channel) times ``G_in`` groups along the input dim (``G_in == 1`` unless an
input-dim group size is set, which INT4 benefits from). A row ``n`` and column ``k`` use
``scale[n // (N // G_out), k // (K // G_in)]``.
"""

from __future__ import annotations

import torch

from zqcompile.errors import ZQError

ACT_QMAX = 127


def qmax_for_bits(bits: int) -> int:
    if bits not in (4, 8):
        raise ZQError(f"weight bits must be 4 or 8, got {bits}")
    return 2 ** (bits - 1) - 1


def safe_scale(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    """absmax / qmax, with 1.0 where absmax is 0 so that an all-zero group quantizes to zeros, not NaN, and NaN
    where the group holds a NaN or an Inf: integers cannot hold them, so the scale carries them and every
    dequantized value of the group is NaN, as the floating-point model's output would be non-finite there."""
    scale = absmax.float() / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale + (scale - scale)  # + 0 for a finite scale, NaN for an infinite or NaN one


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-wise (last-dim) symmetric INT8: returns (int8 values, float32 scale of shape [..., 1]).

    A row holding a NaN or an Inf gets a NaN scale (see safe_scale) and int8 values 0."""
    xf = x.float()
    scale = safe_scale(xf.abs().amax(dim=-1, keepdim=True), ACT_QMAX)
    q = torch.clamp(torch.round(xf / scale), -ACT_QMAX, ACT_QMAX).nan_to_num(0.0).to(torch.int8)
    return q, scale


def weight_groups(out_features: int, in_features: int, group_size: int | None,
                  input_group_size: int | None) -> tuple[int, int]:
    """(G_out, G_in) for a weight of shape [out_features, in_features]; raises if a group size does not divide."""
    rows = group_size or 1
    cols = input_group_size or in_features
    if out_features % rows:
        raise ZQError(f"group_size={group_size} does not divide out_features={out_features}; "
                      f"choose a divisor of {out_features} or None (per-channel)")
    if in_features % cols:
        raise ZQError(f"input_group_size={input_group_size} does not divide in_features={in_features}; "
                      f"choose a divisor of {in_features} or None")
    return out_features // rows, in_features // cols


def expand_weight_scale(scale: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Broadcast a [G_out, G_in] scale to the full [N, K] weight shape."""
    g_out, g_in = scale.shape
    return scale.repeat_interleave(out_features // g_out, 0).repeat_interleave(in_features // g_in, 1)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int | None = None,
                    input_group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise symmetric weight quantization: returns (int8 values in [-qmax, qmax], float32 [G_out, G_in])."""
    qmax = qmax_for_bits(bits)
    n, k = weight.shape
    g_out, g_in = weight_groups(n, k, group_size, input_group_size)
    w = weight.detach().float()
    blocks = w.reshape(g_out, n // g_out, g_in, k // g_in)
    scale = safe_scale(blocks.abs().amax(dim=(1, 3)), qmax)
    q = torch.clamp(torch.round(w / expand_weight_scale(scale, n, k)), -qmax, qmax).nan_to_num(0.0).to(torch.int8)
    return q, scale


def dequantize_weight_values(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weight from int8 values [N, K] and a [G_out, G_in] scale."""
    n, k = q.shape
    return q.float() * expand_weight_scale(scale, n, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] two per byte along the last dim: low nibble = even column."""
    if q.shape[-1] % 2:
        raise ZQError(f"INT4 packing needs an even in_features, got {q.shape[-1]}")
    if q.min() < -8 or q.max() > 7:
        raise ZQError("INT4 packing got values outside [-8, 7]")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., K/2] -> int8 [..., K] (sign-extended nibbles)."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(both > 7, both - 16, both)


def unpack_weight(w: torch.Tensor) -> torch.Tensor:
    """int8 values of a stored weight: INT8 weights are stored as int8, INT4 weights packed as uint8."""
    return unpack_int4(w) if w.dtype == torch.uint8 else w


def exact_int_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 result of a[M, K] @ b_t[N, K].T for int8 operands, fast on CPU.

    ``torch._int_mm`` on CPU is ~40x slower than a float32 GEMM, so we use float32 GEMMs over chunks of
    K <= 1024: every partial sum is an integer of magnitude <= 1024 * 127 * 127 < 2**24 and is therefore
    represented exactly, whatever order BLAS adds in.
    """
    k = a.shape[-1]
    acc = torch.zeros(a.shape[0], b_t.shape[0], dtype=torch.int32, device=a.device)
    for start in range(0, k, 1024):
        chunk = slice(start, min(start + 1024, k))
        acc += (a[:, chunk].float() @ b_t[:, chunk].float().T).to(torch.int32)
    return acc
