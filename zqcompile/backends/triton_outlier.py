"""CUDA kernel for ``zq::outlier_int8_linear`` (LLM.int8()'s decomposition, passes/decompose_outliers.py).

The op takes the floating-point activation ``x [M, K]`` and quantizes it itself: per token, the columns other than
the ``C`` outlier ``columns`` to INT8 (the scale ignores the outliers), times the INT8 / packed INT4 weight (zero
in the outlier columns); plus ``x[:, columns] @ w_outlier.T`` in x's dtype (``w_outlier`` FP16 [N, C]). Here that
is two launches:

1. ``_quantize_inliers_kernel``, one program per token row: the row's INT8 values with the outlier columns zeroed
   and its scale, rounded as ``quant.quantize_rows`` rounds (``rint(x / s)`` with an IEEE division, ``s = absmax /
   127``, 1 for an all-zero row, NaN and zeros for a row holding a NaN or an Inf). A per-token scale needs the
   whole row before any of it is quantized, so it cannot live in the GEMM's K loop without every column tile
   redoing it. The row of the output first serves as the keep mask (ones, then zeros scattered at the outlier
   columns), so the mask costs no launch and no buffer.
2. ``_outlier_linear_kernel``: the tiled INT8 GEMM's main loop (``triton_gemm._int_linear_tile``: INT8 or INT4
   weights, per-channel, output-row or input-dim groups), its epilogue ``* s_x[row] + bias``, then the outlier
   product added to the same float32 tile on the tensor cores: the ``C`` columns gathered from ``x`` by their
   indices (``BLOCK_C`` at a time), times the tile's rows of ``w_outlier`` widened to x's dtype, accumulated in
   float32 (IEEE float32 for float32 activations, no TF32), before the single store in ``out_dtype``. Every
   config's shared memory is the plain GEMM's; with fp16 / bf16 activations no config spills registers (ptxas for
   sm_90; 8 bytes at the 32x64x256 tile), with float32 ones (an fp32 CUDA model) the large tiles spill: correct,
   slower.

Rounding against the reference: the reference rounds the INT8 part to ``out_dtype``, the outlier product to x's
dtype, then their sum to ``out_dtype``; the kernel adds both in float32 and rounds once, so the two differ by up to
about one unit in the last place of ``out_dtype`` (the INT8 part and the scales are computed as the reference
does). The GEMM configs and the tuner are triton_gemm's (``candidate_configs``, ``_pick_config``, tuned per shape
key, persisted); the persistent TMA kernel and the small-M weight-streaming kernel have no outlier epilogue, so every
M runs the tiled kernel with the configs of its M bucket (decode tiles of 16 rows for M <= 16): at M <= 64 plain
W8A8 runs the split-K streaming kernel instead, and part of the measured gap there is that (benchmarks/
gemm_outlier.py). Where no tiled config fits (input groups not a multiple of 32 wide) the quantized activation goes
through ``triton_gemm.triton_int_linear`` and the outlier product through torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zqcompile import ops
from zqcompile.backends import triton_gemm
from zqcompile.backends.triton_gemm import (
    GemmConfig, _pick_config, _Problem, _require_cuda, _require_triton, candidate_configs, check_linear_args, m_bucket,
    tile_launch_args,
)
from zqcompile.errors import ZQError

triton = triton_gemm.triton
if triton is not None:
    import triton.language as tl

    from zqcompile.backends.triton_gemm import _int_linear_tile

    _ROUNDER = tl.constexpr(12582912.0)  # 1.5 * 2**23: v + R - R rounds |v| < 2**22 to an integer, half to even
    _FLT_MAX = tl.constexpr(3.4028234663852886e38)
    # NaN by its bits: a NaN constexpr global fails Triton's "global changed since compile" check (NaN != NaN).
    _NAN_BITS = tl.constexpr(0x7FC00000)

QUANT_BLOCK_K = 1024
"""Columns of a row that ``_quantize_inliers_kernel`` handles per step."""
BLOCK_C = 32
"""Outlier columns per step of the outlier product (a multiple of 16, the K of an fp16 MMA)."""


# ----------------------------------------------------------------------------------------------------
# The kernels
# ----------------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _quantize_inliers_kernel(x_ptr, columns_ptr, q_ptr, s_ptr, K, C, stride_xm, stride_qm,
                                 BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_xm
        q_row = q_ptr + row * stride_qm
        offs_k = tl.arange(0, BLOCK_K)
        offs_c = tl.arange(0, BLOCK_C)
        # The keep mask in the q row: ones, then zeros at the outlier columns. The barriers order the threads'
        # stores (the ones before the zeros, the zeros before the reads below).
        for k0 in range(0, K, BLOCK_K):
            tl.store(q_row + k0 + offs_k, tl.full((BLOCK_K,), 1, tl.int8), mask=k0 + offs_k < K)
        tl.debug_barrier()
        for c0 in range(0, C, BLOCK_C):
            in_c = c0 + offs_c < C
            tl.store(q_row + tl.load(columns_ptr + c0 + offs_c, mask=in_c, other=0), tl.zeros((BLOCK_C,), tl.int8),
                     mask=in_c)
        tl.debug_barrier()
        absmax = tl.zeros((BLOCK_K,), tl.float32)
        bad = tl.zeros((BLOCK_K,), tl.int32)  # NaN or Inf among the kept values
        for k0 in range(0, K, BLOCK_K):
            in_k = k0 + offs_k < K
            keep = tl.load(q_row + k0 + offs_k, mask=in_k, other=0) != 0
            v = tl.where(keep, tl.abs(tl.load(x_row + k0 + offs_k, mask=in_k, other=0).to(tl.float32)), 0.0)
            absmax = tl.maximum(absmax, v)
            bad += tl.where(v <= _FLT_MAX, 0, 1)
        scale = tl.math.div_rn(tl.max(absmax, 0), 127.0)
        scale = tl.where(scale == 0, 1.0, scale)
        bad_row = tl.sum(bad, 0)
        tl.store(s_ptr + row, tl.where(bad_row == 0, scale, tl.full((), _NAN_BITS, tl.int32).to(tl.float32, bitcast=True)))
        # Each element is read as mask and rewritten as its value by the same thread; a value another thread may
        # already have written reads back as the same decision (a zero is a zero either way).
        for k0 in range(0, K, BLOCK_K):
            in_k = k0 + offs_k < K
            keep = tl.load(q_row + k0 + offs_k, mask=in_k, other=0) != 0
            v = tl.math.div_rn(tl.load(x_row + k0 + offs_k, mask=in_k, other=0).to(tl.float32), scale)
            v = tl.minimum(tl.maximum(v, -127.0), 127.0)  # rounding after the clamp: the same, 127 is an integer
            q = tl.where(keep & (bad_row == 0), (v + _ROUNDER) - _ROUNDER, 0.0)
            tl.store(q_row + k0 + offs_k, q.to(tl.int8), mask=in_k)

    @triton.jit
    def _outlier_linear_kernel(
        a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, bias_ptr, c_ptr, x_ptr, columns_ptr, wo_ptr,
        M, N, K, C, rows_per_scale, g_in, group, stride_am, stride_wn, stride_cm, stride_xm, stride_won,
        INT4: tl.constexpr, GROUPED: tl.constexpr, TILES_PER_GROUP: tl.constexpr, SMALL_GROUPS: tl.constexpr,
        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        offs_m, offs_n, rows, cols, acc = _int_linear_tile(
            tl.program_id(0), a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, w_scale_ptr, bias_ptr, M, N, K, rows_per_scale,
            g_in, group, stride_am, stride_wn, INT4, False, GROUPED, TILES_PER_GROUP, SMALL_GROUPS, HAS_BIAS, EVEN_K,
            BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
        # LLM.int8()'s outlier columns: gathered from x, times their FP16 weight, added to the float32 tile
        offs_c = tl.arange(0, BLOCK_C)
        x_rows = x_ptr + rows[:, None] * stride_xm
        wo_rows = wo_ptr + cols[:, None] * stride_won
        for c0 in range(0, C, BLOCK_C):
            in_c = (c0 + offs_c < C)[None, :]
            xo = tl.load(x_rows + tl.load(columns_ptr + c0 + offs_c, mask=c0 + offs_c < C, other=0)[None, :],
                         mask=in_c, other=0)
            wo = tl.load(wo_rows + (c0 + offs_c)[None, :], mask=in_c, other=0).to(xo.dtype)
            if xo.dtype == tl.float32:
                acc = tl.dot(xo, tl.trans(wo), acc, input_precision="ieee")
            else:
                acc = tl.dot(xo, tl.trans(wo), acc)
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ----------------------------------------------------------------------------------------------------
# Checks, launch and the op's CUDA kernel
# ----------------------------------------------------------------------------------------------------

def check_outlier_args(x: Tensor, w: Tensor, w_scale: Tensor, columns: Tensor, w_outlier: Tensor,
                       bias: Tensor | None) -> _Problem:
    """Validate outlier_int8_linear's operands: floating-point activations, the INT8 / packed INT4 operand rules of
    ``check_linear_args``, int64 column indices and an [N, C] outlier weight, all on one device."""
    if not x.is_floating_point():
        raise ZQError(f"outlier_int8_linear: activations must be floating point (the op quantizes them), got {x.dtype}")
    p = check_linear_args(torch.empty(x.shape, dtype=torch.int8, device="meta"),
                          torch.empty((*x.shape[:-1], 1), device="meta"), w.to("meta"), w_scale.to("meta"),
                          None if bias is None else bias.to("meta"), int4=w.dtype == torch.uint8)
    if columns.dtype != torch.int64 or columns.dim() != 1:
        raise ZQError(f"outlier_int8_linear: columns must be a 1-D int64 tensor of indices, got {columns.dtype} "
                      f"{tuple(columns.shape)}")
    if w_outlier.shape != (p.n, columns.numel()) or not w_outlier.is_floating_point():
        raise ZQError(f"outlier_int8_linear: the outlier weight must be floating point [N, C] = "
                      f"({p.n}, {columns.numel()}), got {w_outlier.dtype} {tuple(w_outlier.shape)}")
    tensors = [x, w, w_scale, columns, w_outlier] + ([bias] if bias is not None else [])
    if any(t.device != x.device for t in tensors):
        raise ZQError(f"outlier_int8_linear: operands are on different devices {[str(t.device) for t in tensors]}; "
                      "move the model and its inputs to one device")
    return p


def quantize_inliers(x2d: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
    """``quantize_rows(x.index_fill(-1, columns, 0))`` of a 2-D, K-contiguous ``x`` in one launch: (int8 [M, K],
    float32 scales [M])."""
    m, k = x2d.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x2d.device)
    s = torch.empty(m, dtype=torch.float32, device=x2d.device)
    if m:
        _quantize_inliers_kernel[(m,)](x2d, columns, q, s, k, columns.numel(), x2d.stride(0), q.stride(0),
                                       BLOCK_K=min(QUANT_BLOCK_K, triton.next_power_of_2(k)), BLOCK_C=BLOCK_C,
                                       num_warps=4)
    return q, s


def launch(q: Tensor, s_x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, out: Tensor, x: Tensor,
           columns: Tensor, w_outlier: Tensor, p: _Problem, cfg: GemmConfig) -> None:
    """Run ``_outlier_linear_kernel`` with ``cfg`` (a tiled config of ``candidate_configs``) on 2-D contiguous-K
    operands: the quantized activation ``q`` and scales ``s_x`` [M], the activation ``x`` the outlier columns are
    gathered from, ``out`` [M, N]."""
    grid = (triton.cdiv(p.m, cfg.block_m) * triton.cdiv(p.n, cfg.block_n),)
    _outlier_linear_kernel[grid](
        q, s_x, w, w_scale, out if bias is None else bias, out, x, columns, w_outlier,
        p.m, p.n, p.k, columns.numel(), p.n // p.g_out, p.g_in, p.k // p.g_in, q.stride(0), w.stride(0),
        out.stride(0), x.stride(0), w_outlier.stride(0),
        BLOCK_C=BLOCK_C, **tile_launch_args(p, w.dtype == torch.uint8, bias is not None, cfg),
    )


def tuning_key(p: _Problem, c: int, int4: bool, has_bias: bool, x_dtype: torch.dtype, out_dtype: torch.dtype,
               device_index: int | None) -> tuple:
    """The tuner's key of an outlier GEMM (its own: the epilogue changes which tile is fastest)."""
    return ("outlier", m_bucket(p.m), p.n, p.k, p.k // p.g_in if p.g_in > 1 else None, int4, BLOCK_C * -(-c // BLOCK_C),
            has_bias, x_dtype, out_dtype, device_index)


def triton_outlier_linear(x: Tensor, w: Tensor, w_scale: Tensor, columns: Tensor, w_outlier: Tensor,
                          bias: Tensor | None, out_dtype: torch.dtype, *, config: GemmConfig | None = None) -> Tensor:
    """``zq.outlier_int8_linear`` on CUDA tensors: ``quantize_inliers``, then ``_outlier_linear_kernel``.

    ``config`` forces one tiled config (tests and benchmarks); by default it is tuned per shape key among
    ``triton_gemm.candidate_configs`` (tiled only)."""
    p = check_outlier_args(x, w, w_scale, columns, w_outlier, bias)
    if config is not None and config.kernel != "tiled":
        raise ZQError(f"{config}: the outlier GEMM has only the tiled kernel; use a tiled config")
    _require_cuda("the Triton LLM.int8() GEMM", x, w, w_scale, columns, w_outlier)
    _require_triton()
    int4 = w.dtype == torch.uint8
    out = torch.empty((*x.shape[:-1], p.n), dtype=out_dtype, device=x.device)
    if p.m == 0 or p.n == 0:
        return out
    x2d = x.reshape(p.m, p.k)
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    columns = columns.contiguous()
    q, s_x = quantize_inliers(x2d, columns)
    group_width = p.k // p.g_in if p.g_in > 1 else None
    candidates = candidate_configs(p.m, p.k, group_width) if config is None else [config]
    if not candidates:
        y = triton_gemm.triton_int_linear(q, s_x.view(p.m, 1), w, w_scale, bias, out_dtype, int4=int4)
        y = y + (x2d.index_select(-1, columns) @ w_outlier.to(x.dtype).T).to(out_dtype)
        return y.reshape(out.shape)
    w = w if w.stride(1) == 1 else w.contiguous()
    w_scale = w_scale.float().contiguous()
    w_outlier = w_outlier.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out2d = out.view(p.m, p.n)

    def run(cfg: GemmConfig) -> None:
        launch(q, s_x, w, w_scale, bias, out2d, x2d, columns, w_outlier, p, cfg)

    key = tuning_key(p, columns.numel(), int4, bias is not None, x.dtype, out_dtype, x.device.index)
    run(config if config is not None else _pick_config(key, candidates, run, x.device.index))
    return out


def _outlier_int8_linear_cuda(x, w, w_scale, columns, w_outlier, bias, out_dtype):
    return triton_outlier_linear(x, w, w_scale, columns, w_outlier, bias, out_dtype)


def register_cuda_kernels() -> None:
    """Make ``zq::outlier_int8_linear`` run ``triton_outlier_linear`` on CUDA tensors; idempotent."""
    ops.outlier_int8_linear.register_kernel("cuda")(_outlier_int8_linear_cuda)


__all__ = ["BLOCK_C", "check_outlier_args", "launch", "quantize_inliers", "register_cuda_kernels",
           "triton_outlier_linear", "tuning_key"]
