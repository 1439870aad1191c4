"""Weight-streaming Triton GEMMs for few tokens (M <= 64): ``zq::int8_linear``, ``int4_linear`` (W8A8, W4A8) and
``zq::weight_only_linear`` (W8A16, W4A16), and the CUDA kernels of these ops, which dispatch by M.

At decode sizes a GEMM costs the time it takes to read its weight once: ``N*K`` bytes (INT8) or ``N*K/2`` bytes
plus the group scales (INT4) against at most ``64*K`` of activations. ``_stream_kernel`` is built for that:

* One program per ``BLOCK_N`` weight rows and one K range (split-K): ``N / BLOCK_N`` column tiles alone do not
  fill 132 SMs with enough bytes in flight, so K is split until the grid is a few waves. Each split stores its
  partial tile in a workspace; the last split to arrive (a per-tile ticket counter) sums the partials in split
  order, resets its counter for the next call (no memset, CUDA-graph replays stay valid) and runs the
  epilogue. Plain stores, not atomic adds: at M = 16 the atomics cost more than the weight reads. W8A8 without
  input-dim groups sums INT32 partials, so the sum is exact; float partials are summed in a fixed order.
* All M rows sit in one ``BLOCK_M`` (16, 32 or 64) tile, multiplied on the tensor cores: at M = 1 the 16-row
  MMA wastes arithmetic, which is free here, and it keeps the weight tile's load layout the same at every M.
* INT4 weights (``uint8 [N, K/2]``, quant.pack_int4: byte j of an input group holds value j in its low and
  value j + G/2 in its high nibble, unsigned): one AND and one shift per four bytes give two nibble tiles that
  multiply two contiguous activation loads (the group's halves), two MMAs of K = G/2 on the nibbles as they
  are (0..15; halves narrower than 32 are joined into one MMA). The offset is corrected once per group from
  ``asum``, the sum of the group's activations (computed from the tiles already loaded): ``acc - 8 asum``
  (symmetric, exact INT32) or ``s_w acc + min asum`` (asymmetric). W4A16 symmetric widens ``nibble - 8``
  directly (exact in fp16) and needs no correction.
* Input-dim groups (``G_in > 1``, the w4a8 / w4a16 presets' groups of 64, the asymmetric ones' 32): each K tile
  holds ``SUBS`` whole groups; each group's exact INT32 (W?A8) or float32 (W?A16) partial product is scaled
  by its group scale (and its min times ``asum`` added) into a float32 accumulator: the reference's
  arithmetic, ``sum_g (x @ w_g.T) * s_w[:, g] (+ asum_g * min[:, g])``. Without groups the INT32 accumulator
  is corrected before the split-K partials are stored (asymmetric: scaled to float32 there, so with split-K
  the float sum of the splits rounds in another order than the reference's single sum).
* Weight-only: fp16 activations times weights widened to fp16 in registers (exact for |q| <= 127, by the
  ``0x6400`` exponent trick, four bytes at a time in PTX: two byte permutes, then one OR and one half2 subtract
  per two values, instead of a quarter-rate integer-to-float convert; ``_fp16_from_bytes``), fp32
  accumulation, the weight scale applied to the accumulator. The reference rounds ``q * s`` to fp16 before its
  GEMM; scaling after the sum is the same product without that rounding, so the two agree to fp16 rounding.

``_gemv_kernel`` is the other candidate for M <= ``GEMV_MAX_M`` (8), where the MMA's 16-row tile is mostly padding:
no tensor cores, the same split-K and epilogue (``_finish``). Each step loads a [BLOCK_N, SUBS groups, U] tile of the
weight as 16-byte vectors, unpacks it once in registers and multiplies it with each activation row in turn. INT8
activations: 32-bit words of four values against words of four int8 weights or eight nibbles (``w & 0x0F0F0F0F``,
``(w >> 4) & 0x0F0F0F0F``: the half-split layout puts a word's low nibbles against one activation word and its high
nibbles against the word G/2 values on), one ``dp4a`` per four multiply-adds, exact in INT32 per group; then the
group scale (and min) on the [BLOCK_N, SUBS] group sums. fp16 / bf16 activations: float32 products with the weights
widened to fp16 as the MMA kernel widens them, then to float32 (exact). The autotuner times it against the MMA configs.

Larger M keeps the prefill kernels: the tiled / TMA kernels of ``triton_gemm`` for W8A8/W4A8, and for
weight-only the reference (dequantize, then cuBLAS) - prefill is bound by the tensor cores, not the weight.
Configs are autotuned per (M bucket, N, K, variant) with ``triton_gemm``'s tuner.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from zqcompile import ops
from zqcompile.backends import triton_gemm
from zqcompile.backends.triton_gemm import (_Problem, _pick_config, _require_cuda, _require_triton, check_linear_args,
                                             small_group_sums)
from zqcompile.errors import ZQError

triton = triton_gemm.triton
if triton is not None:
    import triton.language as tl

    from zqcompile.backends.triton_gemm import (_exact_f32, _half_split_dot, _int4_group_scaled, _load_half_split,
                                                 _nibbles)

MAX_M = 64
"""The largest token count that the weight-streaming kernel serves; larger M goes to the prefill kernels."""
GEMV_MAX_M = 8
"""The largest token count for which ``_gemv_kernel`` is a candidate: it spends its own multiply-adds on every
weight value for each row, so beyond a few rows the tensor cores of ``_stream_kernel`` win."""


@dataclass(frozen=True)
class StreamConfig:
    """Tile shape and launch parameters of ``_stream_kernel``.

    ``block_k`` is the K width of one main-loop step (in weight values, not bytes); with input-dim groups it
    is a whole number of groups. ``waves`` sets split-K: K is split until ``N / block_n`` column tiles times
    the splits reach ``waves`` programs per SM (never below two K tiles per split for ``"mma"``, one for
    ``"gemv"``). ``kernel``: ``"mma"`` (``_stream_kernel``, tensor cores) or ``"gemv"`` (``_gemv_kernel``, M <=
    ``GEMV_MAX_M``).
    """

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    waves: int
    kernel: str = "mma"


# The first is the untuned default. 128-256 B of weight per row per K step are 16-byte loads for every
# thread; narrow column tiles and more waves keep more bytes in flight per SM at small M; wide tiles reread
# the activations less at M = 64.
_CONFIGS = (
    StreamConfig(64, 256, 4, 4, 2), StreamConfig(64, 256, 4, 4, 4), StreamConfig(128, 256, 4, 3, 1),
    StreamConfig(32, 512, 4, 3, 2), StreamConfig(64, 512, 4, 3, 1), StreamConfig(128, 128, 4, 4, 2),
    StreamConfig(256, 256, 8, 3, 1), StreamConfig(32, 256, 4, 5, 1),
)
# INT4 variants: a K step of 256 values is only 128 B of INT4 weight per row, so these read 256-512 B per row per
# step (more bytes in flight per load), with one split-K wave (2) or more (4) and a wide tile with 8 warps.
_INT4_CONFIGS = (
    StreamConfig(64, 512, 4, 4, 2), StreamConfig(64, 1024, 4, 3, 4), StreamConfig(128, 512, 8, 3, 2),
)
# GEMV variants (the first few rows: no tensor cores): 16-byte weight loads for every thread, 256-1024 B of
# weight per row per step, and enough programs (waves per SM) that a split's whole weight is in flight at once.
_GEMV_CONFIGS = (
    StreamConfig(32, 512, 4, 2, 4, "gemv"), StreamConfig(16, 512, 4, 3, 8, "gemv"),
    StreamConfig(16, 512, 4, 2, 2, "gemv"), StreamConfig(32, 1024, 8, 2, 2, "gemv"),
)
# fp16 / bf16 activations: the weight tile is widened to float32 in registers (4-8x its bytes), so a quarter of the K
# step keeps it within about 64 registers per thread.
_GEMV16_CONFIGS = (
    StreamConfig(32, 128, 4, 2, 4, "gemv"), StreamConfig(64, 64, 4, 2, 4, "gemv"),
    StreamConfig(16, 256, 4, 2, 4, "gemv"), StreamConfig(32, 256, 8, 2, 2, "gemv"),
)
# The MMA configs that stay candidates where the GEMV's are (fewer configs to time at the small M buckets): the
# default and the ones fastest at M = 1 on the H200 (INT8 and INT4 weights, 2026-12-01; the wide sweep of
# BENCHMARKS.md's decode-size GEMM section also chose the GEMV configs above).
_GEMV_SIZE_MMA_CONFIGS = (_CONFIGS[0], StreamConfig(128, 128, 4, 4, 2), StreamConfig(32, 256, 4, 5, 1))


def block_m_for(m: int) -> int:
    """The row tile holding all M (<= 64) tokens: 16, 32 or 64 (the INT8/FP16 MMAs need at least 16 rows)."""
    return max(16, 1 << max(m - 1, 0).bit_length())


def gemv_block_m(m: int) -> int:
    """The GEMV kernel's row block: M's next power of two (1, 2, 4 or 8); rows past M read zeros."""
    return 1 << max(m - 1, 0).bit_length()


def split_k_for(n: int, k: int, block_n: int, block_k: int, waves: int, num_sms: int, min_tiles: int = 2) -> int:
    """K splits so the grid has about ``waves * num_sms`` programs, each with at least ``min_tiles`` K tiles."""
    tiles = -(-n // block_n)
    k_tiles = -(-k // block_k)
    return max(1, min(-(-waves * num_sms // tiles), k_tiles // min_tiles))


def group_width_for(p: _Problem) -> int | None:
    """K per input-dim group (None without input-dim groups)."""
    return p.k // p.g_in if p.g_in > 1 else None


def stream_kernel_applies(p: _Problem, int8_acts: bool, act_dtype: torch.dtype | None = None) -> bool:
    """Whether ``_stream_kernel`` covers this problem: M <= 64, an even K (for INT4 weights, checked by the
    caller's argument checks), groups of a power-of-two width >= 32 (one MMA's K; INT4 halves of 16 are joined
    back into one MMA), fp16 / bf16 activations for weight-only."""
    if not 0 < p.m <= MAX_M or p.n == 0:
        return False
    if not int8_acts and act_dtype not in (torch.float16, torch.bfloat16):
        return False
    width = group_width_for(p)
    return width is None or (width & (width - 1) == 0 and width >= 32)


def gemv_kernel_applies(a: Tensor, w: Tensor, p: _Problem, int4: bool) -> bool:
    """Whether ``_gemv_kernel`` can run this problem (on top of ``stream_kernel_applies``): M <= ``GEMV_MAX_M``;
    INT8 activations are read as 32-bit words of four values, so K must be a multiple of 8 (INT4) or 4 (INT8) and
    both operands' base addresses and row pitches multiples of 4 bytes."""
    if not 0 < p.m <= GEMV_MAX_M:
        return False
    if a.dtype != torch.int8:
        return True
    return p.k % (8 if int4 else 4) == 0 and all(t.data_ptr() % 4 == 0 and t.stride(0) % 4 == 0 for t in (a, w))


def candidate_configs(p: _Problem, int4: bool = False, gemv: bool = False, int8_acts: bool = True
                      ) -> list[StreamConfig]:
    """The configs for this problem (INT4 weights: also ``_INT4_CONFIGS``; ``gemv``, see ``gemv_kernel_applies``:
    also ``_GEMV_CONFIGS``, or ``_GEMV16_CONFIGS`` for fp16 / bf16 activations), with ``block_k`` fitted to the group width (a whole number of groups) and, without
    groups, to K (no longer than K's next power of two). The first is the untuned default. Where the GEMV kernel
    applies only ``_GEMV_SIZE_MMA_CONFIGS`` of the MMA kernel's stay: each candidate costs tuning time at every
    M bucket up to ``GEMV_MAX_M``."""
    width = group_width_for(p)
    fitted: list[StreamConfig] = []
    mma = _GEMV_SIZE_MMA_CONFIGS if gemv else _CONFIGS + (_INT4_CONFIGS if int4 else ())
    for cfg in mma + ((_GEMV_CONFIGS if int8_acts else _GEMV16_CONFIGS) if gemv else ()):
        block_k = min(cfg.block_k, max(64, 1 << (p.k - 1).bit_length()))
        if width is not None:
            block_k = max(block_k, width) if width >= block_k else block_k - block_k % width
        cfg = replace(cfg, block_k=block_k)
        if cfg not in fitted:
            fitted.append(cfg)
    return fitted


# ----------------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------------

def _fp16_from_bytes_asm(flip: int, bias: int) -> str:
    """PTX for four bytes (one 32-bit register, ``$2``) -> four halves ``(byte ^ flip) + 1024 - (1024 + bias)`` (two
    half2 registers ``$0``, ``$1``): two byte permutes put the bytes in the low halves of the half2 lanes, an OR makes
    them the halves 1024 + byte, a half2 subtract (of 1024 + bias, 0x6400 + bias in both lanes) the result. The input
    is copied first: an output may share its register."""
    sub = (0x6400 + bias) * 0x10001
    return ("{ .reg .b32 t, z, c; mov.b32 z, 0; "
            f"mov.b32 c, {sub:#x}; xor.b32 t, $2, {flip:#x}; prmt.b32 $0, t, z, 0x4140; prmt.b32 $1, t, z, 0x4342; "
            "or.b32 $0, $0, 0x64006400; or.b32 $1, $1, 0x64006400; sub.f16x2 $0, $0, c; sub.f16x2 $1, $1, c; }")


if triton is not None:
    _FP16_FROM_INT8 = tl.constexpr(_fp16_from_bytes_asm(0x80808080, 128))
    _FP16_FROM_NIBBLE_8 = tl.constexpr(_fp16_from_bytes_asm(0, 8))
    _FP16_FROM_NIBBLE_0 = tl.constexpr(_fp16_from_bytes_asm(0, 0))

if triton is not None:
    # PTX helpers, with plain-Triton stand-ins for the interpreter (which runs no PTX)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        @triton.jit
        def _dp4a(a, b, c, B_SIGNED: tl.constexpr):
            for i in tl.static_range(4):
                if B_SIGNED:
                    b_i = (b << (24 - 8 * i)) >> 24
                else:
                    b_i = (b >> (8 * i)) & 0xFF
                c += ((a << (24 - 8 * i)) >> 24) * b_i
            return c

        @triton.jit
        def _fp16_from_bytes(b, BIAS: tl.constexpr):
            u = b.to(tl.uint8, bitcast=True)
            if BIAS == 128:
                u = u ^ 0x80
            return (u.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + BIAS)
    else:
        @triton.jit
        def _dp4a(a, b, c, B_SIGNED: tl.constexpr):
            """c + the four products of the signed bytes of ``a`` (int32 words) with the bytes of ``b`` (signed, or
            unsigned: INT4 nibbles), exact in int32: one instruction for four multiply-adds."""
            if B_SIGNED:
                d = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                              is_pure=True, pack=1)
            else:
                d = tl.inline_asm_elementwise("dp4a.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                              is_pure=True, pack=1)
            return d

        @triton.jit
        def _fp16_from_bytes(b, BIAS: tl.constexpr):
            """int8 weights (``BIAS`` 128) or INT4 nibbles (int8 in [0, 15], ``BIAS`` 8 or 0) -> float16 value - BIAS,
            exactly: 0x6400 | u is the half 1024 + u (u = the byte, its sign bit flipped for int8). Four bytes per
            32-bit register (``pack=4``), see ``_fp16_from_bytes_asm``."""
            if BIAS == 128:
                y = tl.inline_asm_elementwise(_FP16_FROM_INT8, "=r,=r,r", [b], dtype=tl.float16, is_pure=True, pack=4)
            elif BIAS == 8:
                y = tl.inline_asm_elementwise(_FP16_FROM_NIBBLE_8, "=r,=r,r", [b], dtype=tl.float16, is_pure=True,
                                              pack=4)
            else:
                y = tl.inline_asm_elementwise(_FP16_FROM_NIBBLE_0, "=r,=r,r", [b], dtype=tl.float16, is_pure=True,
                                              pack=4)
            return y

    @triton.jit
    def _widen(q, a):
        """Weight values (int8) in the MMA input type of the activations ``a``."""
        if a.dtype == tl.int8:
            return q
        elif a.dtype == tl.float16:
            return _fp16_from_bytes(q, 128)
        else:
            return q.to(a.dtype)

    @triton.jit
    def _widen_nibbles(c, a, OFFSET: tl.constexpr):
        """INT4 nibbles (int8 in [0, 15]) in the MMA input type of the activations ``a``: as they are for INT8
        activations (the group epilogue corrects the offset), ``c - OFFSET`` otherwise (exact in fp16 / bf16)."""
        if a.dtype == tl.int8:
            return c
        elif a.dtype == tl.float16:
            return _fp16_from_bytes(c, OFFSET)
        else:
            return c.to(a.dtype) - OFFSET

    @triton.jit
    def _sub_tile_product(acc, asum, a_row_ptrs, a_rows_ok, w_ptrs, k, K, group, offs_k, offs_wk, INT4: tl.constexpr,
                          EVEN_K: tl.constexpr, OFFSET: tl.constexpr, NEED_ASUM: tl.constexpr):
        """(acc + a[:, k:k+SK] @ w[:, k:k+SK].T, asum + the activations' row sums) for one sub-tile of SK values.

        INT4 (``w_ptrs`` on packed bytes, triton_gemm._load_half_split): bytes [k/2, k/2 + SK/2) of the half-split
        layout, two contiguous activation runs, the nibbles widened as they are (or minus ``OFFSET``).
        """
        if INT4:
            a_lo, a_hi, w_lo, w_hi = _load_half_split(a_row_ptrs, a_rows_ok, w_ptrs, k // 2, group // 2, group,
                                                      K // 2, offs_wk, EVEN_K)
            acc = _half_split_dot(acc, a_lo, a_hi, _widen_nibbles(w_lo, a_lo, OFFSET),
                                  _widen_nibbles(w_hi, a_hi, OFFSET))
            if NEED_ASUM:
                asum += tl.sum(a_lo.to(asum.dtype), 1) + tl.sum(a_hi.to(asum.dtype), 1)
        else:  # (no return inside a static if: Triton 3.6 compiles the code after it, see _half_split_dot)
            if EVEN_K:
                a = tl.load(a_row_ptrs + (k + offs_k)[None, :], mask=a_rows_ok, other=0)
                w = tl.load(w_ptrs + k)
            else:
                a = tl.load(a_row_ptrs + (k + offs_k)[None, :], mask=a_rows_ok & ((k + offs_k)[None, :] < K),
                            other=0)
                w = tl.load(w_ptrs + k, mask=(k + offs_wk)[None, :] < K, other=0)
            acc = tl.dot(a, tl.trans(_widen(w, a)), acc, out_dtype=acc.dtype)
        return acc, asum

    @triton.jit
    def _stream_kernel(
        a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, w_min_ptr, bias_ptr, c_ptr, ws_ptr, ticket_ptr,
        M, N, K, rows_per_scale, g_in, group, stride_am, stride_wn, stride_cm, k_per_split,
        INT4: tl.constexpr, ASYM: tl.constexpr, OFFSET: tl.constexpr, NEED_ASUM: tl.constexpr,
        SUB_K: tl.constexpr, SUBS: tl.constexpr, GROUPED: tl.constexpr, SMALL_GROUPS: tl.constexpr,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        k_start = tl.program_id(1) * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = offs_n % N  # columns past N wrap onto valid ones: unmasked weight loads
        a_rows_ok = offs_m[:, None] < M  # activation rows past M load no bytes
        offs_k = tl.arange(0, SUB_K)
        offs_wk = tl.arange(0, SUB_K // 2 if INT4 else SUB_K)  # weight bytes per row of a sub-tile
        a_row_ptrs = a_ptr + offs_m[:, None] * stride_am
        w_ptrs = w_ptr + cols[:, None] * stride_wn + offs_wk[None, :]
        s_ptrs = w_scale_ptr + (cols // rows_per_scale) * g_in
        min_ptrs = w_min_ptr + (cols // rows_per_scale) * g_in
        INT_ACC: tl.constexpr = a_ptr.dtype.element_ty == tl.int8
        ACC_DTYPE: tl.constexpr = tl.int32 if INT_ACC else tl.float32
        # Without groups the accumulator is the MMA's own (exact INT32 for W8A8); with groups it is float32.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if GROUPED else ACC_DTYPE)
        asum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
        for k0 in range(k_start, k_end, SUB_K * SUBS):
            for s in tl.static_range(SUBS):
                k = k0 + s * SUB_K
                if GROUPED:
                    part, part_sum = _sub_tile_product(
                        tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE), tl.zeros((BLOCK_M,), dtype=ACC_DTYPE),
                        a_row_ptrs, a_rows_ok, w_ptrs, k, K, group, offs_k, offs_wk, INT4, EVEN_K, OFFSET, NEED_ASUM)
                    # SUB_K is the group width; a group past K (ragged last tile) has a zero product
                    g = tl.minimum(k // SUB_K, g_in - 1)
                    s_w = tl.load(s_ptrs + g)
                    if NEED_ASUM:
                        acc = _int4_group_scaled(acc, part, part_sum, s_w, min_ptrs + g, ASYM, SMALL_GROUPS)
                    else:
                        acc += _exact_f32(part, SMALL_GROUPS) * s_w[None, :]
                else:
                    acc, asum = _sub_tile_product(acc, asum, a_row_ptrs, a_rows_ok, w_ptrs, k, K, K, offs_k, offs_wk,
                                                  INT4, EVEN_K, OFFSET, NEED_ASUM)
        if NEED_ASUM and not GROUPED:
            # INT4 without groups: the offset corrected before split-K stores the partial (exact INT32 when
            # symmetric; asymmetric: scaled to float32 here, the epilogue then skips the weight scale)
            if ASYM:
                acc = _int4_group_scaled(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), acc, asum, tl.load(s_ptrs),
                                         min_ptrs, True)
            else:
                acc = acc - 8 * asum[:, None]

        _finish(acc, pid_n, offs_m, offs_n, M, N, a_scale_ptr, s_ptrs, bias_ptr, c_ptr, ws_ptr, ticket_ptr, stride_cm,
                INT_ACC, GROUPED or ASYM, HAS_BIAS, SPLIT)

    @triton.jit
    def _finish(acc, pid_n, offs_m, offs_n, M, N, a_scale_ptr, s_ptrs, bias_ptr, c_ptr, ws_ptr, ticket_ptr, stride_cm,
                INT_ACTS: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
        """The output tile [BLOCK_M, BLOCK_N] from this program's partial ``acc`` over its K range (both kernels).

        Without split-K: the epilogue. With split-K, each split stores its partial tile in its own workspace slice;
        the last split of the tile to arrive (ticket == splits - 1) sums the slices in split order (a deterministic
        float sum), resets the ticket for the next launch and runs the epilogue. The barrier puts every thread's
        stores before the release of the ticket.
        """
        rows = offs_m % M  # rows / cols past M / N wrap onto valid ones for the epilogue's loads
        cols = offs_n % N
        out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if SPLIT:
            splits = tl.num_programs(1)
            ws_tile = ws_ptr.to(tl.pointer_type(acc.dtype)) + offs_m[:, None] * N + offs_n[None, :]
            tl.store(ws_tile + tl.program_id(1) * M * N, acc, mask=out_mask)
            tl.debug_barrier()
            ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel")
            if ticket == splits - 1:
                total = tl.zeros(acc.shape, dtype=acc.dtype)
                for j in range(0, splits):
                    total += tl.load(ws_tile + j * M * N, mask=out_mask, other=0, cache_modifier=".cg")
                tl.atomic_xchg(ticket_ptr + pid_n, 0, sem="relaxed")
                _epilogue(total, rows, cols, offs_m, offs_n, out_mask, a_scale_ptr, s_ptrs, bias_ptr, c_ptr,
                          stride_cm, INT_ACTS, SCALED, HAS_BIAS)
        else:
            _epilogue(acc, rows, cols, offs_m, offs_n, out_mask, a_scale_ptr, s_ptrs, bias_ptr, c_ptr, stride_cm,
                      INT_ACTS, SCALED, HAS_BIAS)

    @triton.jit
    def _epilogue(acc, rows, cols, offs_m, offs_n, out_mask, a_scale_ptr, s_ptrs, bias_ptr, c_ptr, stride_cm,
                  INT_ACTS: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr):
        """y = acc (* s_w[col] unless already SCALED) (* s_x[row] for INT8 activations) (+ bias[col]), in float32."""
        y = acc.to(tl.float32)
        if not SCALED:
            y = y * tl.load(s_ptrs)[None, :]
        if INT_ACTS:
            y = y * tl.load(a_scale_ptr + rows)[:, None]
        if HAS_BIAS:
            y += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], y.to(c_ptr.dtype.element_ty), mask=out_mask)


if triton is not None:
    @triton.jit
    def _gemv_kernel(
        a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, w_min_ptr, bias_ptr, c_ptr, ws_ptr, ticket_ptr,
        M, N, units, half_units, rows_per_scale, g_in, stride_am, stride_wn, stride_cm, units_per_split,
        INT4: tl.constexpr, ASYM: tl.constexpr, GROUPED: tl.constexpr, SMALL_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
        EVEN: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUBS: tl.constexpr,
        U: tl.constexpr,
    ):
        """``_stream_kernel``'s product without tensor cores, for a few rows (see the module docstring).

        A weight row is read in "units": INT8 activations: 32-bit words (four int8 values or eight INT4 nibbles),
        multiplied with dp4a against words of four activations; fp16 / bf16 activations: bytes (one int8 value or
        two nibbles), widened to float32. A step reads a [BLOCK_N, SUBS, U] tile of units, U per input group (or
        U = the step without groups, SUBS = 1); weight unit u multiplies activation unit u (INT8) or, in the
        half-split layout, ``lo = u + (u // half) * half`` (low nibbles) and ``lo + half`` (high nibbles).
        """
        INT_ACTS: tl.constexpr = a_ptr.dtype.element_ty == tl.int8
        SCALED: tl.constexpr = GROUPED or ASYM  # the weight scale applied per step, not by the epilogue
        NEED_ASUM: tl.constexpr = INT4 and (ASYM or INT_ACTS)  # INT8 acts: the nibbles' offset 8 corrected with it
        pid_n = tl.program_id(0)
        u_start = tl.program_id(1) * units_per_split
        u_end = tl.minimum(u_start + units_per_split, units)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = offs_n % N  # columns past N wrap onto valid ones: unmasked weight loads
        offs_s = tl.arange(0, SUBS)
        tile = offs_s[:, None] * U + tl.arange(0, U)[None, :]  # [SUBS, U]: a step's units, as offsets
        if INT_ACTS:
            a_base = a_ptr.to(tl.pointer_type(tl.int32))
            w_base = w_ptr.to(tl.pointer_type(tl.int32))
        else:
            a_base = a_ptr
            w_base = w_ptr
        w_ptrs = w_base + cols[:, None, None] * stride_wn + tile[None, :, :]
        s_ptrs = w_scale_ptr + (cols // rows_per_scale) * g_in
        min_ptrs = w_min_ptr + (cols // rows_per_scale) * g_in
        s_col = tl.load(s_ptrs)[:, None]  # without groups: one scale (and min) per column, loaded once
        min_col = tl.load(min_ptrs)[:, None] if ASYM else s_col
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32 if INT_ACTS and not SCALED else tl.float32)  # transposed
        row = tl.arange(0, BLOCK_M)[None, None, :]
        for u0 in tl.range(u_start, u_end, SUBS * U):
            units_ok = u0 + tile < units
            if EVEN:
                w = tl.load(w_ptrs + u0)
            else:
                w = tl.load(w_ptrs + u0, mask=units_ok[None, :, :], other=0)
            # the weight tile unpacked once for every row
            if INT_ACTS:
                if INT4:
                    w_lo = w & 0x0F0F0F0F
                    w_hi = (w >> 4) & 0x0F0F0F0F
                else:
                    w_lo = w
                    w_hi = w
            else:  # exact in fp16, then in float32 for the products
                if INT4:
                    n_lo, n_hi = _nibbles(w)
                    w_lo = _fp16_from_bytes(n_lo, 0 if ASYM else 8).to(tl.float32)
                    w_hi = _fp16_from_bytes(n_hi, 0 if ASYM else 8).to(tl.float32)
                else:
                    w_lo = _fp16_from_bytes(w, 128).to(tl.float32)
                    w_hi = w_lo
            if GROUPED:
                g = u0 // U + offs_s
                scale = tl.load(s_ptrs[:, None] + g[None, :], mask=(g < g_in)[None, :], other=0)
                mins = scale
                if ASYM:
                    mins = tl.load(min_ptrs[:, None] + g[None, :], mask=(g < g_in)[None, :], other=0)
            else:
                scale = s_col
                mins = min_col
            u = u0 + tile
            if INT4 and GROUPED:
                lo = u + (u // U) * U  # the group's half is U units
            else:
                lo = u  # INT8, or INT4 without groups: the low nibbles of unit u multiply activation unit u
            # Each row's group sums go into column m of parts [BLOCK_N, SUBS, BLOCK_M], in the layout its reduction
            # left them in; the scales then apply once per step, for all rows.
            parts = tl.zeros((BLOCK_N, SUBS, BLOCK_M), dtype=tl.int32 if INT_ACTS else tl.float32)
            asums = tl.zeros((BLOCK_N, SUBS, BLOCK_M), dtype=tl.int32 if INT_ACTS else tl.float32)
            for m in tl.static_range(BLOCK_M):
                a_ok = (units_ok & (tile * 0 + m < M))[None, :, :]  # (a tensor: the interpreter masks with tensors)
                if INT_ACTS and INT4:  # [1, SUBS, U]: the compiler loads it in the weight tile's layout
                    a_ptrs = a_base + m * stride_am + lo[None, :, :]
                else:  # [BLOCK_N, SUBS, U], every weight row's copy (L1 hits): no shuffle into that layout
                    a_ptrs = a_base + m * stride_am + lo[None, :, :] + tl.zeros((BLOCK_N, 1, 1), tl.int32)
                a_lo = tl.load(a_ptrs, mask=a_ok, other=0)
                if INT4:
                    a_hi = tl.load(a_ptrs + half_units, mask=a_ok, other=0)
                else:
                    a_hi = a_lo
                part, asum = _gemv_row_step(w, w_lo, w_hi, a_lo, a_hi, INT4, ASYM, INT_ACTS, NEED_ASUM)
                parts = tl.where(row == m, part[:, :, None], parts)
                if ASYM:
                    asums = tl.where(row == m, asum[:, :, None], asums)
            if SCALED:
                scaled = _exact_f32(parts, SMALL_GROUPS) * scale[:, :, None]
                if ASYM:
                    scaled += asums.to(tl.float32) * mins[:, :, None]
                acc += tl.sum(scaled, 1)
            else:
                acc += tl.sum(parts, 1)
        _finish(tl.trans(acc), pid_n, offs_m, offs_n, M, N, a_scale_ptr, s_ptrs, bias_ptr, c_ptr, ws_ptr, ticket_ptr,
                stride_cm, INT_ACTS, SCALED, HAS_BIAS, SPLIT)

    @triton.jit
    def _gemv_row_step(w, w_lo, w_hi, a_lo, a_hi, INT4: tl.constexpr, ASYM: tl.constexpr, INT_ACTS: tl.constexpr,
                       NEED_ASUM: tl.constexpr):
        """One row's products with a step's weight tile (activations ``a_lo``, ``a_hi``: [1 or BLOCK_N, SUBS, U]): the
        per-group sums [BLOCK_N, SUBS] (exact int32 for INT8 activations, the symmetric nibbles' offset already taken
        off; float32 otherwise) and the groups' activation sums [1 or BLOCK_N, SUBS] (for asymmetric weights' mins)."""
        if INT_ACTS:
            if INT4:
                part = tl.sum(_dp4a(a_hi, w_hi, _dp4a(a_lo, w_lo, tl.zeros_like(w), False), False), 2)
            else:
                part = tl.sum(_dp4a(a_lo, w_lo, tl.zeros_like(w), True), 2)
            asum = tl.zeros((1, a_lo.shape[1]), dtype=tl.int32)
            if NEED_ASUM:
                ones = tl.full(a_lo.shape, 0x01010101, tl.int32)
                asum = tl.sum(_dp4a(a_hi, ones, _dp4a(a_lo, ones, tl.zeros_like(ones), True), True), 2)
                if not ASYM:
                    part -= 8 * asum
        else:
            x_lo = a_lo.to(tl.float32)
            x_hi = a_hi.to(tl.float32)
            if INT4:
                part = tl.sum(w_lo * x_lo + w_hi * x_hi, 2)
            else:
                part = tl.sum(w_lo * x_lo, 2)
            asum = tl.zeros((1, a_lo.shape[1]), dtype=tl.float32)
            if ASYM:
                asum = tl.sum(x_lo + x_hi, 2)
        return part, asum


# ----------------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------------

WORKSPACE_VALUES = 8 * 2**20
"""32-bit partial sums in the split-K workspace (32 MB per device): splits x M x N never exceed it."""
_WORKSPACES: dict[str, tuple[Tensor, Tensor]] = {}


def _workspace(device: torch.device) -> tuple[Tensor, Tensor]:
    """The split-K workspace of a device: ``WORKSPACE_VALUES`` partial sums (int32, also written as float32)
    and 65536 ticket counters (one per column tile; zero between launches: each launch's last split resets
    its own). Kept for the process's lifetime: a CUDA graph that captured a launch holds its address."""
    key = str(device)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (torch.empty(WORKSPACE_VALUES, dtype=torch.int32, device=device),
                            torch.zeros(65536, dtype=torch.int32, device=device))
    return _WORKSPACES[key]


@functools.cache
def _num_sms(device: str) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.startswith("cuda") else 132


def launch(a: Tensor, s_x: Tensor | None, w: Tensor, w_scale: Tensor, w_min: Tensor | None, bias: Tensor | None,
           out: Tensor, p: _Problem, int4: bool, cfg: StreamConfig) -> None:
    """Run ``_stream_kernel`` or ``_gemv_kernel`` (``cfg.kernel``) for ``out [M, N] = a [M, K] @ w.T`` (contiguous
    2-D operands) with ``cfg``; ``w_min``: an asymmetric INT4 weight's group mins."""
    width = group_width_for(p)
    gemv = cfg.kernel == "gemv"
    split = min(split_k_for(p.n, p.k, cfg.block_n, cfg.block_k, cfg.waves, _num_sms(str(a.device)),
                            min_tiles=1 if gemv else 2),
                WORKSPACE_VALUES // (p.m * p.n))
    k_per_split = -(-p.k // (split * cfg.block_k)) * cfg.block_k
    split = -(-p.k // k_per_split)  # rounding k_per_split up to whole K tiles may leave fewer splits
    ws, tickets = _workspace(a.device)
    grid = (triton.cdiv(p.n, cfg.block_n), split)
    asym, int8_acts = w_min is not None, a.dtype == torch.int8
    common = (a, s_x if s_x is not None else w_scale, w, w_scale, w_min if asym else w_scale,
              bias if bias is not None else out, out, ws, tickets)
    if gemv:
        # units: 32-bit words of INT8 activations (4 values; INT4 weights: 8 nibbles), else single values / bytes
        per_unit = (8 if int4 else 4) if int8_acts else (2 if int4 else 1)
        word = 4 if int8_acts else 1
        _gemv_kernel[grid](
            *common, p.m, p.n, p.k // per_unit, (width or p.k) // per_unit, p.n // p.g_out, p.g_in,
            a.stride(0) // word, w.stride(0) // word, out.stride(0), k_per_split // per_unit,
            INT4=int4, ASYM=asym, GROUPED=width is not None,
            SMALL_GROUPS=small_group_sums(width or cfg.block_k, int4),  # the sums scaled per step: a group or a step
            HAS_BIAS=bias is not None,
            EVEN=p.k % cfg.block_k == 0, SPLIT=split > 1, BLOCK_M=gemv_block_m(p.m), BLOCK_N=cfg.block_n,
            SUBS=cfg.block_k // width if width else 1, U=(width or cfg.block_k) // per_unit,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return
    sub_k = width if width is not None else cfg.block_k
    _stream_kernel[grid](
        *common, p.m, p.n, p.k, p.n // p.g_out, p.g_in, p.k // p.g_in, a.stride(0), w.stride(0), out.stride(0),
        k_per_split,
        INT4=int4, ASYM=asym, OFFSET=8 if int4 and not (asym or int8_acts) else 0,
        NEED_ASUM=int4 and (asym or int8_acts), SUB_K=sub_k, SUBS=cfg.block_k // sub_k, GROUPED=width is not None,
        SMALL_GROUPS=width is not None and small_group_sums(width, int4), HAS_BIAS=bias is not None,
        EVEN_K=p.k % cfg.block_k == 0, SPLIT=split > 1, BLOCK_M=block_m_for(p.m), BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


L2_FILLS = 3
"""Weight copies the tuner cycles through fill the L2 this many times over (``_weight_copies``)."""
MAX_WEIGHT_COPIES = 64


def _weight_copies(w: Tensor, w_scale: Tensor, w_min: Tensor | None) -> list[tuple[Tensor, Tensor, Tensor | None]]:
    """Copies of a weight (with its scales and mins, also read per call) that together fill the GPU's L2
    ``L2_FILLS`` times over, at least two: the autotuner times launches that cycle through them, so each launch
    reads its weight from HBM (autotune.py). Transient: they live while one shape is tuned."""
    parts = [t for t in (w, w_scale, w_min) if t is not None]
    nbytes = sum(t.numel() * t.element_size() for t in parts)
    l2 = torch.cuda.get_device_properties(w.device).L2_cache_size
    count = max(2, min(MAX_WEIGHT_COPIES, -(-L2_FILLS * l2 // max(nbytes, 1))))
    return [(w, w_scale, w_min)] + [(w.clone(), w_scale.clone(), None if w_min is None else w_min.clone())
                                    for _ in range(count - 1)]


def _run(x: Tensor, s_x: Tensor | None, w: Tensor, w_scale: Tensor, w_min: Tensor | None, bias: Tensor | None,
         out_dtype: torch.dtype, p: _Problem, int4: bool, config: StreamConfig | None) -> Tensor:
    out = torch.empty((*x.shape[:-1], p.n), dtype=out_dtype, device=x.device)
    a = x.reshape(p.m, p.k)
    a = a if a.stride(1) == 1 else a.contiguous()
    w = w if w.stride(1) == 1 else w.contiguous()
    w_scale = w_scale.float().contiguous()
    w_min = w_min.float().contiguous() if w_min is not None else None
    bias = bias.contiguous() if bias is not None else None
    out2d = out.view(p.m, p.n)

    def on(weight: tuple[Tensor, Tensor, Tensor | None]) -> Callable[[StreamConfig], None]:
        """``run(cfg)`` on this weight (with its scales and mins)."""
        return functools.partial(launch, a, s_x, *weight, bias, out2d, p, int4)

    run = on((w, w_scale, w_min))

    def cycled_runs() -> list[Callable[[StreamConfig], None]]:
        return [on(copy) for copy in _weight_copies(w, w_scale, w_min)]

    gemv = gemv_kernel_applies(a, w, p, int4)
    if config is not None:  # forced (tests, sweeps): bypasses the tuner's cache
        if config.kernel == "gemv" and not gemv:
            raise ZQError(f"{config} needs M <= {GEMV_MAX_M} and, for INT8 activations, K a multiple of "
                          f"{8 if int4 else 4} and 4-byte aligned operand rows; got M={p.m}, K={p.k}")
        run(config)
    else:
        # GEMV rows cost compute per row: M's own power of two is its bucket there
        key = ("stream", gemv_block_m(p.m) if gemv else block_m_for(p.m), p.n, p.k, group_width_for(p), int4,
               w_min is not None, x.dtype, bias is not None, out_dtype, x.device.index)
        configs = candidate_configs(p, int4, gemv, int8_acts=x.dtype == torch.int8)
        run(_pick_config(key, configs, run, x.device.index, cycled_runs))  # persisted like the prefill's
    return out


def stream_int_linear(x_q: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                      out_dtype: torch.dtype, *, int4: bool, config: StreamConfig | None = None,
                      w_min: Tensor | None = None) -> Tensor:
    """int8_linear / int4_linear (M <= 64) through ``_stream_kernel``; ZQError where it does not apply."""
    p = check_linear_args(x_q, x_scale, w, w_scale, bias, int4, w_min)
    _require_triton()
    if not stream_kernel_applies(p, int8_acts=True):
        raise ZQError(f"the weight-streaming GEMM takes M <= {MAX_M} and input-dim groups of a power-of-two width "
                      f">= 32, got M={p.m}, group width {group_width_for(p)}; use triton_gemm.triton_int_linear")
    s_x = x_scale.reshape(p.m).float().contiguous()
    return _run(x_q, s_x, w, w_scale, w_min, bias, out_dtype, p, int4, config)


def check_weight_only_args(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                           w_min: Tensor | None = None) -> _Problem:
    """Validate weight_only_linear's operands (floating-point activations, INT8 or packed INT4 weights)."""
    if not x.is_floating_point():
        raise ZQError(f"weight_only_linear: activations must be floating point, got {x.dtype}")
    if bias is not None and bias.dtype != x.dtype:
        raise ZQError(f"weight_only_linear: bias dtype {bias.dtype} differs from the activations' {x.dtype}; "
                      "cast the model to one dtype (model.half())")
    # The INT8 operand checks on shape-only stand-ins: the same shape and group rules.
    p = check_linear_args(torch.empty(x.shape, dtype=torch.int8, device="meta"),
                          torch.empty((*x.shape[:-1], 1), device="meta"), w.to("meta"), w_scale.to("meta"),
                          None if bias is None else bias.to("meta"), int4=w.dtype == torch.uint8,
                          w_min=None if w_min is None else w_min.to("meta"))
    if any(t.device != x.device for t in (w, w_scale, *([bias] if bias is not None else []))):
        raise ZQError("weight_only_linear: operands are on different devices; move the model and its inputs to "
                      "one device")
    return p


def stream_weight_only_linear(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, *,
                              config: StreamConfig | None = None, w_min: Tensor | None = None) -> Tensor:
    """weight_only_linear (M <= 64, fp16 / bf16 activations) through ``_stream_kernel``."""
    p = check_weight_only_args(x, w, w_scale, bias, w_min)
    _require_triton()
    if not stream_kernel_applies(p, int8_acts=False, act_dtype=x.dtype):
        raise ZQError(f"the weight-streaming GEMM takes M <= {MAX_M}, fp16/bf16 activations and input-dim groups "
                      f"of a power-of-two width >= 32, got M={p.m}, {x.dtype}, group width {group_width_for(p)}")
    return _run(x, None, w, w_scale, w_min, bias, x.dtype, p, w.dtype == torch.uint8, config)


# ----------------------------------------------------------------------------------------------------
# The ops' CUDA kernels: dispatch by M
# ----------------------------------------------------------------------------------------------------

def _int_linear_cuda(int4: bool) -> Callable[..., Tensor]:
    def kernel(x_q, x_scale, w, w_scale, bias, out_dtype, w_min=None):
        p = check_linear_args(x_q, x_scale, w, w_scale, bias, int4, w_min)
        _require_cuda("the Triton INT8 GEMM", x_q, x_scale, w, w_scale, *([bias] if bias is not None else []))
        if stream_kernel_applies(p, int8_acts=True):
            return stream_int_linear(x_q, x_scale, w, w_scale, bias, out_dtype, int4=int4, w_min=w_min)
        return triton_gemm.triton_int_linear(x_q, x_scale, w, w_scale, bias, out_dtype, int4=int4, w_min=w_min)
    return kernel


int8_linear_cuda = _int_linear_cuda(int4=False)
int4_linear_cuda = _int_linear_cuda(int4=True)


def weight_only_linear_cuda(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                            w_min: Tensor | None = None) -> Tensor:
    """M <= 64: the weight-streaming kernel; otherwise (and for float32 activations) the reference, whose
    cuBLAS GEMM is what prefill is bound by."""
    p = check_weight_only_args(x, w, w_scale, bias, w_min)
    _require_cuda("the Triton weight-only GEMM", x, w, w_scale)
    if stream_kernel_applies(p, int8_acts=False, act_dtype=x.dtype):
        return stream_weight_only_linear(x, w, w_scale, bias, w_min=w_min)
    return F.linear(x, ops.dequantize_weight(w, w_scale, x.dtype, w_min), bias)


__all__ = [
    "MAX_M", "StreamConfig", "block_m_for", "candidate_configs", "check_weight_only_args", "int4_linear_cuda",
    "int8_linear_cuda", "launch", "split_k_for", "stream_int_linear", "stream_kernel_applies",
    "stream_weight_only_linear", "weight_only_linear_cuda",
]


def register_cuda_kernels() -> None:
    """Put the weight-streaming kernels in front of triton_gemm's (registered first): ``zq::int8_linear`` /
    ``int4_linear`` dispatch by M (these kernels for M <= 64, triton_gemm's above), and ``zq::weight_only_linear``
    gets a CUDA kernel. Idempotent (a later registration replaces the earlier one)."""
    ops.int8_linear.register_kernel("cuda")(int8_linear_cuda)
    ops.int4_linear.register_kernel("cuda")(int4_linear_cuda)
    ops.weight_only_linear.register_kernel("cuda")(weight_only_linear_cuda)

