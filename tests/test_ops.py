"""Every ``torch.ops.zq`` op against a float64 (or int64) reference written independently in this file.

The references spell the math out (mean/variance LayerNorm, erf/tanh GELU, x * sigmoid(x)), never calling
the torch functional the op itself uses. Each op also passes torch.library.opcheck's schema and fake-tensor
checks, which is what keeps graphs holding it exportable and shape-propagable.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import zqcompile  # noqa: F401  (registers torch.ops.zq)
from zqcompile.quant import pack_int4

zq = torch.ops.zq
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# how far an op computing in `dtype` may be from the float64 reference, relative to the row's absmax
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ---- float64 references ------------------------------------------------------------------------------------

def ref_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float):
    xd = x.double()
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    y = (xd - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    return y + bias.double() if bias is not None else y


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xd = x.double()
    return weight.double() * xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps)


def ref_gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    xd = x.double()
    if approximate == "tanh":
        return 0.5 * xd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))
    return 0.5 * xd * (1 + torch.erf(xd / math.sqrt(2)))


def ref_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g = gate.double()
    return g / (1 + torch.exp(-g)) * up.double()


def ref_int_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """sum_k x_q[m,k] w_q[n,k] s_x[m] s_w[n-group, k-group] + b[n], each product in float64."""
    k = x_q.shape[-1]
    n = w_q.shape[0]
    g_out, g_in = w_scale.shape
    full_scale = w_scale.double()[torch.arange(n) // (n // g_out)][:, torch.arange(k) // (k // g_in)]  # [N, K]
    w = w_q.double() * full_scale
    y = torch.einsum("...k,nk->...n", x_q.double(), w) * x_scale.double()
    return y + bias.double() if bias is not None else y


def assert_token_quantized(q: torch.Tensor, scale: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype):
    """(q, scale) is the token-wise INT8 quantization of the float64 ``reference`` (up to ``dtype`` rounding)."""
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.shape == reference.shape and scale.shape == (*reference.shape[:-1], 1)
    tol = REL_TOL[dtype]
    absmax = reference.abs().amax(-1, keepdim=True)
    expected_scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))  # all-zero token: scale 1
    torch.testing.assert_close(scale.double(), expected_scale, rtol=4 * tol, atol=0)
    error = (reference - q.double() * scale.double()).abs()
    assert bool((error <= scale.double() / 2 + tol * absmax).all())
    if dtype == torch.float32:
        assert (q.long() == torch.round(reference / scale.double()).long()).double().mean() >= 0.995


def random_int8(*shape: int, low: int = -127, high: int = 127) -> torch.Tensor:
    return torch.randint(low, high + 1, shape, dtype=torch.int8)


# ---- token-wise quantize / dequantize ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_token(dtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 5, 48) * 3).to(dtype)
    x[0, 1] = 0.0  # an all-zero token
    q, scale = zq.quantize_per_token(x)
    assert_token_quantized(q, scale, x.double(), torch.float32)  # exact input, so float32-level agreement
    assert q[0, 1].eq(0).all() and scale[0, 1].item() == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_per_token_is_q_times_scale(dtype):
    q = random_int8(3, 4, 16)
    scale = torch.rand(3, 4, 1) + 0.01
    x = zq.dequantize_per_token(q, scale, dtype)
    assert x.dtype == dtype
    torch.testing.assert_close(x, (q.double() * scale.double()).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_weight(bits, dtype):
    torch.manual_seed(1)
    qmax = 2 ** (bits - 1) - 1
    w_q = random_int8(8, 32, low=-qmax, high=qmax)
    w_scale = torch.rand(4, 2) + 0.1  # 2 rows x 16 columns per group
    stored = pack_int4(w_q, 16) if bits == 4 else w_q
    w = zq.dequantize_weight(stored, w_scale, dtype)
    reference = ref_int_linear(torch.eye(32, dtype=torch.int8), torch.ones(32, 1), w_q, w_scale, None).T
    assert w.dtype == dtype and w.shape == (8, 32)
    torch.testing.assert_close(w.double(), reference, rtol=REL_TOL[dtype], atol=0)


# ---- integer GEMMs --------------------------------------------------------------------------------------

def test_int8_linear_accumulates_exactly():
    """With unit scales the output is the integer dot product itself (exact in float32 below 2**24)."""
    torch.manual_seed(2)
    x_q = random_int8(7, 256)
    w_q = random_int8(12, 256)
    x_q[0] = 127
    w_q[0] = -127
    y = zq.int8_linear(x_q, torch.ones(7, 1), w_q, torch.ones(12, 1), None, torch.float32)
    reference = torch.einsum("mk,nk->mn", x_q.long(), w_q.long())
    assert torch.equal(y.long(), reference)
    assert y[0, 0].item() == -127 * 127 * 256


@pytest.mark.parametrize("w_scale_shape", [(16, 1), (4, 1), (16, 4), (2, 2)],
                         ids=["per-channel", "output-row-groups", "input-dim-groups", "both-groups"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_linear_matches_float64_reference(w_scale_shape, with_bias):
    torch.manual_seed(3)
    x_q = random_int8(2, 5, 128)  # 3-D activations: [batch, seq, K]
    x_scale = torch.rand(2, 5, 1) * 0.1 + 1e-3
    w_q = random_int8(16, 128)
    w_scale = torch.rand(*w_scale_shape) * 0.01 + 1e-4
    bias = torch.randn(16) if with_bias else None
    y = zq.int8_linear(x_q, x_scale, w_q, w_scale, bias, torch.float32)
    assert y.shape == (2, 5, 16) and y.dtype == torch.float32
    reference = ref_int_linear(x_q, x_scale, w_q, w_scale, bias)
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_int8_linear_low_precision_output(out_dtype):
    torch.manual_seed(4)
    x_q, w_q = random_int8(6, 64), random_int8(8, 64)
    x_scale, w_scale = torch.rand(6, 1) * 0.05, torch.rand(8, 1) * 0.05
    bias = torch.randn(8).to(out_dtype)
    y = zq.int8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    assert y.dtype == out_dtype
    reference = ref_int_linear(x_q, x_scale, w_q, w_scale, bias)
    torch.testing.assert_close(y.double(), reference, rtol=REL_TOL[out_dtype], atol=REL_TOL[out_dtype])


@pytest.mark.parametrize("w_scale_shape", [(8, 1), (8, 4)], ids=["per-channel", "input-dim-groups"])
def test_int4_linear_matches_reference_and_int8_path(w_scale_shape):
    torch.manual_seed(5)
    x_q, x_scale = random_int8(4, 3, 64), torch.rand(4, 3, 1) * 0.1
    w_q = random_int8(8, 64, low=-7, high=7)
    w_scale = torch.rand(*w_scale_shape) * 0.1
    bias = torch.randn(8)
    y = zq.int4_linear(x_q, x_scale, pack_int4(w_q, 64 // w_scale_shape[1]), w_scale, bias, torch.float32)
    assert y.shape == (4, 3, 8)
    torch.testing.assert_close(y, zq.int8_linear(x_q, x_scale, w_q, w_scale, bias, torch.float32), rtol=0, atol=0)
    reference = ref_int_linear(x_q, x_scale, w_q, w_scale, bias)
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_only_linear(bits, dtype):
    torch.manual_seed(6)
    qmax = 2 ** (bits - 1) - 1
    x = torch.randn(3, 5, 32).to(dtype)
    w_q = random_int8(12, 32, low=-qmax, high=qmax)
    w_scale = torch.rand(12, 2) * 0.05 + 0.01
    bias = torch.randn(12).to(dtype)
    y = zq.weight_only_linear(x, pack_int4(w_q, 16) if bits == 4 else w_q, w_scale, bias)
    assert y.dtype == dtype and y.shape == (3, 5, 12)
    w = ref_int_linear(torch.eye(32, dtype=torch.int8), torch.ones(32, 1), w_q, w_scale, None).T
    reference = x.double() @ w.T + bias.double()
    tol = 4 * REL_TOL[dtype] * reference.abs().max().item()
    torch.testing.assert_close(y.double(), reference, rtol=0, atol=tol)


# ---- fused elementwise + quant ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_quant(dtype, affine):
    torch.manual_seed(7)
    x = (torch.randn(2, 6, 64) * 4 + 1).to(dtype)
    weight = (torch.rand(64) + 0.5).to(dtype) if affine else None
    bias = torch.randn(64).to(dtype) if affine else None
    y, q, scale = zq.layernorm_quant(x, weight, bias, 1e-5)
    reference = ref_layer_norm(x, weight, bias, 1e-5)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), reference, rtol=0, atol=4 * REL_TOL[dtype] * reference.abs().max())
    assert_token_quantized(q, scale, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layernorm_quant(dtype):
    torch.manual_seed(8)
    x, residual = torch.randn(3, 4, 64).to(dtype), (torch.randn(3, 4, 64) * 10).to(dtype)
    weight, bias = (torch.rand(64) + 0.5).to(dtype), torch.randn(64).to(dtype)
    y, q, scale = zq.add_layernorm_quant(x, residual, weight, bias, 1e-12)
    # the sum happens in the input dtype, as in the unfused graph
    reference = ref_layer_norm((x + residual).double(), weight, bias, 1e-12)
    torch.testing.assert_close(y.double(), reference, rtol=0, atol=4 * REL_TOL[dtype] * reference.abs().max())
    assert_token_quantized(q, scale, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_quant(dtype):
    torch.manual_seed(9)
    x = (torch.randn(2, 5, 64) * 3).to(dtype)
    x[1, 2] = 0.0  # an all-zero token normalises to zeros: quantized zeros, never NaN
    weight = (torch.rand(64) + 0.5).to(dtype)
    y, q, scale = zq.rmsnorm_quant(x, weight, 1e-6)
    reference = ref_rms_norm(x, weight, 1e-6)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), reference, rtol=0, atol=4 * REL_TOL[dtype] * reference.abs().max())
    assert_token_quantized(q, scale, reference, dtype)
    assert torch.isfinite(scale).all() and q[1, 2].eq(0).all()


def test_rmsnorm_quant_float32_weight_on_bf16_input_promotes_like_llama():
    """Llama computes ``weight * hidden.to(input_dtype)``: an fp32 weight makes an fp32 output."""
    x = torch.randn(2, 32).to(torch.bfloat16)
    y, _, _ = zq.rmsnorm_quant(x, torch.rand(32), 1e-6)
    assert y.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_quant_weight_first_is_gemmas_one_plus_w_norm(dtype):
    """Gemma: float32 statistics times the float32 (1 + w), then one cast to the input dtype."""
    torch.manual_seed(14)
    x = (torch.randn(2, 5, 64) * 3).to(dtype)
    w = torch.randn(64).to(dtype) * 0.3
    y, q, scale = zq.rmsnorm_quant(x, w.float() + 1.0, 1e-6, True)
    reference = ref_rms_norm(x, w.double() + 1.0, 1e-6)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), reference, rtol=0, atol=2 * REL_TOL[dtype] * reference.abs().max())
    assert_token_quantized(q, scale, reference, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_quant(dtype):
    x = (torch.randn(3, 4, 64) * 2).to(dtype)
    x[2, 1] = -1.0  # all negative: zeros with scale 1
    q, scale = zq.relu_quant(x)
    assert_token_quantized(q, scale, x.double().clamp_min(0), dtype)
    assert q[2, 1].eq(0).all() and scale[2, 1].item() == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_mul_quant(dtype, approximate):
    torch.manual_seed(15)
    gate, up = (torch.randn(2, 7, 64) * 2).to(dtype), torch.randn(2, 7, 64).to(dtype)
    q, scale = zq.gelu_mul_quant(gate, up, approximate)
    assert_token_quantized(q, scale, ref_gelu(gate, approximate) * up.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gelu_quant(dtype, approximate, with_bias):
    torch.manual_seed(10)
    x = (torch.randn(4, 3, 64) * 2).to(dtype)
    bias = torch.randn(64).to(dtype) if with_bias else None
    q, scale = zq.gelu_quant(x, bias, approximate)
    pre = (x + bias) if with_bias else x  # the bias add happens in the input dtype
    assert_token_quantized(q, scale, ref_gelu(pre, approximate), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_quant(dtype):
    torch.manual_seed(11)
    gate, up = (torch.randn(2, 7, 64) * 2).to(dtype), torch.randn(2, 7, 64).to(dtype)
    up[0, 3] = 0.0
    q, scale = zq.silu_mul_quant(gate, up)
    assert_token_quantized(q, scale, ref_silu_mul(gate, up), dtype)
    assert q[0, 3].eq(0).all() and scale[0, 3].item() == 1.0


def test_fused_quant_with_one_huge_outlier_token():
    """One huge value in a token (the case ZeroQuant's token-wise scales are for) leaves other tokens exact."""
    torch.manual_seed(12)
    gate, up = torch.randn(3, 64), torch.randn(3, 64)
    gate[1, 7], up[1, 7] = 100.0, 500.0
    q, scale = zq.silu_mul_quant(gate, up)
    assert q[1, 7].item() == 127
    assert scale[1].item() == pytest.approx(100 / (1 + math.exp(-100)) * 500 / 127, rel=1e-5)
    for token in (0, 2):  # untouched by the outlier in token 1
        assert q[token].abs().max().item() == 127
    assert_token_quantized(q, scale, ref_silu_mul(gate, up), torch.float32)


# ---- fake kernels (export, shape propagation) ----------------------------------------------------------------

def _opcheck_cases():
    torch.manual_seed(13)
    x = torch.randn(2, 3, 32)
    x_q, x_scale = random_int8(2, 3, 32), torch.rand(2, 3, 1)
    w_q, w_packed, w_scale = random_int8(8, 32), pack_int4(random_int8(8, 32, low=-7, high=7), 16), torch.rand(8, 2)
    weight, bias = torch.rand(32), torch.randn(32)
    return {
        "quantize_per_token": (x,),
        "dequantize_per_token": (x_q, x_scale, torch.float16),
        "dequantize_weight": (w_packed, w_scale, torch.float32),
        "int8_linear": (x_q, x_scale, w_q, w_scale, torch.randn(8), torch.float32),
        "int4_linear": (x_q, x_scale, w_packed, w_scale, None, torch.bfloat16),
        "weight_only_linear": (x, w_packed, w_scale, torch.randn(8)),
        "layernorm_quant": (x, weight, bias, 1e-5),
        "add_layernorm_quant": (x, x * 2, None, None, 1e-5),
        "rmsnorm_quant": (x, weight, 1e-6),
        "gelu_quant": (x, bias, "tanh"),
        "silu_mul_quant": (x, x + 1),
        "rmsnorm_quant_weight_first": (x, weight, 1e-6, True),
        "relu_quant": (x,),
        "gelu_mul_quant": (x, x + 1, "tanh"),
        "hadamard_quant": (x, 16),
        "silu_mul_hadamard_quant": (x, x + 1, 32),
        "gelu_mul_hadamard_quant": (x, x + 1, "none", 8),
        "add_rmsnorm_quant": (x, x * 2, weight, 1e-6),
        "add_rmsnorm_quant_weight_first": (x, x * 2, weight, 1e-6, True),
        "add_rmsnorm": (x, x * 2, weight, 1e-6),
        "rotary_embedding_kv_cache": (x.view(2, 4, 3, 8), x.view(2, 4, 3, 8)[:, :2], x.view(2, 4, 3, 8)[:, 2:],
                                      x[:, None, :, :8], x[:, None, :, 8:16], torch.zeros(2, 2, 5, 8),
                                      torch.zeros(2, 2, 5, 8), torch.tensor([0, 3, 4])),
    }


@pytest.mark.parametrize("op_name", list(_opcheck_cases()))
def test_fake_kernel_matches_reference_shapes(op_name):
    opcheck(getattr(zq, op_name.removesuffix("_weight_first")).default, _opcheck_cases()[op_name], test_utils=("test_schema", "test_faketensor"))


# ---- asymmetric INT4 (a float min per group) --------------------------------------------------------------------

def asym_int4_case(n: int = 8, k: int = 64, width: int = 32, seed: int = 9):
    """Random asymmetric INT4 integers in [0, 15], their packed form, scales and mins [N, K / width]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, k // width, generator=g) * 0.1 + 0.01
    w_min = torch.randn(n, k // width, generator=g)
    return q, pack_int4(q, width, symmetric=False), w_scale, w_min


def ref_asym_weight(q: torch.Tensor, w_scale: torch.Tensor, w_min: torch.Tensor) -> torch.Tensor:
    """float64 s * q + min, each group's scale and min repeated over its columns by hand."""
    width = q.shape[1] // w_scale.shape[1]
    return (q.double() * w_scale.double().repeat_interleave(width, 1)
            + w_min.double().repeat_interleave(width, 1))


def test_asymmetric_int4_linear_is_the_float64_product_of_the_same_integers():
    q, packed, w_scale, w_min = asym_int4_case()
    x_q, x_scale = random_int8(5, 64), torch.rand(5, 1) * 0.1
    bias = torch.randn(8)
    y = zq.int4_linear(x_q, x_scale, packed, w_scale, bias, torch.float32, w_min)
    reference = x_q.double() @ ref_asym_weight(q, w_scale, w_min).T * x_scale.double() + bias.double()
    torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    # the mins matter: the same integers without them are the symmetric-offset product
    assert not torch.allclose(y, zq.int4_linear(x_q, x_scale, packed, w_scale, bias, torch.float32), atol=1e-3)


def test_asymmetric_int4_linear_is_exact_per_group_integer_arithmetic():
    """y = s_x * sum_g (s_w[g] * sum_{k in g} x_q q + min[g] * sum_{k in g} x_q): with power-of-two scales and
    mins every term is exact in float32, so the op must equal the int64 arithmetic bit for bit."""
    q, packed, _, _ = asym_int4_case(n=6, k=96, width=32, seed=3)
    g = torch.Generator().manual_seed(4)
    w_scale = 2.0 ** torch.randint(-6, -2, (6, 3), generator=g).float()
    w_min = -(2.0 ** torch.randint(-4, 0, (6, 3), generator=g).float())
    x_q = random_int8(4, 96)
    x_scale = torch.full((4, 1), 0.125)
    y = zq.int4_linear(x_q, x_scale, packed, w_scale, None, torch.float32, w_min)
    groups = x_q.long().reshape(4, 1, 3, 32)
    acc = (groups * q.long().reshape(1, 6, 3, 32)).sum(-1)  # [M, N, G] exact integer sums
    asum = groups.sum(-1)  # [M, 1, G]
    expected = 0.125 * (acc.double() * w_scale.double() + asum.double() * w_min.double()).sum(-1)
    assert torch.equal(y.double(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_asymmetric_weight_only_linear_and_dequantize_weight(dtype):
    q, packed, w_scale, w_min = asym_int4_case(n=12, k=64, width=32)
    weight = ref_asym_weight(q, w_scale, w_min)
    dequantized = zq.dequantize_weight(packed, w_scale, torch.float64, w_min)
    torch.testing.assert_close(dequantized, weight, rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 5, 64).to(dtype)
    bias = torch.randn(12).to(dtype)
    y = zq.weight_only_linear(x, packed, w_scale, bias, w_min)
    assert y.dtype == dtype and y.shape == (3, 5, 12)
    reference = x.double() @ weight.T + bias.double()
    torch.testing.assert_close(y.double(), reference, rtol=0, atol=4 * REL_TOL[dtype] * reference.abs().max().item())


@pytest.mark.parametrize("op_name", ["dequantize_weight", "int4_linear", "weight_only_linear"])
def test_fake_kernels_take_the_asymmetric_mins(op_name):
    _, packed, w_scale, w_min = asym_int4_case()
    x_q, x_scale = random_int8(2, 3, 64), torch.rand(2, 3, 1)
    args = {"dequantize_weight": (packed, w_scale, torch.float32, w_min),
            "int4_linear": (x_q, x_scale, packed, w_scale, None, torch.float16, w_min),
            "weight_only_linear": (torch.randn(2, 3, 64), packed, w_scale, None, w_min)}[op_name]
    opcheck(getattr(zq, op_name).default, args, test_utils=("test_schema", "test_faketensor"))
