"""The quantized operators of a zqcompile graph, registered as ``torch.ops.zq.*`` custom ops.

Each op has a reference implementation here (plain torch, any device; the CPU backend) and a fake
kernel, so graphs that contain them stay printable, exportable (``torch.export``) and shape-propagable.
A backend swaps in faster kernels for a device with ``op.register_kernel(device)``; it never changes
what an op computes, so a graph means the same thing under every backend.

Conventions (see zqcompile.quant): activation scales are float32 ``[..., 1]`` (one per token row);
weight scales are float32 ``[G_out, G_in]``; INT8 weights are ``int8 [N, K]``, INT4 weights are packed
``uint8 [N, K/2]`` (zqcompile.quant.pack_int4: unsigned nibbles, half-split in each input group).
Asymmetric INT4 weights (values in [0, 15]) also take their group mins ``w_min`` (float32 ``[G_out, G_in]``,
the ops' last, optional argument): ``w = s_w * q + w_min``. Fused "elementwise + quant" ops return the
quantized activation and its scale; the norm ops also return their floating-point output, which a residual
connection may still need.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from zqcompile.quant import (
    exact_int_matmul, expand_weight_scale, dequantize_weight_values, quantize_rows, unpack_weight,
)

_LIB = "zq"


def _row_scale_like(x: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


def _quant_like(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.int8), _row_scale_like(x)


# ----------------------------------------------------------------------------------------------------
# Token-wise dynamic activation quantization
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op(f"{_LIB}::quantize_per_token", mutates_args=())
def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """INT8 per token row: scale = absmax(row) / 127 (1.0 for an all-zero row), round half to even."""
    return quantize_rows(x)


@quantize_per_token.register_fake
def _(x: Tensor) -> tuple[Tensor, Tensor]:
    return _quant_like(x)


@torch.library.custom_op(f"{_LIB}::dequantize_per_token", mutates_args=())
def dequantize_per_token(x_q: Tensor, x_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """x_q * scale in ``out_dtype``: the simulated-quantization form that lowering turns into an INT8 GEMM."""
    return (x_q.float() * x_scale).to(out_dtype)


@dequantize_per_token.register_fake
def _(x_q: Tensor, x_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    return x_q.new_empty(x_q.shape, dtype=out_dtype)


@torch.library.custom_op(f"{_LIB}::dequantize_weight", mutates_args=())
def dequantize_weight(w: Tensor, w_scale: Tensor, out_dtype: torch.dtype, w_min: Tensor | None = None) -> Tensor:
    """Floating-point weight [N, K] from stored INT8 (int8) or packed INT4 (uint8) values, group scales and
    (asymmetric INT4) group mins."""
    return dequantize_weight_values(unpack_weight(w, w_scale, w_min), w_scale, w_min).to(out_dtype)


@dequantize_weight.register_fake
def _(w: Tensor, w_scale: Tensor, out_dtype: torch.dtype, w_min: Tensor | None = None) -> Tensor:
    k = w.shape[1] * 2 if w.dtype == torch.uint8 else w.shape[1]
    return w.new_empty((w.shape[0], k), dtype=out_dtype)


# ----------------------------------------------------------------------------------------------------
# Integer GEMMs with the dequantization in the epilogue
# ----------------------------------------------------------------------------------------------------

def _int_linear_reference(x_q: Tensor, x_scale: Tensor, w_q: Tensor, w_scale: Tensor, bias: Tensor | None,
                          out_dtype: torch.dtype, w_min: Tensor | None = None) -> Tensor:
    """y = s_x[row] * sum_g (acc_g * s_w[col, g] (+ min[col, g] * asum_g)) + bias, in float32, where
    ``acc_g = (x_q @ w_q.T)`` over group g's columns and ``asum_g`` the sum of x_q over them (exact INT32 sums).

    With one input group (per-channel or output-row groups) this is the epilogue ``acc * s_x * s_w``; with
    input-dim groups the scale changes along K, so each group's partial INT32 sum is scaled separately.
    Asymmetric weights (``w_min``) add each group's min times the group's activation sum.
    """
    *lead, k = x_q.shape
    n = w_q.shape[0]
    a = x_q.reshape(-1, k)
    g_in = w_scale.shape[1]
    col_scale = expand_weight_scale(w_scale, n, g_in).float()  # [N, G_in]
    col_min = None if w_min is None else expand_weight_scale(w_min, n, g_in).float()
    width = k // g_in
    y = torch.zeros(a.shape[0], n, dtype=torch.float32, device=x_q.device)
    for g in range(g_in):
        cols = slice(g * width, (g + 1) * width)
        y += exact_int_matmul(a[:, cols], w_q[:, cols]).float() * col_scale[:, g]
        if col_min is not None:
            y += a[:, cols].sum(1, dtype=torch.int32).float()[:, None] * col_min[:, g]
    y *= x_scale.reshape(-1, 1)
    if bias is not None:
        y += bias.float()
    return y.to(out_dtype).reshape(*lead, n)


def _linear_fake(x: Tensor, n: int, out_dtype: torch.dtype) -> Tensor:
    return x.new_empty((*x.shape[:-1], n), dtype=out_dtype)


@torch.library.custom_op(f"{_LIB}::int8_linear", mutates_args=())
def int8_linear(x_q: Tensor, x_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None,
                out_dtype: torch.dtype) -> Tensor:
    """W8A8 linear: INT8 activations [.., K] x INT8 weights [N, K], INT32 accumulate, dequant epilogue."""
    return _int_linear_reference(x_q, x_scale, w, w_scale, bias, out_dtype)


@int8_linear.register_fake
def _(x_q, x_scale, w, w_scale, bias, out_dtype):
    return _linear_fake(x_q, w.shape[0], out_dtype)


@torch.library.custom_op(f"{_LIB}::int4_linear", mutates_args=())
def int4_linear(x_q: Tensor, x_scale: Tensor, w_packed: Tensor, w_scale: Tensor, bias: Tensor | None,
                out_dtype: torch.dtype, w_min: Tensor | None = None) -> Tensor:
    """W4A8 linear: unpacks the INT4 weights (uint8 [N, K/2]; asymmetric with ``w_min``) and runs the INT8 path."""
    return _int_linear_reference(x_q, x_scale, unpack_weight(w_packed, w_scale, w_min), w_scale, bias, out_dtype, w_min)


@int4_linear.register_fake
def _(x_q, x_scale, w_packed, w_scale, bias, out_dtype, w_min=None):
    return _linear_fake(x_q, w_packed.shape[0], out_dtype)


@torch.library.custom_op(f"{_LIB}::weight_only_linear", mutates_args=())
def weight_only_linear(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None, w_min: Tensor | None = None
                       ) -> Tensor:
    """W8A16 / W4A16 linear: dequantize the stored weight to x's dtype and run a floating-point GEMM."""
    return F.linear(x, dequantize_weight_values(unpack_weight(w, w_scale, w_min), w_scale, w_min).to(x.dtype), bias)


@weight_only_linear.register_fake
def _(x, w, w_scale, bias, w_min=None):
    return _linear_fake(x, w.shape[0], x.dtype)


# ----------------------------------------------------------------------------------------------------
# Elementwise ops with the token-wise quantization fused in (ZeroQuant's kernel fusion)
# ----------------------------------------------------------------------------------------------------

def _norm_quant_fake(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.empty_like(x), *_quant_like(x))


@torch.library.custom_op(f"{_LIB}::layernorm_quant", mutates_args=())
def layernorm_quant(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm over the last dim, then per-token INT8 quantization of its output: (y, y_q, y_scale)."""
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return (y, *quantize_rows(y))


@layernorm_quant.register_fake
def _(x, weight, bias, eps):
    return _norm_quant_fake(x)


@torch.library.custom_op(f"{_LIB}::add_layernorm_quant", mutates_args=())
def add_layernorm_quant(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """LayerNorm(x + residual) (BERT's post-LN residual block), then per-token INT8: (y, y_q, y_scale)."""
    y = F.layer_norm(x + residual, (x.shape[-1],), weight, bias, eps)
    return (y, *quantize_rows(y))


@add_layernorm_quant.register_fake
def _(x, residual, weight, bias, eps):
    return _norm_quant_fake(x)


@torch.library.custom_op(f"{_LIB}::rmsnorm_quant", mutates_args=())
def rmsnorm_quant(x: Tensor, weight: Tensor, eps: float, weight_first: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """RMSNorm (float32 statistics), then per-token INT8: (y, y_q, y_scale).

    Llama (``weight_first=False``): the normalised value is cast to x's dtype, then times weight (y in the
    promoted dtype). Gemma (``weight_first=True``, weight = the stored ``1 + w`` in float32): normalised value
    times weight in float32, then cast to x's dtype.
    """
    y = _rms_normalize(x, weight, eps, weight_first)
    return (y, *quantize_rows(y))


def _rms_normalize(x: Tensor, weight: Tensor, eps: float, weight_first: bool) -> Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype) if weight_first else weight * normed.to(x.dtype)


@rmsnorm_quant.register_fake
def _(x, weight, eps, weight_first=False):
    dtype = x.dtype if weight_first else torch.promote_types(x.dtype, weight.dtype)
    return (torch.empty_like(x, dtype=dtype), *_quant_like(x))


@torch.library.custom_op(f"{_LIB}::add_rmsnorm_quant", mutates_args=())
def add_rmsnorm_quant(x: Tensor, residual: Tensor, weight: Tensor, eps: float, weight_first: bool = False
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """A pre-norm decoder's residual add and the next RMSNorm's quantized output: ``(h, q, scale)`` with
    ``h = x + residual`` (x's dtype: the residual stream the next add reads) and ``q, scale`` the per-token INT8
    of ``rmsnorm_quant(h, weight, eps, weight_first)``'s normalised value, which itself is not returned (the cuda
    target fuses this where only its quantization is read: passes/fuse_residual_rmsnorm.py)."""
    h = x + residual
    return (h, *quantize_rows(_rms_normalize(h, weight, eps, weight_first)))


@add_rmsnorm_quant.register_fake
def _(x, residual, weight, eps, weight_first=False):
    return (torch.empty_like(x), *_quant_like(x))


@torch.library.custom_op(f"{_LIB}::add_rmsnorm", mutates_args=())
def add_rmsnorm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """A decoder's last residual add and its final (Llama) RMSNorm, not quantized (the LM head reads it in floating
    point): ``(h, y)`` with ``h = x + residual`` (x's dtype) and ``y = rmsnorm_quant(h, weight, eps)[0]``."""
    h = x + residual
    return h, _rms_normalize(h, weight, eps, False)


@add_rmsnorm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))


@torch.library.custom_op(f"{_LIB}::gelu_quant", mutates_args=())
def gelu_quant(x: Tensor, bias: Tensor | None, approximate: str) -> tuple[Tensor, Tensor]:
    """GELU(x + bias) ('none' = erf, 'tanh' = GPT-2's gelu_new), then per-token INT8: (q, scale)."""
    return quantize_rows(F.gelu(x if bias is None else x + bias, approximate=approximate))


@gelu_quant.register_fake
def _(x, bias, approximate):
    return _quant_like(x)


@torch.library.custom_op(f"{_LIB}::silu_mul_quant", mutates_args=())
def silu_mul_quant(gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """SwiGLU: silu(gate) * up (Llama's MLP), then per-token INT8: (q, scale)."""
    return quantize_rows(F.silu(gate) * up)


@silu_mul_quant.register_fake
def _(gate, up):
    return _quant_like(gate)


@torch.library.custom_op(f"{_LIB}::gelu_mul_quant", mutates_args=())
def gelu_mul_quant(gate: Tensor, up: Tensor, approximate: str) -> tuple[Tensor, Tensor]:
    """GeGLU: gelu(gate) * up (Gemma's MLP; 'tanh' or 'none'), then per-token INT8: (q, scale)."""
    return quantize_rows(F.gelu(gate, approximate=approximate) * up)


@gelu_mul_quant.register_fake
def _(gate, up, approximate):
    return _quant_like(gate)


@torch.library.custom_op(f"{_LIB}::relu_quant", mutates_args=())
def relu_quant(x: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU (OPT's MLP), then per-token INT8: (q, scale)."""
    return quantize_rows(torch.relu(x))


@relu_quant.register_fake
def _(x):
    return _quant_like(x)


# ----------------------------------------------------------------------------------------------------
# Online Hadamard transform (rotation, passes/rotate_hadamard.py)
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op(f"{_LIB}::hadamard", mutates_args=())
def hadamard(x: Tensor, block: int) -> Tensor:
    """x's last dim in blocks of ``block`` (a power of two), each times the orthonormal Sylvester Hadamard matrix
    H / sqrt(block): a fast Walsh-Hadamard transform (log2(block) butterfly stages), in float32 at least."""
    y = x.to(torch.promote_types(x.dtype, torch.float32)).contiguous().view(-1, block)
    half = 1
    while half < block:  # stage: pairs (i, i + half) inside every run of 2 * half -> (a + b, a - b)
        pairs = y.view(y.shape[0], block // (2 * half), 2, half)
        y = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), 2).view(-1, block)
        half *= 2
    return (y.reshape(x.shape) * block ** -0.5).to(x.dtype)


@hadamard.register_fake
def _(x: Tensor, block: int) -> Tensor:
    return torch.empty_like(x)


def _hadamard_setup(ctx, inputs: tuple, output: Tensor) -> None:
    ctx.block = inputs[1]


def _hadamard_backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
    return hadamard(grad, ctx.block), None  # H is symmetric: the transform is its own transpose


# LKD trains the weights of linears on both sides of an online Hadamard (distill_blocks after rotation)
hadamard.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)


def hadamard_matrix(block: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The matrix ``zq.hadamard`` multiplies each block by: H / sqrt(block), symmetric and orthogonal."""
    return hadamard(torch.eye(block, dtype=dtype), block)


# The online Hadamard with the per-token quantization after it folded in (fuse_quant_into_elementwise): the
# compositions of the ops above, rounding where they round (the transform's output is cast to the input's dtype)

@torch.library.custom_op(f"{_LIB}::hadamard_quant", mutates_args=())
def hadamard_quant(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``zq.hadamard(x, block)``, then per-token INT8: (q, scale) (the attention output before o_proj)."""
    return quantize_rows(hadamard(x, block))


@hadamard_quant.register_fake
def _(x, block):
    return _quant_like(x)


@torch.library.custom_op(f"{_LIB}::silu_mul_hadamard_quant", mutates_args=())
def silu_mul_hadamard_quant(gate: Tensor, up: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """SwiGLU ``silu(gate) * up``, ``zq.hadamard`` of it, then per-token INT8: (q, scale) (before down_proj)."""
    return quantize_rows(hadamard(F.silu(gate) * up, block))


@silu_mul_hadamard_quant.register_fake
def _(gate, up, block):
    return _quant_like(gate)


@torch.library.custom_op(f"{_LIB}::gelu_mul_hadamard_quant", mutates_args=())
def gelu_mul_hadamard_quant(gate: Tensor, up: Tensor, approximate: str, block: int) -> tuple[Tensor, Tensor]:
    """GeGLU ``gelu(gate) * up``, ``zq.hadamard`` of it, then per-token INT8: (q, scale)."""
    return quantize_rows(hadamard(F.gelu(gate, approximate=approximate) * up, block))


@gelu_mul_hadamard_quant.register_fake
def _(gate, up, approximate, block):
    return _quant_like(gate)


# ----------------------------------------------------------------------------------------------------
# LoRC (ZeroQuant-V2): a low-rank floating-point correction of a quantized weight's rounding error
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op(f"{_LIB}::low_rank_correction", mutates_args=())
def low_rank_correction(y: Tensor, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``y + (x @ b.T) @ a.T``: the output ``y`` of a quantized linear on input ``x`` (the value the linear reads,
    its dequantized INT8 activation for W*A8) plus the rank-r correction ``x (A B)^T`` of its weight error;
    ``a`` [N, r] and ``b`` [r, K] are stored in FP16 and computed with in x's dtype."""
    return y + ((x @ b.to(x.dtype).T) @ a.to(x.dtype).T).to(y.dtype)


@low_rank_correction.register_fake
def _(y, x, a, b):
    return torch.empty_like(y)


# ----------------------------------------------------------------------------------------------------
# LLM.int8() decomposition: outlier input columns in floating point, the rest INT8
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op(f"{_LIB}::outlier_int8_linear", mutates_args=())
def outlier_int8_linear(x: Tensor, w: Tensor, w_scale: Tensor, columns: Tensor, w_outlier: Tensor,
                        bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """LLM.int8(): the input columns ``columns`` (int64 [C], calibrated offline) of ``x`` times their weight
    columns ``w_outlier`` (FP16 [N, C], computed in x's dtype), plus per-token INT8 of the other columns (their
    scale ignores the outliers) times the INT8 / packed INT4 weight ``w`` (zero in the outlier columns)."""
    q, s = quantize_rows(x.index_fill(-1, columns, 0))
    y = _int_linear_reference(q, s, unpack_weight(w, w_scale), w_scale, bias, out_dtype)
    return y + (x.index_select(-1, columns) @ w_outlier.to(x.dtype).T).to(out_dtype)


@outlier_int8_linear.register_fake
def _(x, w, w_scale, columns, w_outlier, bias, out_dtype):
    return _linear_fake(x, w.shape[0], out_dtype)


# ----------------------------------------------------------------------------------------------------
# Rotary position embedding of queries and keys (cuda target, passes/fuse_rotary_embedding.py)
# ----------------------------------------------------------------------------------------------------

def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return (x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin).contiguous()


@torch.library.custom_op(f"{_LIB}::rotary_embedding", mutates_args=())
def rotary_embedding(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Hugging Face's ``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin`` for the queries ``q`` [B, Hq, S, D]
    and the keys ``k`` [B, Hk, S, D], with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])`` and ``cos`` /
    ``sin`` [B or 1, 1, S or 1, D] of their dtype; each product and the sum rounded to that dtype as eager torch
    rounds them. Contiguous outputs."""
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@rotary_embedding.register_fake
def _(q, k, cos, sin):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op(f"{_LIB}::rotary_embedding_kv_cache", mutates_args=("key_cache", "value_cache"))
def rotary_embedding_kv_cache(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_cache: Tensor,
                              value_cache: Tensor, cache_position: Tensor) -> Tensor:
    """``rotary_embedding(q, k, cos, sin)`` with the rotated keys and the values ``v`` [B, Hk, S, D] written into the
    static KV cache ``[B, Hk, L, D]`` at slots ``cache_position`` [S] (``index_copy_`` along dim 2, in place, as
    zqcompile/kv_cache.py writes it); returns the rotated queries (contiguous)."""
    q_out, k_out = _rotate(q, cos, sin), _rotate(k, cos, sin)
    key_cache.index_copy_(2, cache_position, k_out)
    value_cache.index_copy_(2, cache_position, v)
    return q_out


@rotary_embedding_kv_cache.register_fake
def _(q, k, v, cos, sin, key_cache, value_cache, cache_position):
    return q.new_empty(q.shape)


ACTIVATION_QUANT_OPS = {
    torch.ops.zq.quantize_per_token.default, torch.ops.zq.layernorm_quant.default,
    torch.ops.zq.add_layernorm_quant.default, torch.ops.zq.rmsnorm_quant.default,
    torch.ops.zq.add_rmsnorm_quant.default, torch.ops.zq.gelu_quant.default, torch.ops.zq.silu_mul_quant.default,
    torch.ops.zq.gelu_mul_quant.default,
    torch.ops.zq.relu_quant.default, torch.ops.zq.hadamard_quant.default,
    torch.ops.zq.silu_mul_hadamard_quant.default, torch.ops.zq.gelu_mul_hadamard_quant.default,
}
QUANTIZED_LINEAR_OPS = {
    torch.ops.zq.int8_linear.default, torch.ops.zq.int4_linear.default, torch.ops.zq.weight_only_linear.default,
    torch.ops.zq.outlier_int8_linear.default,
}


class WeightArgs(NamedTuple):
    """Where an op takes its stored quantized weight, the weight's scales, (for a linear) its bias and (INT4) the
    optional group mins of an asymmetric weight, the op's last argument."""

    weight: int
    scale: int
    bias: int | None = None
    w_min: int | None = None

    def min_arg(self, args: tuple) -> object:
        """The mins argument in an op's positional ``args`` (None: a symmetric weight)."""
        return args[self.w_min] if self.w_min is not None and len(args) > self.w_min else None


WEIGHT_ARGS: dict[torch._ops.OpOverload, WeightArgs] = {
    torch.ops.zq.int8_linear.default: WeightArgs(weight=2, scale=3, bias=4),
    torch.ops.zq.int4_linear.default: WeightArgs(weight=2, scale=3, bias=4, w_min=6),
    torch.ops.zq.weight_only_linear.default: WeightArgs(weight=1, scale=2, bias=3, w_min=4),
    torch.ops.zq.dequantize_weight.default: WeightArgs(weight=0, scale=1, w_min=3),
    torch.ops.zq.outlier_int8_linear.default: WeightArgs(weight=1, scale=2, bias=5),
}
