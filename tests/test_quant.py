"""zqcompile.quant (the arithmetic under every op and pass) against float64 / int64 references written here.

The references use numpy's round (half to even) on float64 values, so they share no code with torch's
float32 path; where the two can differ by one float32 rounding step we allow a 1-LSB difference on a tiny
fraction of elements and check the error bound |x - q*s| <= s/2 exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zqcompile import ZQError
from zqcompile.quant import (
    dequantize_weight_values, exact_int_matmul, expand_weight_scale, pack_int4, qmax_for_bits, quantize_rows,
    quantize_weight, unpack_int4, unpack_weight, weight_groups,
)


def reference_quantize_rows(x: torch.Tensor, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """float64 token-wise symmetric quantization: (q as int64, scale [..., 1])."""
    xd = x.double().numpy()
    absmax = np.abs(xd).max(axis=-1, keepdims=True)
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    return np.clip(np.round(xd / scale), -qmax, qmax).astype(np.int64), scale


def reference_quantize_weight(w: torch.Tensor, qmax: int, rows_per_group: int, cols_per_group: int
                              ) -> tuple[np.ndarray, np.ndarray]:
    """float64 block-wise symmetric quantization with blocks of rows_per_group x cols_per_group."""
    wd = w.double().numpy()
    n, k = wd.shape
    scale = np.empty((n // rows_per_group, k // cols_per_group))
    q = np.empty((n, k), dtype=np.int64)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = wd[i * rows_per_group:(i + 1) * rows_per_group, j * cols_per_group:(j + 1) * cols_per_group]
            absmax = np.abs(block).max()
            scale[i, j] = absmax / qmax if absmax > 0 else 1.0
            q[i * rows_per_group:(i + 1) * rows_per_group, j * cols_per_group:(j + 1) * cols_per_group] = np.clip(
                np.round(block / scale[i, j]), -qmax, qmax)
    return q, scale


def assert_matches_reference(q: torch.Tensor, q_ref: np.ndarray, min_exact: float = 0.999) -> None:
    """Equal to the float64 reference except, rarely, one step where float32 division lands across a .5 tie."""
    diff = np.abs(q.long().numpy() - q_ref)
    assert diff.max() <= 1
    assert (diff == 0).mean() >= min_exact


# ---- activations: token-wise INT8 -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_rows_matches_float64_reference_and_error_bound(dtype):
    torch.manual_seed(0)
    x = (torch.randn(4, 7, 96) * torch.logspace(-2, 2, 7)[:, None]).to(dtype)
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.shape == x.shape and scale.shape == (4, 7, 1)
    q_ref, scale_ref = reference_quantize_rows(x)
    np.testing.assert_allclose(scale.double().numpy(), scale_ref, rtol=1e-6)
    # 8-bit-mantissa inputs land on exact .5 ties of x/s more often, where float32 and float64 may disagree
    assert_matches_reference(q, q_ref, min_exact=0.999 if dtype == torch.float32 else 0.99)
    # every value is within half a step of its quantized value, and the row max maps to +-127 exactly
    error = (x.double() - q.double() * scale.double()).abs()
    assert bool((error <= scale.double() / 2 * (1 + 1e-5)).all())
    assert q.abs().amax(dim=-1).eq(127).all()


def test_quantize_rows_rounds_half_to_even():
    # absmax 127 gives scale exactly 1.0, so x / scale are these exact ties
    x = torch.tensor([[0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5, 127.0]])
    q, scale = quantize_rows(x)
    assert scale.item() == 1.0
    assert q.tolist() == [[0, 2, 2, 4, 0, -2, -2, 126, 127]]


def test_quantize_rows_all_zero_row_gives_zeros_not_nan():
    x = torch.zeros(3, 16)
    x[1] = torch.linspace(-1, 1, 16)
    q, scale = quantize_rows(x)
    assert torch.isfinite(scale).all()
    assert scale[0].item() == 1.0 and scale[2].item() == 1.0
    assert q[0].eq(0).all() and q[2].eq(0).all()
    assert torch.equal(q[0].float() * scale[0], torch.zeros(16))


def test_quantize_rows_one_huge_outlier():
    torch.manual_seed(1)
    x = torch.randn(2, 64) * 0.01
    x[0, 5] = 1.0e4
    q, scale = quantize_rows(x)
    assert q[0, 5].item() == 127
    assert scale[0].item() == pytest.approx(1.0e4 / 127, rel=1e-6)
    # the small values of the outlier row all collapse to 0, within the s/2 bound; the other row keeps detail
    assert q[0, torch.arange(64) != 5].eq(0).all()
    assert (x[0] - q[0].float() * scale[0]).abs().max().item() <= scale[0].item() / 2
    assert q[1].abs().max().item() == 127 and q[1].unique().numel() > 30


def test_quantize_rows_never_leaves_int8_range_for_extreme_values():
    x = torch.tensor([[3.0e38, -3.0e38, 1.0], [-1e-30, 2e-30, 0.0]])
    q, scale = quantize_rows(x)
    assert torch.isfinite(scale).all()
    assert q.tolist() == [[127, -127, 0], [-64, 127, 0]]


# ---- weights: group-wise INT8 / INT4 ----------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size, input_group_size", [(None, None), (4, None), (None, 16), (8, 32)])
def test_quantize_weight_matches_block_reference(bits, group_size, input_group_size):
    torch.manual_seed(2)
    n, k = 16, 64
    w = torch.randn(n, k) * torch.logspace(-1, 1, n)[:, None]
    q, scale, _ = quantize_weight(w, bits, group_size, input_group_size)
    qmax = 2 ** (bits - 1) - 1
    rows, cols = group_size or 1, input_group_size or k
    q_ref, scale_ref = reference_quantize_weight(w, qmax, rows, cols)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert tuple(scale.shape) == (n // rows, k // cols)
    np.testing.assert_allclose(scale.double().numpy(), scale_ref, rtol=1e-6)
    assert_matches_reference(q, q_ref)
    assert q.abs().max().item() == qmax
    full_scale = expand_weight_scale(scale, n, k).double()
    assert bool(((w.double() - q.double() * full_scale).abs() <= full_scale / 2 * (1 + 1e-5)).all())
    torch.testing.assert_close(dequantize_weight_values(q, scale), (q.double() * full_scale).float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_weight_low_precision_input(dtype):
    torch.manual_seed(3)
    w = torch.randn(8, 32).to(dtype)
    q, scale, _ = quantize_weight(w, 8)
    q_ref, scale_ref = reference_quantize_weight(w, 127, 1, 32)
    np.testing.assert_allclose(scale.double().numpy(), scale_ref, rtol=1e-6)
    assert_matches_reference(q, q_ref, min_exact=0.99)


def test_quantize_weight_all_zero_group_gives_zeros():
    w = torch.randn(8, 32)
    w[2:4] = 0.0
    q, scale, _ = quantize_weight(w, 4, group_size=2)
    assert scale[1, 0].item() == 1.0 and torch.isfinite(scale).all()
    assert q[2:4].eq(0).all()


def test_expand_weight_scale_indexing():
    scale = torch.arange(6, dtype=torch.float32).reshape(2, 3)  # G_out=2, G_in=3
    full = expand_weight_scale(scale, 4, 6)
    for n in range(4):
        for k in range(6):
            assert full[n, k] == scale[n // 2, k // 2]


def test_qmax_for_bits():
    assert qmax_for_bits(8) == 127 and qmax_for_bits(4) == 7
    with pytest.raises(ZQError, match="weight bits must be 4 or 8, got 3"):
        qmax_for_bits(3)


def test_weight_groups_and_its_errors():
    assert weight_groups(768, 3072, None, None) == (768, 1)
    assert weight_groups(768, 3072, 64, 128) == (12, 24)
    with pytest.raises(ZQError, match=r"group_size=5 does not divide out_features=768; choose a divisor of 768"):
        weight_groups(768, 3072, 5, None)
    with pytest.raises(ZQError, match=r"input_group_size=100 does not divide in_features=3072"):
        weight_groups(768, 3072, None, 100)


# ---- INT4 packing -------------------------------------------------------------------------------------------

def test_pack_int4_half_split_layout_with_unsigned_nibbles():
    """Byte j of a group of G holds value j (low nibble) and value j + G/2 (high nibble), as q + 8 (symmetric) or q
    (asymmetric), written out by hand for two groups of 4 values."""
    q = torch.tensor([[1, -1, -8, 7, 0, 2, 3, -5]], dtype=torch.int8)
    packed = pack_int4(q, 4)
    assert packed.dtype == torch.uint8
    # group 0: (1, -8) -> 0x09 | 0x00 << 4, (-1, 7) -> 0x07 | 0x0F << 4; group 1: (0, 3) -> 0x8 | 0xB << 4, (2, -5) ...
    assert packed.tolist() == [[0x09, 0xF7, 0xB8, 0x3A]]
    assert pack_int4(q, 8).tolist() == [[0x89, 0xA7, 0xB0, 0x3F]]  # one group of 8 (no input groups): j and j + 4
    asym = torch.tensor([[0, 15, 3, 9]], dtype=torch.int8)
    assert pack_int4(asym, 4, symmetric=False).tolist() == [[0x30, 0x9F]]


@pytest.mark.parametrize("group_width", [8, 32, 64])
def test_int4_pack_unpack_round_trip_every_pair(group_width):
    values = torch.arange(-8, 8, dtype=torch.int8)
    pairs = torch.cartesian_prod(values, values).to(torch.int8)  # all 256 (value j, value j + G/2) pairs
    half = group_width // 2
    q = torch.cat((pairs[:, 0].reshape(-1, half), pairs[:, 1].reshape(-1, half)), 1)  # one group per row
    packed = pack_int4(q.reshape(-1, 2 * group_width), group_width)  # two groups per row
    assert packed.shape == (q.shape[0] // 2, group_width)
    assert packed.unique().numel() == 256
    assert torch.equal(unpack_int4(packed, group_width).reshape(q.shape), q)
    assert torch.equal(unpack_weight(pack_int4(q, group_width), torch.ones(1, 1)), q)
    assert unpack_weight(q, torch.ones(1, 1)) is q  # INT8 weights are stored as they are
    asym = q + 8
    assert torch.equal(unpack_int4(pack_int4(asym, group_width, symmetric=False), group_width, symmetric=False), asym)


def test_pack_int4_errors():
    with pytest.raises(ZQError, match="INT4 packing needs an even group width dividing in_features, got 3 for 3"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8), 3)
    with pytest.raises(ZQError, match="got 4 for 6"):
        pack_int4(torch.zeros(2, 6, dtype=torch.int8), 4)
    with pytest.raises(ZQError, match=r"INT4 packing got values outside \[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8), 2)


# ---- exact integer GEMM -------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [64, 1024, 2500])
def test_exact_int_matmul_equals_int64_reference(k):
    torch.manual_seed(4)
    a = torch.randint(-127, 128, (9, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (5, k), dtype=torch.int8)
    a[0] = 127  # worst case: every partial sum at its maximum magnitude
    b[0] = 127
    b[1] = -127
    acc = exact_int_matmul(a, b)
    reference = torch.einsum("mk,nk->mn", a.long(), b.long())
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), reference)
    assert acc[0, 0].item() == 127 * 127 * k


# ---- asymmetric INT4 ---------------------------------------------------------------------------------------------

def asymmetric_grid_weight(n: int = 8, k: int = 128, width: int = 32, seed: int = 0) -> torch.Tensor:
    """A weight exactly on an asymmetric 4-bit grid (llama.cpp's Q4_1): w = d * q + m per group of ``width``
    columns, each group using q = 0 and q = 15. d and m have few mantissa bits, so every value, 15 * d and
    (max - min) / 15 are exact in float32."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    q[:, ::width], q[:, 1::width] = 0, 15
    d = torch.randint(1, 64, (n, k // width, 1), generator=g).double() / 1024
    m = torch.randint(-256, 256, (n, k // width, 1), generator=g).double() / 256
    return (q.double().reshape(n, k // width, width) * d + m).reshape(n, k).float()


def test_weight_on_an_asymmetric_grid_round_trips_bit_exactly_with_its_groups_only():
    w = asymmetric_grid_weight()
    q, scale, w_min = quantize_weight(w, 4, input_group_size=32, symmetric=False)
    assert q.min() >= 0 and q.max() <= 15 and w_min.shape == scale.shape == (8, 4)
    assert torch.equal(dequantize_weight_values(q, scale, w_min), w)
    assert torch.equal(unpack_int4(pack_int4(q, 32, symmetric=False), 32, symmetric=False), q)
    # the symmetric grid and coarser asymmetric groups cannot hold it
    assert not torch.equal(dequantize_weight_values(*quantize_weight(w, 4, input_group_size=32)), w)
    assert not torch.equal(dequantize_weight_values(*quantize_weight(w, 4, input_group_size=64, symmetric=False)), w)


def test_asymmetric_quantize_weight_matches_float64_reference():
    torch.manual_seed(3)
    w = torch.randn(16, 64) * torch.logspace(-1, 1, 16)[:, None] + 0.3
    q, scale, w_min = quantize_weight(w, 4, group_size=2, input_group_size=16, symmetric=False)
    blocks = w.double().numpy().reshape(8, 2, 4, 16)
    lo, hi = blocks.min(axis=(1, 3)), blocks.max(axis=(1, 3))
    np.testing.assert_allclose(scale.numpy(), (hi - lo) / 15, rtol=1e-6)
    np.testing.assert_array_equal(w_min.numpy(), lo.astype(np.float32))
    full_scale = expand_weight_scale(scale, 16, 64).double().numpy()
    full_min = expand_weight_scale(w_min, 16, 64).double().numpy()
    expected = np.clip(np.round((w.double().numpy() - full_min) / full_scale), 0, 15)
    assert (q.numpy() != expected).mean() < 0.01 and np.abs(q.numpy() - expected).max() <= 1
    error = np.abs(w.double().numpy() - (q.double().numpy() * full_scale + full_min))
    assert (error <= full_scale / 2 * (1 + 1e-5)).all()


def test_asymmetric_constant_group_and_refusals():
    w = torch.randn(4, 32)
    w[1, :16] = 0.75  # a group of equal values: scale 1, q 0, the min is the value
    q, scale, w_min = quantize_weight(w, 4, input_group_size=16, symmetric=False)
    assert scale[1, 0].item() == 1.0 and w_min[1, 0].item() == 0.75 and q[1, :16].eq(0).all()
    assert torch.equal(dequantize_weight_values(q, scale, w_min)[1, :16], w[1, :16])
    with pytest.raises(ZQError, match=r"asymmetric weights \(weight_symmetric: false\) are INT4 only, got 8 bits"):
        quantize_weight(w, 8, symmetric=False)
    with pytest.raises(ZQError, match=r"INT4 packing got values outside \[0, 15\]"):
        pack_int4(torch.full((2, 4), -1, dtype=torch.int8), 4, symmetric=False)
