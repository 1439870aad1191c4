"""NaN and Inf go through quantization where the floating-point model has them (issue 12).

Integer values cannot hold a NaN, so a token row (or weight group) holding a NaN or an Inf gets a NaN scale and
dequantizes to NaN: the quantized model is non-finite exactly where the FP model is, and every other row is
unchanged (bit for bit against the same computation on the clean input). Checked per op on the reference
kernels, end to end on compiled models against the FP model, and (GPU tests) on the CUDA kernels, whose logic
tests/test_numba_kernels.py also checks in the CUDA simulator.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zqcompile
from zqcompile import ops
from zqcompile.quant import quantize_weight

from helpers import TINY_HIDDEN, make_tiny_bert, make_tiny_mlp, token_batch

NAN_ROW, INF_ROW = 1, 2  # rows 0 and 3 stay finite
FINITE_ROWS = [0, 3]


def planted(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[NAN_ROW, 5] = float("nan")
    x[INF_ROW, 3] = float("-inf")
    return x


def row_nonfinite(t: torch.Tensor) -> torch.Tensor:
    """Per row of the leading dim: does it hold any NaN or Inf?"""
    return ~torch.isfinite(t).reshape(t.shape[0], -1).all(dim=-1)


def _cases(x: torch.Tensor, other: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """(name, quantized op output -> dequantized float, FP equivalent) for every op that quantizes activations."""
    def deq(out):
        return out[-2].float() * out[-1]
    return [
        ("quantize_per_token", deq(ops.quantize_per_token(x)), x),
        ("layernorm_quant", deq(ops.layernorm_quant(x, w, b, 1e-5)), F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)),
        ("add_layernorm_quant", deq(ops.add_layernorm_quant(x, other, w, b, 1e-5)),
         F.layer_norm(x + other, (x.shape[-1],), w, b, 1e-5)),
        ("rmsnorm_quant", deq(ops.rmsnorm_quant(x, w, 1e-6)),
         x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w),
        ("gelu_quant", deq(ops.gelu_quant(x, b, "tanh")), F.gelu(x + b, approximate="tanh")),
        ("silu_mul_quant", deq(ops.silu_mul_quant(x, other)), F.silu(x) * other),
    ]


def test_activation_quant_ops_are_non_finite_exactly_where_fp_is():
    g = torch.Generator().manual_seed(0)
    clean, other = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    for (name, got, fp), (_, got_clean, _) in zip(_cases(planted(clean), other, w, b), _cases(clean, other, w, b)):
        assert torch.equal(row_nonfinite(got), row_nonfinite(fp)), name
        assert row_nonfinite(got).tolist() == [False, True, True, False], name
        assert torch.isnan(got[[NAN_ROW, INF_ROW]]).all(), name  # the NaN scale makes the whole row NaN
        assert torch.equal(got[FINITE_ROWS], got_clean[FINITE_ROWS]), name


def test_zero_row_keeps_scale_one():
    q, scale = ops.quantize_per_token(torch.zeros(2, 8))
    assert scale.flatten().tolist() == [1.0, 1.0] and not q.any()


@pytest.mark.parametrize("op", ["int8_linear", "int4_linear", "weight_only_linear"])
def test_linear_ops_propagate_non_finite_activation_rows(op):
    g = torch.Generator().manual_seed(1)
    clean, weight = torch.randn(4, 64, generator=g), torch.randn(16, 64, generator=g)
    bias = torch.randn(16, generator=g)
    x = planted(clean)
    fp = F.linear(x, weight, bias)
    bits = 4 if op == "int4_linear" else 8
    w_q, w_scale, _ = quantize_weight(weight, bits)
    if bits == 4:
        from zqcompile.quant import pack_int4
        w_q = pack_int4(w_q, w_q.shape[1])

    def run(inp):
        if op == "weight_only_linear":
            return ops.weight_only_linear(inp, w_q, w_scale, bias)
        return getattr(ops, op)(*ops.quantize_per_token(inp), w_q, w_scale, bias, torch.float32)
    got, got_clean = run(x), run(clean)
    assert torch.equal(row_nonfinite(got), row_nonfinite(fp))
    assert torch.equal(got[FINITE_ROWS], got_clean[FINITE_ROWS])


def test_nan_weight_group_gives_nan_outputs_of_that_group_only():
    weight = torch.randn(8, 16)
    weight[2, 7] = float("nan")
    q, scale, _ = quantize_weight(weight, 8)
    assert torch.isnan(scale[2]).all() and torch.isfinite(scale[[0, 1, 3, 4, 5, 6, 7]]).all()
    y = ops.int8_linear(*ops.quantize_per_token(torch.randn(3, 16)), q, scale, None, torch.float32)
    assert torch.equal(~torch.isfinite(y).all(dim=0), ~torch.isfinite(F.linear(torch.randn(3, 16), weight)).all(dim=0))


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w8a16"])
def test_compiled_mlp_matches_fp_non_finite_rows(recipe):
    model = make_tiny_mlp()
    qmodel = zqcompile.compile(model, recipe, example_inputs=(torch.randn(4, TINY_HIDDEN),))
    clean = torch.randn(4, TINY_HIDDEN)
    x = planted(clean)
    with torch.no_grad():
        fp, got, got_clean = model(x), qmodel(x), qmodel(clean)
    assert torch.equal(row_nonfinite(got), row_nonfinite(fp))
    assert row_nonfinite(fp).tolist() == [False, True, True, False]
    assert torch.equal(got[FINITE_ROWS], got_clean[FINITE_ROWS])


def assert_poisoned_token_agrees(recipe: str, device: str, dtype: torch.dtype, seq: int) -> None:
    """A NaN embedding row for token 7: the FP model gives NaN for the whole sequence holding it (attention mixes
    its tokens) and finite values for the other sequences; the compiled model must agree."""
    model = make_tiny_bert().to(device, dtype)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[7] = float("nan")
    qmodel = zqcompile.compile(model, recipe, backend="cuda" if device == "cuda" else "cpu")
    ids = token_batch(3, seq, seed=2).clamp_min(8).to(device)
    ids[1, 4] = 7
    with torch.no_grad():
        fp = model(input_ids=ids).last_hidden_state
        got = qmodel(input_ids=ids).last_hidden_state
    assert row_nonfinite(fp).tolist() == [False, True, False]
    assert torch.equal(~torch.isfinite(got), ~torch.isfinite(fp))


@pytest.mark.parametrize("recipe", ["w8a8", "w8a16"])
def test_compiled_bert_matches_fp_on_a_poisoned_token(recipe):
    assert_poisoned_token_agrees(recipe, "cpu", torch.float32, seq=6)


# ---- GPU: the CUDA kernels ------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_kernels_propagate_non_finite_rows(dtype):
    from zqcompile.backends import reference_kernels, register_cuda_kernels

    register_cuda_kernels()
    g = torch.Generator().manual_seed(3)
    # rows of 768 and 3072 (BERT-base widths: several words per thread, both reductions' shared-memory step)
    for width in (768, 3072):
        clean = torch.randn(4, width, generator=g).to(dtype).cuda()
        other = torch.randn(4, width, generator=g).to(dtype).cuda()
        w, b = torch.randn(width, generator=g).to(dtype).cuda(), torch.randn(width, generator=g).to(dtype).cuda()
        x = planted(clean)
        for (name, got, fp), (_, got_clean, _) in zip(_cases(x, other, w, b), _cases(clean, other, w, b)):
            with reference_kernels():
                (_, ref, _), = [c for c in _cases(x, other, w, b) if c[0] == name]
            assert torch.equal(row_nonfinite(got), row_nonfinite(fp.float())), (name, width)
            assert torch.isnan(got[[NAN_ROW, INF_ROW]]).all() and torch.isnan(ref[[NAN_ROW, INF_ROW]]).all(), name
            assert torch.equal(got[FINITE_ROWS], got_clean[FINITE_ROWS]), (name, width)
        w_q, w_scale, _ = quantize_weight(torch.randn(256, width, generator=g), 8)
        y = ops.int8_linear(*ops.quantize_per_token(x), w_q.cuda(), w_scale.cuda(), None, dtype)  # Triton GEMM
        assert row_nonfinite(y).tolist() == [False, True, True, False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_bert_matches_fp_on_a_poisoned_token():
    assert_poisoned_token_agrees("w8a8", "cuda", torch.float16, seq=16)
