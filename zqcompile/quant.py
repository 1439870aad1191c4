"""Plain quantization arithmetic shared by the ops, the passes and LKD.

Symmetric quantization by default (ZeroQuant): q = clamp(round_half_even(x / s), -qmax, qmax) with
qmax = 2**(bits-1) - 1 and s = absmax / qmax. Scales are float32.

INT4 weights may instead be asymmetric ("scale and min", llama.cpp's Q4_1, the asymmetric groups of GPTQ / AWQ
deployments): per group s = (max - min) / 15, q = clamp(round_half_even((w - min) / s), 0, 15), w ~ s * q + min,
with the group's min stored as a float32 tensor of the scales' shape. A group of equal values gets s = 1 (so
q = 0 and the min is the value itself).

Weight scales have shape ``[G_out, G_in]``: ``G_out`` groups of consecutive output rows (ZeroQuant's
groups; ``G_out == N`` is per-channel) times ``G_in`` groups along the input dim (``G_in == 1`` unless an
input-dim group size is set, which INT4 benefits from). A row ``n`` and column ``k`` use
``scale[n // (N // G_out), k // (K // G_in)]``.
"""

from __future__ import annotations

import torch

from zqcompile.errors import ZQError

ACT_QMAX = 127
ASYM_LEVELS = 15  # asymmetric INT4: q in [0, 15]


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
                    input_group_size: int | None = None, symmetric: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group-wise weight quantization: (int8 values, float32 scales [G_out, G_in], float32 mins [G_out, G_in] or
    None). Symmetric: values in [-qmax, qmax], no mins; asymmetric (INT4 only): values in [0, 15]."""
    n, k = weight.shape
    g_out, g_in = weight_groups(n, k, group_size, input_group_size)
    w = weight.detach().float()
    blocks = w.reshape(g_out, n // g_out, g_in, k // g_in)
    scale, w_min = grid_params(blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3)), bits, symmetric)
    full_min = None if w_min is None else expand_weight_scale(w_min, n, k)
    return round_to_grid(w, expand_weight_scale(scale, n, k), full_min, bits), scale, w_min


def grid_params(lowest: torch.Tensor, highest: torch.Tensor, bits: int, symmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scales (and, asymmetric, the mins) of groups whose smallest and largest values are given."""
    qmax = qmax_for_bits(bits)
    if symmetric:
        return safe_scale(torch.maximum(lowest.abs(), highest.abs()), qmax), None
    if bits != 4:
        raise ZQError(f"asymmetric weights (weight_symmetric: false) are INT4 only, got {bits} bits")
    scale = safe_scale(highest.float() - lowest.float(), ASYM_LEVELS)
    return scale, lowest.float() + (scale - scale)  # a NaN group gets a NaN min too


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor | None, bits: int) -> torch.Tensor:
    """int8 grid values of ``w`` for scales (and mins) already broadcast to its shape; NaN rounds to 0."""
    if w_min is None:
        qmax = qmax_for_bits(bits)
        q = torch.clamp(torch.round(w / scale), -qmax, qmax)
    else:
        q = torch.clamp(torch.round((w - w_min) / scale), 0, ASYM_LEVELS)
    return q.nan_to_num(0.0).to(torch.int8)


def dequantize_weight_values(q: torch.Tensor, scale: torch.Tensor, w_min: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """float32 weight from int8 values [N, K], [G_out, G_in] scales and (asymmetric) mins: s * q (+ min)."""
    n, k = q.shape
    w = q.float() * expand_weight_scale(scale, n, k)
    return w if w_min is None else w + expand_weight_scale(w_min, n, k).float()


def int4_group_width(w_packed: torch.Tensor, w_scale: torch.Tensor) -> int:
    """Values per input-dim group of a packed INT4 weight [N, K/2] with scales [G_out, G_in] (K without groups)."""
    return 2 * w_packed.shape[-1] // w_scale.shape[-1]


def pack_int4(q: torch.Tensor, group_width: int, symmetric: bool = True) -> torch.Tensor:
    """Pack INT4 values [..., K] two per byte, "half-split" inside each input-dim group of ``group_width`` values
    (K without groups): byte j of a group holds value j in its low nibble and value j + group_width / 2 in its
    high nibble, so a kernel multiplies each nibble half by one contiguous run of activations. Nibbles are
    unsigned: q + 8 for symmetric values in [-8, 7], q for asymmetric ones in [0, 15]."""
    k = q.shape[-1]
    if group_width % 2 or k % group_width:
        raise ZQError(f"INT4 packing needs an even group width dividing in_features, got {group_width} for {k}")
    low, high = (-8, 7) if symmetric else (0, ASYM_LEVELS)
    if q.numel() and (q.min() < low or q.max() > high):
        raise ZQError(f"INT4 packing got values outside [{low}, {high}]")
    codes = (q.to(torch.int16) + (8 if symmetric else 0)).to(torch.uint8)
    groups = codes.reshape(*q.shape[:-1], k // group_width, 2, group_width // 2)
    return (groups[..., 0, :] | (groups[..., 1, :] << 4)).reshape(*q.shape[:-1], k // 2)


def unpack_int4(packed: torch.Tensor, group_width: int, symmetric: bool = True) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [..., K/2] -> int8 [..., K]."""
    half = group_width // 2
    groups = packed.reshape(*packed.shape[:-1], packed.shape[-1] // half, 1, half)
    codes = torch.cat((groups & 0xF, groups >> 4), dim=-2).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return codes.to(torch.int8) - 8 if symmetric else codes.to(torch.int8)


def unpack_weight(w: torch.Tensor, w_scale: torch.Tensor, w_min: torch.Tensor | None = None) -> torch.Tensor:
    """int8 values of a stored weight: INT8 weights are stored as int8, INT4 weights packed as uint8 (pack_int4,
    in the scales' input groups; asymmetric when the weight has mins)."""
    if w.dtype != torch.uint8:
        return w
    return unpack_int4(w, int4_group_width(w, w_scale), symmetric=w_min is None)


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
