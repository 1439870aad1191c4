"""CUDA kernels for ``zq::int8_linear`` and ``zq::int4_linear``: Triton INT8 GEMMs with the dequant fused.

Both kernels multiply INT8 activations ``[M, K]`` by the stored weight ``[N, K]`` as it is (K-contiguous
rows are exactly the K-major B operand that the INT8 tensor-core instructions want, so no re-layout is
needed), accumulate in INT32 on the tensor cores, and apply the epilogue ``y = acc * s_x[row] * s_w[col] +
bias`` in float32 before the single store in ``out_dtype``: the INT32 product never goes to memory. Output-row
groups (``G_out < N``) index ``w_scale[col // (N // G_out)]``.

``_int_linear_kernel`` ("tiled": one program per output tile, pointer loads) serves every case, W8A8 and
W4A8 (``INT4`` is a ``tl.constexpr``):

* INT4 weights (``uint8 [N, K/2]``, quant.pack_int4: unsigned nibbles, half-split in each input group) are
  unpacked in registers with one AND (and a shift) per four bytes (``_nibbles``: PTX on 32-bit registers; byte by
  byte, the compiler spent about 3.5 instructions per nibble), so only half the weight bytes are read. A tile of
  bytes multiplies two contiguous activation runs (the group's first and second halves), two INT8 MMAs on the
  nibbles as they are (0..15); the group's epilogue corrects for the offset with the activations' sum over the
  group: ``(acc - 8 asum) s_w`` (symmetric, exact in INT32) or ``acc s_w + asum min`` (asymmetric).
* Input-dim groups (``G_in > 1``) change the scale along K, so each group's partial INT32 sum is
  scaled and added into a float32 accumulator separately; ``BLOCK_K`` is chosen to divide the group
  width so a K tile never straddles two groups.

``_int_linear_tma_kernel`` ("tma_persistent") is the Hopper (sm_90) kernel for plain W8A8 (INT8 weights,
``G_in == 1``): a persistent grid of ``ctas_per_sm`` programs per SM loops over the output tiles, and
host-side TMA descriptors load the operand tiles (zero-filled past M, N, K) and store the output tile
(clipped at M, N). Its configs join the tiled kernel's candidates where ``tma_kernel_applies``.

Block shapes and the kernel are autotuned per (M bucket, N, K, variant) on first use (a small in-module
tuner, so the tests can also run every candidate config and the CUDA-graph capture never triggers tuning);
the choices persist on disk per GPU and library versions (tuning_cache.py), so a new process does not re-tune.
``torch._int_mm`` + a separate dequant is kept as the fallback for machines without a working Triton
(and as the baseline in ``benchmarks/gemm.py``).

Importing this module never needs Triton or a GPU; using it without them raises ``ZQError``.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from zqcompile import ops
from zqcompile.backends import autotune, tuning_cache
from zqcompile.errors import ZQError
from zqcompile.quant import expand_weight_scale, unpack_weight

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception as exc:  # noqa: BLE001 - a broken Triton install must not break importing zqcompile
    triton = None
    _TRITON_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _TRITON_ERROR = None

AUTOTUNE = os.environ.get("ZQ_TRITON_AUTOTUNE", "1") != "0"
"""Benchmark the candidate configs on the first call of each shape key (set ZQ_TRITON_AUTOTUNE=0 to
use the first candidate of each M bucket instead, e.g. to keep test runs short)."""

_MIN_BLOCK_K = 32  # the K of one INT8 tensor-core instruction


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch parameters of one kernel instance."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8  # row-tile swizzle so consecutive programs share weight tiles in L2
    kernel: str = "tiled"  # "tiled" (_int_linear_kernel) or "tma_persistent" (_int_linear_tma_kernel)
    subtile: bool = False  # tma_persistent: store the output tile in two column halves
    ctas_per_sm: int = 1  # tma_persistent: programs per SM in the persistent grid


# Candidates per (M bucket, input-dim grouped); the first of each is the untuned default. Large tiles
# keep the tensor cores fed at prefill/encoder sizes; decode sizes (M <= 16) are bound by reading the
# weight once, so they use the smallest M tile and narrow N tiles to spread the weight over more SMs.
# Input-dim groups keep a float32 accumulator beside the INT32 one, which doubles the accumulator
# registers: the grouped lists leave out the tiles that spill at 255 registers (checked for sm_90 with
# cuobjdump -res-usage: 128x128 and larger with 8 warps).
_DECODE = (
    GemmConfig(16, 64, 256, 4, 4), GemmConfig(16, 32, 256, 4, 4), GemmConfig(16, 64, 128, 4, 5),
    GemmConfig(16, 128, 128, 4, 4), GemmConfig(16, 32, 512, 4, 3),
)
_CONFIGS: dict[tuple[str, bool], tuple[GemmConfig, ...]] = {
    ("decode", False): _DECODE,
    ("decode", True): _DECODE,
    ("medium", False): (
        GemmConfig(64, 128, 128, 4, 4), GemmConfig(64, 64, 128, 4, 4), GemmConfig(32, 64, 256, 4, 4),
        GemmConfig(128, 128, 128, 8, 3), GemmConfig(64, 256, 128, 8, 3),
    ),
    ("medium", True): (
        GemmConfig(64, 64, 128, 4, 4), GemmConfig(64, 128, 128, 4, 4), GemmConfig(32, 64, 256, 4, 4),
        GemmConfig(64, 256, 128, 8, 3),
    ),
    ("large", False): (
        GemmConfig(128, 128, 128, 8, 4), GemmConfig(128, 256, 128, 8, 3), GemmConfig(256, 128, 128, 8, 3),
        GemmConfig(128, 128, 128, 4, 4), GemmConfig(128, 64, 128, 4, 4), GemmConfig(64, 128, 128, 4, 4),
        GemmConfig(128, 256, 128, 8, 4), GemmConfig(256, 128, 128, 8, 4), GemmConfig(128, 128, 256, 8, 3),
    ),
    ("large", True): (
        GemmConfig(64, 128, 128, 4, 4), GemmConfig(128, 64, 128, 4, 4), GemmConfig(64, 256, 128, 8, 3),
        GemmConfig(64, 64, 128, 4, 4),
    ),
}


def _tma(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int, *, subtile: bool = False,
         ctas_per_sm: int = 1) -> GemmConfig:
    return GemmConfig(block_m, block_n, block_k, num_warps, num_stages, kernel="tma_persistent", subtile=subtile,
                      ctas_per_sm=ctas_per_sm)


# The persistent TMA kernel's candidates (W8A8 with one input group on sm_90, see tma_kernel_applies).
# Two CTAs of one warpgroup per SM are the fastest at BERT/GPT prefill shapes on an H100 (1.15-1.7x cuBLAS
# FP16, against 1.0-1.3x for one CTA of two warpgroups): while one CTA runs its epilogue, the other keeps the
# tensor cores busy. Two CTAs need <= 113 KB of shared memory each, hence 3 stages and subtiled stores for
# 128x128 tiles with 16-bit outputs (fp32 outputs of some of these fit only one CTA per SM: correct but
# slower). Every config fits 227 KB and compiles without spills for sm_90 with fp16, bf16 and fp32 outputs.
_TMA_CONFIGS: dict[str, tuple[GemmConfig, ...]] = {
    "medium": (
        _tma(64, 128, 128, 4, 4, ctas_per_sm=2), _tma(64, 64, 128, 4, 4, ctas_per_sm=2),
        _tma(64, 64, 256, 4, 3, ctas_per_sm=2), _tma(128, 128, 128, 4, 3, subtile=True, ctas_per_sm=2),
    ),
    "large": (
        _tma(128, 128, 128, 4, 3, subtile=True, ctas_per_sm=2), _tma(64, 128, 128, 4, 4, ctas_per_sm=2),
        _tma(128, 128, 64, 4, 5, subtile=True, ctas_per_sm=2), _tma(128, 256, 128, 8, 3, subtile=True),
        _tma(128, 64, 128, 4, 4, ctas_per_sm=2), _tma(64, 128, 128, 4, 3, subtile=True, ctas_per_sm=2),
        _tma(256, 128, 128, 8, 3, subtile=True), _tma(128, 128, 256, 8, 3, subtile=True),
    ),
}


def m_bucket(m: int) -> int:
    """The autotuning bucket of a row count: the next power of two, at least 16, at most 8192."""
    return min(max(16, 1 << max(m - 1, 0).bit_length()), 8192)


def candidate_configs(m: int, k: int, group_width: int | None, *, tma: bool = False) -> list[GemmConfig]:
    """The configs worth trying for this shape, each fitted to K and to the input-dim group width.

    ``group_width`` is ``K // G_in`` when ``G_in > 1``, else None. ``BLOCK_K`` is shrunk to the largest
    power of two dividing the group width (a tile must not straddle two scale groups), or dividing K,
    so the main loop needs no K mask (masked 1-byte loads cannot use the asynchronous copies the software
    pipeline is built on); only a K with no such divisor >= 32 runs masked. Returns [] when the group
    width is not a multiple of the tensor-core K (32): the Triton kernel does not cover that case.
    ``tma`` (see ``tma_kernel_applies``) adds the persistent TMA kernel's configs for M > 16.
    """
    size = "decode" if m <= 16 else "medium" if m <= 128 else "large"
    return list(_fitted_configs(size, k, group_width, tma))


@functools.lru_cache(maxsize=None)  # on every eager GEMM call's host path
def _fitted_configs(size: str, k: int, group_width: int | None, tma: bool) -> tuple[GemmConfig, ...]:
    width = group_width or k
    divisor = width & -width
    if divisor < _MIN_BLOCK_K:
        if group_width is not None:
            return ()
        divisor = max(_MIN_BLOCK_K, 1 << (k - 1).bit_length())
    tiled = _CONFIGS[size, group_width is not None]
    tma_configs = _TMA_CONFIGS.get(size, ()) if tma and group_width is None else ()
    # The first candidate is the untuned default: the TMA kernel's for M > 128, the tiled kernel's below,
    # where the TMA kernel measured no faster on an H100.
    ordered = (*tma_configs, *tiled) if size == "large" else (*tiled, *tma_configs)
    fitted: list[GemmConfig] = []
    for cfg in ordered:
        cfg = replace(cfg, block_k=min(cfg.block_k, divisor))
        if cfg not in fitted:
            fitted.append(cfg)
    return tuple(fitted)


# ----------------------------------------------------------------------------------------------------
# Argument checks (pure Python, shared by every path)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Problem:
    m: int
    n: int
    k: int
    g_out: int
    g_in: int


def check_linear_args(x_q: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                      int4: bool, w_min: Tensor | None = None) -> _Problem:
    """Validate the operands of int8_linear / int4_linear against the DESIGN.md conventions."""
    op = "int4_linear" if int4 else "int8_linear"
    w_dtype = torch.uint8 if int4 else torch.int8
    if x_q.dtype != torch.int8:
        raise ZQError(f"{op}: activations must be int8, got {x_q.dtype}; quantize them with zq.quantize_per_token")
    if w.dtype != w_dtype or w.dim() != 2:
        raise ZQError(f"{op}: weight must be a 2-D {w_dtype} tensor, got {w.dtype} {tuple(w.shape)}"
                      + ("; INT4 weights are packed with zqcompile.quant.pack_int4" if int4 else ""))
    n = w.shape[0]
    k = w.shape[1] * 2 if int4 else w.shape[1]
    if x_q.dim() < 1 or x_q.shape[-1] != k:
        raise ZQError(f"{op}: activations {tuple(x_q.shape)} do not match the weight's in_features {k}")
    m = x_q.numel() // k if k else 0
    if x_scale.numel() != m:
        raise ZQError(f"{op}: expected one activation scale per token ({m}), got shape {tuple(x_scale.shape)}")
    if w_scale.dim() != 2 or n % w_scale.shape[0] or k % w_scale.shape[1]:
        raise ZQError(f"{op}: weight scale {tuple(w_scale.shape)} must be [G_out, G_in] with G_out dividing "
                      f"N={n} and G_in dividing K={k}")
    if bias is not None and bias.shape != (n,):
        raise ZQError(f"{op}: bias must have shape ({n},), got {tuple(bias.shape)}")
    if w_min is not None and (not int4 or w_min.shape != w_scale.shape):
        raise ZQError(f"{op}: asymmetric weight mins {tuple(w_min.shape)} must have the scales' shape "
                      f"{tuple(w_scale.shape)}, and only INT4 weights have them")
    if int4 and (k // w_scale.shape[1]) % 2:
        raise ZQError(f"{op}: INT4 input groups of {k // w_scale.shape[1]} values: pack_int4 needs an even width")
    tensors = [x_q, x_scale, w, w_scale] + [t for t in (bias, w_min) if t is not None]
    if any(t.device != x_q.device for t in tensors):
        raise ZQError(f"{op}: operands are on different devices {[str(t.device) for t in tensors]}; "
                      "move the model and its inputs to one device")
    return _Problem(m, n, k, w_scale.shape[0], w_scale.shape[1])


def small_group_sums(width: int, int4: bool) -> bool:
    """Whether every exact INT32 sum over ``width`` products of int8 activations (|a| <= 128) with INT4 nibbles
    (<= 15) or int8 weights (|w| <= 128) stays within 2^22 in magnitude, so ``_exact_f32`` may convert it with an
    add and a subtract."""
    return width * 128 * (15 if int4 else 128) <= 2**22


def tma_operands_ok(*tensors: Tensor) -> bool:
    """Whether TMA descriptors can address these 2-D tensors: unit last stride, base address and row
    pitch multiples of 16 bytes (a hardware requirement of the tensor maps)."""
    return all(t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0
               for t in tensors)


def tma_kernel_applies(a: Tensor, w: Tensor, out: Tensor, *, int4: bool, g_in: int) -> bool:
    """Whether the persistent TMA kernel can run ``out = a @ w.T``: W8A8 with one input group (the kernel
    has no INT4 unpacking or per-group rescaling), on a Hopper GPU, with TMA-addressable operands.

    Only sm_90: its configs are sized for Hopper's 227 KB of shared memory per CTA (two CTAs per SM), and
    newer GPUs differ (sm_120 has 99 KB), so they keep the tiled kernel until tuned there.
    """
    return (not int4 and g_in == 1 and a.is_cuda and torch.cuda.get_device_capability(a.device)[0] == 9
            and tma_operands_ok(a, w, out))


def _require_cuda(what: str, *tensors: Tensor) -> None:
    if not torch.cuda.is_available():
        raise ZQError(f"{what} needs a CUDA GPU but torch.cuda.is_available() is False; run on a machine with "
                      "an NVIDIA GPU and a CUDA build of PyTorch, or use the CPU reference backend")
    if any(not t.is_cuda for t in tensors):
        raise ZQError(f"{what} got tensors on {sorted({str(t.device) for t in tensors})}; move the model and "
                      "its inputs to CUDA (model.cuda().half()) or use the CPU reference backend")


def _require_triton() -> None:
    if triton is None:
        raise ZQError(f"the Triton GEMM backend needs Triton, which failed to import ({_TRITON_ERROR}); "
                      "install a Triton matching your PyTorch (pip install triton) or use register_cuda_kernels(), "
                      "which falls back to torch._int_mm")


# ----------------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------------

if triton is not None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        @triton.jit
        def _nibbles(w):
            """The interpreter's stand-in for the word-wide unpacking below (it runs no PTX): the same bytes."""
            return (w & 0xF).to(tl.int8), (w >> 4).to(tl.int8)
    else:
        @triton.jit
        def _nibbles(w):
            """Packed bytes (uint8) -> their low and high nibbles as int8 in [0, 15]: one AND (and a shift) per four
            bytes, on 32-bit registers (``pack=4``), instead of byte by byte."""
            lo = tl.inline_asm_elementwise("and.b32 $0, $1, 0x0F0F0F0F;", "=r,r", [w], dtype=tl.int8, is_pure=True,
                                           pack=4)
            hi = tl.inline_asm_elementwise("shr.u32 $0, $1, 4; and.b32 $0, $0, 0x0F0F0F0F;", "=r,r", [w],
                                           dtype=tl.int8, is_pure=True, pack=4)
            return lo, hi

    @triton.jit
    def _load_half_split(a_row_ptrs, a_rows_ok, w_ptrs, p0, half, group, n_bytes, offs_b, EVEN: tl.constexpr):
        """One INT4 tile in the half-split layout (quant.pack_int4): the weight bytes [p0, p0 + B) of each row
        (``w_ptrs``: byte 0 of the rows plus ``offs_b``, B bytes) and the activations their nibbles multiply.
        Byte j of an input group of ``group`` values (``half`` bytes) holds value j (low nibble) and j + half (high
        nibble), and a tile never straddles two groups, so the low nibbles multiply the contiguous activations
        [lo, lo + B) and the high ones [lo + half, lo + half + B). Returns (a_lo, a_hi, low, high), the nibbles
        as int8 in [0, 15]. Not EVEN: a K without input groups (one group, ``n_bytes`` = K / 2 = half), zeros
        past it."""
        lo = (p0 // half) * group + p0 % half
        if EVEN:  # p0, half and group are multiples of B (>= 16 bytes): aligned, vectorizable activation loads
            lo = tl.multiple_of(lo, 16)
            w = tl.load(w_ptrs + p0)
            a_lo = tl.load(a_row_ptrs + (lo + offs_b)[None, :], mask=a_rows_ok, other=0)
            a_hi = tl.load(a_row_ptrs + (lo + half + offs_b)[None, :], mask=a_rows_ok, other=0)
        else:
            ok = (p0 + offs_b)[None, :] < n_bytes
            w = tl.load(w_ptrs + p0, mask=ok, other=0)
            a_lo = tl.load(a_row_ptrs + (lo + offs_b)[None, :], mask=a_rows_ok & ok, other=0)
            a_hi = tl.load(a_row_ptrs + (lo + half + offs_b)[None, :], mask=a_rows_ok & ok, other=0)
        w_lo, w_hi = _nibbles(w)
        return a_lo, a_hi, w_lo, w_hi

    @triton.jit
    def _half_split_dot(acc, a_lo, a_hi, w_lo, w_hi):
        """acc + a_lo @ w_lo.T + a_hi @ w_hi.T, the weight halves [N, B] in the activations' MMA type. Halves
        narrower than one INT8 MMA (B < 32: groups of 32) are joined back into one [lo | hi] tile for one dot."""
        # (one return after if/else: Triton 3.6, the GPU image's, compiles the code after a static if's return)
        if a_lo.shape[1] < 32:
            a = tl.reshape(tl.permute(tl.join(a_lo, a_hi), (0, 2, 1)), (a_lo.shape[0], 2 * a_lo.shape[1]))
            w = tl.reshape(tl.permute(tl.join(w_lo, w_hi), (0, 2, 1)), (w_lo.shape[0], 2 * w_lo.shape[1]))
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=acc.dtype)
        else:
            acc = tl.dot(a_lo, tl.trans(w_lo), acc, out_dtype=acc.dtype)
            acc = tl.dot(a_hi, tl.trans(w_hi), acc, out_dtype=acc.dtype)
        return acc

    @triton.jit
    def _exact_f32(x, SMALL: tl.constexpr):
        """An exact integer sum (int32; float tensors pass through) in float32. ``SMALL`` (|x| <= 2^22, which the
        caller's group width guarantees, see ``small_group_sums``): x added to the bits of 1.5 * 2^23 is the float
        1.5 * 2^23 + x, minus that, x (an integer add and a float subtract, where the int-to-float convert runs at a
        quarter of the FMA rate, on every accumulator element once per input group)."""
        if SMALL and x.dtype == tl.int32:
            y = (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
        else:
            y = x.to(tl.float32)
        return y

    @triton.jit
    def _int4_group_scaled(acc, part, asum, s_w, w_min_ptrs, ASYM: tl.constexpr, SMALL: tl.constexpr = False):
        """acc + one input group's INT4 product in float32, from its nibble product ``part`` and the group's
        activation sum ``asum``: nibbles q + 8 (symmetric: ``(part - 8 asum) s_w``, exact before the scale) or q
        (asymmetric: ``part s_w + asum min``, the mins loaded from ``w_min_ptrs``, added in the reference's order).
        ``SMALL``: see ``_exact_f32``."""
        if ASYM:
            acc += _exact_f32(part, SMALL) * s_w[None, :]
            acc += asum.to(tl.float32)[:, None] * tl.load(w_min_ptrs)[None, :]
        else:
            acc += _exact_f32(part - 8 * asum[:, None], SMALL) * s_w[None, :]
        return acc

    @triton.jit
    def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        """Output tile index -> (row tile, column tile), walking GROUP_M row tiles per column tile so
        consecutive tiles share weight tiles in L2."""
        tiles_per_group = GROUP_M * num_pid_n
        first_pid_m = (tile_id // tiles_per_group) * GROUP_M
        group_rows = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (tile_id % tiles_per_group) % group_rows
        pid_n = (tile_id % tiles_per_group) // group_rows
        return pid_m, pid_n

    @triton.jit
    def _scale_rows_add_bias(acc, rows, cols, a_scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
        """The epilogue after the weight scale: ``acc * s_x[row] (+ bias[col])`` in float32."""
        acc = acc * tl.load(a_scale_ptr + rows)[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _int_linear_tile(
        tile_id, a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, w_min_ptr, bias_ptr,
        M, N, K, rows_per_scale, g_in, group, stride_am, stride_wn,
        INT4: tl.constexpr, ASYM: tl.constexpr, GROUPED: tl.constexpr, TILES_PER_GROUP: tl.constexpr,
        SMALL_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """The tiled kernel up to its store, for output tile ``tile_id``: (offs_m, offs_n, rows, cols, y) with y the
        float32 tile ``sum_g acc_g * s_w[col, g] * s_x[row] + bias`` (INT4: offset / min corrected per group),
        ``offs_*`` its indices and ``rows`` / ``cols`` the same wrapped onto valid ones (for loads without masks;
        the store drops them). triton_outlier's kernel adds its outlier product to y before storing."""
        pid_m, pid_n = _tile_coords(tile_id, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Out-of-range rows/cols wrap onto valid ones so the main loop loads without M/N masks; the
        # store drops them.
        rows = offs_m % M
        cols = offs_n % N
        W_STEP: tl.constexpr = BLOCK_K // 2 if INT4 else BLOCK_K  # weight bytes per row per K tile
        offs_k = tl.arange(0, BLOCK_K)
        offs_wk = tl.arange(0, W_STEP)
        a_row_ptrs = a_ptr + rows[:, None] * stride_am
        w_ptrs = w_ptr + cols[:, None] * stride_wn + offs_wk[None, :]
        w_scale_ptrs = w_scale_ptr + (cols // rows_per_scale) * g_in
        w_min_ptrs = w_min_ptr + (cols // rows_per_scale) * g_in

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        asum = tl.zeros((BLOCK_M,), dtype=tl.int32)  # INT4: the activations' sum over the group so far
        for k0 in range(0, K, BLOCK_K):
            if INT4:
                a_lo, a_hi, w_lo, w_hi = _load_half_split(a_row_ptrs, rows[:, None] < M, w_ptrs, k0 // 2, group // 2,
                                                          group, K // 2, offs_wk, EVEN_K)
                part = _half_split_dot(part, a_lo, a_hi, w_lo, w_hi)
                asum += tl.sum(a_lo.to(tl.int32), 1) + tl.sum(a_hi.to(tl.int32), 1)
            else:
                if EVEN_K:
                    a = tl.load(a_row_ptrs + (k0 + offs_k)[None, :])
                    wt = tl.load(w_ptrs + k0)
                else:
                    a = tl.load(a_row_ptrs + (k0 + offs_k)[None, :], mask=offs_k[None, :] < K - k0, other=0)
                    wt = tl.load(w_ptrs + k0, mask=offs_wk[None, :] < K - k0, other=0)
                part = tl.dot(a, tl.trans(wt), part, out_dtype=tl.int32)
            if GROUPED:
                # Last tile of an input-dim group: scale its exact INT32 sum by that group's weight scale.
                if (k0 + BLOCK_K) % (TILES_PER_GROUP * BLOCK_K) == 0:
                    g = k0 // (TILES_PER_GROUP * BLOCK_K)
                    s_w = tl.load(w_scale_ptrs + g)
                    if INT4:
                        acc = _int4_group_scaled(acc, part, asum, s_w, w_min_ptrs + g, ASYM, SMALL_GROUPS)
                        asum = tl.zeros((BLOCK_M,), dtype=tl.int32)
                    else:
                        acc += _exact_f32(part, SMALL_GROUPS) * s_w[None, :]
                    part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        if not GROUPED:
            s_w = tl.load(w_scale_ptrs)
            if INT4:
                acc = _int4_group_scaled(acc, part, asum, s_w, w_min_ptrs, ASYM)
            else:
                acc = part.to(tl.float32) * s_w[None, :]
        return offs_m, offs_n, rows, cols, _scale_rows_add_bias(acc, rows, cols, a_scale_ptr, bias_ptr, HAS_BIAS)

    @triton.jit
    def _int_linear_kernel(
        a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, w_min_ptr, bias_ptr, c_ptr,
        M, N, K, rows_per_scale, g_in, group, stride_am, stride_wn, stride_cm,
        INT4: tl.constexpr, ASYM: tl.constexpr, GROUPED: tl.constexpr, TILES_PER_GROUP: tl.constexpr,
        SMALL_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        offs_m, offs_n, _, _, acc = _int_linear_tile(
            tl.program_id(0), a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, w_min_ptr, bias_ptr, M, N, K, rows_per_scale,
            g_in, group, stride_am, stride_wn, INT4, ASYM, GROUPED, TILES_PER_GROUP, SMALL_GROUPS, HAS_BIAS, EVEN_K,
            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def _int_linear_tma_kernel(
        a_desc, w_desc, c_desc, a_scale_ptr, w_scale_ptr, bias_ptr,
        M, N, K, rows_per_scale,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, SUBTILE: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    ):
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)  # TMA reads zeros past K (and past M, N); its stores drop rows past M
        # The epilogue recomputes its tile from a second counter, as Triton's persistent-matmul tutorial
        # does to keep the pipeliner of the flattened loop from carrying one value from the loads to the
        # epilogue. Flattening lets the next tile's loads start during this tile's epilogue.
        tile_id_c = tl.program_id(0) - NUM_PROGRAMS
        for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
            pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            for ki in range(k_tiles):
                a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
                wt = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
                acc = tl.dot(a, wt.T, acc, out_dtype=tl.int32)

            tile_id_c += NUM_PROGRAMS
            pid_m, pid_n = _tile_coords(tile_id_c, num_pid_m, num_pid_n, GROUP_M)
            rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
            cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
            y = acc.to(tl.float32) * tl.load(w_scale_ptr + cols // rows_per_scale)[None, :]
            y = _scale_rows_add_bias(y, rows, cols, a_scale_ptr, bias_ptr, HAS_BIAS)
            if SUBTILE:
                # Two column halves, stored one after the other: half the epilogue's shared-memory
                # staging buffer, which leaves room for another pipeline stage or a second CTA per SM.
                y0, y1 = tl.split(tl.permute(tl.reshape(y, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], y0.to(c_desc.dtype))
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2], y1.to(c_desc.dtype))
            else:
                c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], y.to(c_desc.dtype))


# ----------------------------------------------------------------------------------------------------
# Launch, autotuning and the op kernels
# ----------------------------------------------------------------------------------------------------

_TUNED: dict[tuple, GemmConfig] = {}


@functools.cache
def _num_sms(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_tma(a: Tensor, s_x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, out: Tensor,
                p: _Problem, cfg: GemmConfig) -> None:
    # Host-side descriptors: plain Python objects, encoded into the launch's parameters (no device
    # allocation, so they are safe inside CUDA-graph capture).
    a_desc = TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k])
    w_desc = TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k])
    c_desc = TensorDescriptor.from_tensor(out, [cfg.block_m, cfg.block_n // 2 if cfg.subtile else cfg.block_n])
    num_programs = cfg.ctas_per_sm * _num_sms(a.device.index)
    grid = (min(num_programs, triton.cdiv(p.m, cfg.block_m) * triton.cdiv(p.n, cfg.block_n)),)
    _int_linear_tma_kernel[grid](
        a_desc, w_desc, c_desc, s_x, w_scale, out if bias is None else bias,
        p.m, p.n, p.k, p.n // p.g_out,
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, SUBTILE=cfg.subtile, NUM_PROGRAMS=num_programs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _launch(a: Tensor, s_x: Tensor, w: Tensor, w_scale: Tensor, w_min: Tensor | None, bias: Tensor | None,
            out: Tensor, p: _Problem, int4: bool, cfg: GemmConfig) -> None:
    if cfg.kernel == "tma_persistent":
        _launch_tma(a, s_x, w, w_scale, bias, out, p, cfg)
        return
    grid = (triton.cdiv(p.m, cfg.block_m) * triton.cdiv(p.n, cfg.block_n),)
    _int_linear_kernel[grid](
        a, s_x, w, w_scale, w_scale if w_min is None else w_min, out if bias is None else bias, out,
        p.m, p.n, p.k, p.n // p.g_out, p.g_in, p.k // p.g_in, a.stride(0), w.stride(0), out.stride(0),
        ASYM=w_min is not None, **tile_launch_args(p, int4, bias is not None, cfg),
    )


def tile_launch_args(p: _Problem, int4: bool, has_bias: bool, cfg: GemmConfig) -> dict:
    """The constexprs and launch options of ``_int_linear_tile`` that every kernel built on it passes alike
    (``_int_linear_kernel``, triton_outlier's kernel), from the problem and a tiled config."""
    grouped = p.g_in > 1
    return dict(
        INT4=int4, GROUPED=grouped, TILES_PER_GROUP=(p.k // p.g_in) // cfg.block_k if grouped else 1,
        SMALL_GROUPS=grouped and small_group_sums(p.k // p.g_in, int4), HAS_BIAS=has_bias,
        EVEN_K=p.k % cfg.block_k == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def tuning_key(m: int, n: int, k: int, group_width: int | None, int4: bool, tma: bool, has_bias: bool,
               out_dtype: torch.dtype, device_index: int | None) -> tuple:
    """The autotuner's cache key of a GEMM call (``_TUNED[key]`` is its chosen config once tuned)."""
    return (m_bucket(m), n, k, group_width, int4, tma, has_bias, out_dtype, device_index)


def _pick_config(key: tuple, candidates: list[GemmConfig], run: Callable[[GemmConfig], None],
                 device_index: int | None = None,
                 cycled_runs: Callable[[], Sequence[Callable[[GemmConfig], None]]] | None = None) -> GemmConfig:
    """The fastest candidate for ``key``, timed once and cached; the first candidate when tuning is off.

    Never tunes during CUDA-graph capture (timing synchronizes the device): a shape first seen inside a
    capture gets the default config, uncached, so a later eager call can still tune it. Candidates are timed
    as CUDA-graph replays, the way zqcompile runs them: timed eagerly, the host cost of each launch (about
    0.1 ms more for the TMA kernel's descriptors) hides the device time of all but the largest GEMMs; the
    candidates are compiled concurrently first (autotune.py).
    Results persist in the on-disk tuning cache of ``device_index``'s GPU (tuning_cache.py): a key found
    there, chosen from the same candidates, is not timed again. ``cycled_runs``: for the decode-size kernels bound
    by reading a weight that fits in the L2, runs on copies of the weight that the timed launches cycle through
    (``autotune.time_candidates``), so that each reads its weight from HBM as in a model, where each layer's weights
    evict the last one's; made only when the key is actually timed.
    """
    if key in _TUNED:
        return _TUNED[key]
    if torch.cuda.is_current_stream_capturing():
        return candidates[0]
    if not AUTOTUNE or len(candidates) == 1:
        _TUNED[key] = candidates[0]
        return candidates[0]
    disk = tuning_cache.for_device(device_index) if device_index is not None else None
    stored = _stored_config(disk, key, candidates) if disk is not None else None
    if stored is not None:
        tuning_cache.STATS.loaded += 1
        _TUNED[key] = stored
        return stored
    start = time.perf_counter()
    timings = _time_candidates(candidates, run, cycled_runs)
    tuning_cache.STATS.seconds += time.perf_counter() - start
    if not timings:
        raise ZQError(f"no Triton GEMM config fits this GPU for shape key {key}; set ZQ_TRITON_AUTOTUNE=0 "
                      "or use the torch._int_mm fallback (int_mm_linear)")
    best = _TUNED[key] = min(timings, key=timings.get)
    tuning_cache.STATS.tuned += 1
    if disk is not None:
        disk.put(repr(key), tuning_cache.fingerprint(candidates), asdict(best))
    return best


def _time_candidates(candidates: list[GemmConfig], run: Callable[[GemmConfig], None],
                     cycled_runs: Callable[[], Sequence[Callable[[GemmConfig], None]]] | None = None
                     ) -> dict[GemmConfig, float]:
    return autotune.time_candidates(candidates, run, cycled_runs)  # compiled concurrently, then timed


def _stored_config(disk: tuning_cache.TuningCache, key: tuple, candidates: list[GemmConfig]) -> GemmConfig | None:
    """The disk cache's config for ``key`` if it is one of ``candidates``; a malformed entry is ignored, with a
    warning, and re-tuned."""
    fields = disk.get(repr(key), tuning_cache.fingerprint(candidates))
    if fields is None:
        return None
    try:
        config = type(candidates[0])(**fields)  # GemmConfig, or triton_small_m's StreamConfig
    except TypeError:
        config = None
    if config not in candidates:
        warnings.warn(f"ignoring the tuning cache entry {fields} for {key} in {disk.path}: not one of this shape's "
                      "candidate configs; re-tuning it", stacklevel=4)
        return None
    return config


def triton_int_linear(x_q: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                      out_dtype: torch.dtype, *, int4: bool, config: GemmConfig | None = None,
                      w_min: Tensor | None = None) -> Tensor:
    """int8_linear (``int4=False``) or int4_linear (``int4=True``) through the Triton kernel.

    ``config`` forces one tile config (tests use it to check every candidate); by default the config is
    autotuned per shape key, among the persistent TMA kernel's and the tiled kernel's configs where
    ``tma_kernel_applies``. Falls back to ``int_mm_linear`` where no Triton config applies (an
    input-dim group width that is not a multiple of 32). ``w_min``: an asymmetric INT4 weight's group mins.
    """
    p = check_linear_args(x_q, x_scale, w, w_scale, bias, int4, w_min)
    _require_cuda("the Triton INT8 GEMM", x_q, x_scale, w, w_scale, *([bias] if bias is not None else []))
    _require_triton()
    group_width = p.k // p.g_in if p.g_in > 1 else None
    out = torch.empty((*x_q.shape[:-1], p.n), dtype=out_dtype, device=x_q.device)
    if p.m == 0 or p.n == 0:
        return out
    a = x_q.reshape(p.m, p.k)
    a = a if a.stride(1) == 1 else a.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    out2d = out.view(p.m, p.n)
    tma = tma_kernel_applies(a, w, out2d, int4=int4, g_in=p.g_in)
    if config is not None and config.kernel == "tma_persistent" and not tma:
        raise ZQError(f"{config} needs the TMA kernel's conditions (INT8 weights with G_in=1, an sm_90 GPU, "
                      "16-byte aligned operands and row pitches); use a tiled config")
    candidates = candidate_configs(p.m, p.k, group_width, tma=tma) if config is None else [config]
    if not candidates:
        return int_mm_linear(x_q, x_scale, w, w_scale, bias, out_dtype, int4=int4, w_min=w_min)
    s_x = x_scale.reshape(p.m).float().contiguous()
    w_scale = w_scale.float().contiguous()
    w_min = w_min.float().contiguous() if w_min is not None else None
    bias = bias.contiguous() if bias is not None else None

    def run(cfg: GemmConfig) -> None:
        _launch(a, s_x, w, w_scale, w_min, bias, out2d, p, int4, cfg)

    # A forced config bypasses the tuner's cache, so it does not become the shape's tuned choice. Asymmetric
    # weights run the same configs as symmetric ones (the tile loop is the same), so they share the key.
    key = tuning_key(p.m, p.n, p.k, group_width, int4, tma, bias is not None, out_dtype, x_q.device.index)
    run(config if config is not None else _pick_config(key, candidates, run, x_q.device.index))
    return out


# ----------------------------------------------------------------------------------------------------
# torch._int_mm fallback
# ----------------------------------------------------------------------------------------------------

def int_mm_linear(x_q: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                  out_dtype: torch.dtype, *, int4: bool, w_min: Tensor | None = None) -> Tensor:
    """The op through cuBLASLt's INT8 GEMM (``torch._int_mm``) and a separate float32 dequant.

    ``torch._int_mm`` needs more than 16 rows and K, N multiples of 8: rows are zero-padded to 32;
    other shapes and asymmetric INT4 weights use the reference implementation.
    """
    p = check_linear_args(x_q, x_scale, w, w_scale, bias, int4, w_min)
    _require_cuda("torch._int_mm", x_q)
    w8 = unpack_weight(w, w_scale, w_min)
    width = p.k // p.g_in
    if p.m == 0 or p.n % 8 or width % 8 or w_min is not None:
        y = ops._int_linear_reference(x_q, x_scale, w8, w_scale, bias, out_dtype, w_min)
    else:
        a = x_q.reshape(p.m, p.k)
        if p.m <= 16:
            a = torch.cat([a, a.new_zeros(32 - p.m, p.k)])
        col_scale = expand_weight_scale(w_scale, p.n, p.g_in).float()  # [N, G_in]
        acc = None
        for g in range(p.g_in):
            cols = slice(g * width, (g + 1) * width)
            part = torch._int_mm(a[:, cols].contiguous(), w8[:, cols].contiguous().t())[: p.m].float()
            part *= col_scale[:, g]
            acc = part if acc is None else acc + part
        acc *= x_scale.reshape(p.m, 1)
        if bias is not None:
            acc += bias.float()
        y = acc.to(out_dtype).reshape(*x_q.shape[:-1], p.n)
    return y


# ----------------------------------------------------------------------------------------------------
# Registration as the ops' CUDA kernels
# ----------------------------------------------------------------------------------------------------

_REGISTERED_BACKEND: str | None = None


def _triton_supported() -> bool:
    return triton is not None and torch.cuda.get_device_capability() >= (8, 0)


def _int8_linear_cuda(x_q, x_scale, w, w_scale, bias, out_dtype):
    return triton_int_linear(x_q, x_scale, w, w_scale, bias, out_dtype, int4=False)


def _int4_linear_cuda(x_q, x_scale, w_packed, w_scale, bias, out_dtype, w_min=None):
    return triton_int_linear(x_q, x_scale, w_packed, w_scale, bias, out_dtype, int4=True, w_min=w_min)


def _int8_linear_int_mm(x_q, x_scale, w, w_scale, bias, out_dtype):
    return int_mm_linear(x_q, x_scale, w, w_scale, bias, out_dtype, int4=False)


def _int4_linear_int_mm(x_q, x_scale, w_packed, w_scale, bias, out_dtype, w_min=None):
    return int_mm_linear(x_q, x_scale, w_packed, w_scale, bias, out_dtype, int4=True, w_min=w_min)


def register_cuda_kernels() -> str:
    """Make ``zq::int8_linear`` / ``int4_linear`` run these kernels on CUDA tensors; idempotent.

    (``triton_small_m.register_cuda_kernels`` then puts its decode-size kernels in front of these.)
    Returns the backend in use: ``"triton"``, or ``"int_mm"`` (with a warning) when Triton is missing
    or the GPU predates INT8 ``tl.dot`` (sm_80). Raises ZQError when there is no CUDA GPU.
    """
    global _REGISTERED_BACKEND
    if _REGISTERED_BACKEND is not None:
        return _REGISTERED_BACKEND
    _require_cuda("register_cuda_kernels()")
    if _triton_supported():
        backend, kernels = "triton", (_int8_linear_cuda, _int4_linear_cuda)
    else:
        warnings.warn(f"Triton INT8 GEMMs unavailable ({_TRITON_ERROR or 'GPU older than sm_80'}); "
                      "zq int8/int4 linears use torch._int_mm with a separate dequant", stacklevel=2)
        backend, kernels = "int_mm", (_int8_linear_int_mm, _int4_linear_int_mm)
    for op, kernel in zip((ops.int8_linear, ops.int4_linear), kernels):
        op.register_kernel("cuda")(kernel)
    _REGISTERED_BACKEND = backend
    return backend


__all__ = [
    "AUTOTUNE", "GemmConfig", "candidate_configs", "check_linear_args", "int_mm_linear",
    "m_bucket", "register_cuda_kernels", "small_group_sums", "tma_kernel_applies", "tma_operands_ok", "triton_int_linear", "tuning_key",
]
