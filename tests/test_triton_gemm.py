"""The Triton INT8/INT4 GEMM (zqcompile/backends/triton_gemm.py).

CPU tests cover the config selection and argument checks; the GPU tests (skipped without a GPU) run every
candidate tile config of each M bucket, for INT8 and INT4 weights, per-channel, output-row groups and
input-dim groups, against a float64 reference of the same integer arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from zqcompile.backends import triton_gemm
from zqcompile.backends.triton_gemm import GemmConfig, candidate_configs, check_linear_args, m_bucket
from zqcompile.errors import ZQError
from zqcompile.quant import expand_weight_scale, pack_int4

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_operands(m: int, n: int, k: int, *, int4: bool, g_out: int, g_in: int, bias: bool, seed: int,
                  device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    qmax = 7 if int4 else 127
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w_q = torch.randint(-qmax, qmax + 1, (n, k), generator=g, dtype=torch.int8)
    x_scale = torch.rand(m, 1, generator=g) * 0.05 + 1e-3
    w_scale = torch.rand(g_out, g_in, generator=g) * 0.02 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    w = pack_int4(w_q) if int4 else w_q
    to = (lambda t: None if t is None else t.to(device))
    return tuple(map(to, (x_q, x_scale, w, w_scale, b))), w_q


def float64_reference(x_q, x_scale, w_q, w_scale, bias) -> torch.Tensor:
    """sum over K of x*w*s_w[col, group(k)], times s_x[row], plus bias, all in float64."""
    n, k = w_q.shape
    w = w_q.double() * expand_weight_scale(w_scale.double(), n, k)
    y = (x_q.double() @ w.T) * x_scale.double()
    return y + bias.double() if bias is not None else y


# ---- CPU: selection and checks ---------------------------------------------------------------------------

def test_m_bucket_is_next_power_of_two_clamped():
    assert [m_bucket(m) for m in (1, 16, 17, 100, 128, 129, 5000, 100000)] == [16, 16, 32, 128, 128, 256, 8192, 8192]


def test_candidate_configs_fit_the_input_dim_groups():
    for cfg in candidate_configs(512, 4096, 64):
        assert cfg.block_k == 64  # a K tile must not straddle two scale groups
    assert all(cfg.block_k <= 256 for cfg in candidate_configs(8, 768, None))
    assert candidate_configs(64, 768, 48) == []  # group width 48 is no multiple of 32: int_mm / reference path
    sizes = {cfg.block_m for cfg in candidate_configs(8, 768, None)}
    assert sizes == {16}  # decode: smallest M tile


def test_check_linear_args_reports_mismatches():
    (x_q, x_scale, w, w_scale, bias), _ = make_operands(4, 8, 64, int4=False, g_out=8, g_in=1, bias=True, seed=0)
    assert check_linear_args(x_q, x_scale, w, w_scale, bias, int4=False).k == 64
    with pytest.raises(ZQError, match="activations must be int8"):
        check_linear_args(x_q.float(), x_scale, w, w_scale, bias, int4=False)
    with pytest.raises(ZQError, match="do not match"):
        check_linear_args(x_q[:, :32], x_scale, w, w_scale, bias, int4=False)
    with pytest.raises(ZQError, match="uint8"):
        check_linear_args(x_q, x_scale, w, w_scale, bias, int4=True)
    with pytest.raises(ZQError, match="weight scale"):
        check_linear_args(x_q, x_scale, w, torch.ones(3, 1), bias, int4=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_triton_gemm_without_gpu_raises():
    (x_q, x_scale, w, w_scale, bias), _ = make_operands(4, 8, 64, int4=False, g_out=8, g_in=1, bias=True, seed=0)
    with pytest.raises(ZQError, match="needs a CUDA GPU"):
        triton_gemm.triton_int_linear(x_q, x_scale, w, w_scale, bias, torch.float16, int4=False)
    with pytest.raises(ZQError, match="needs a CUDA GPU"):
        triton_gemm.register_cuda_kernels()


# ---- GPU: every candidate config against float64 -----------------------------------------------------------

# (M, N, K, G_out as N // rows per group or N, G_in)
GEMM_CASES = [
    (1, 96, 256, "per_channel", 1),
    (16, 128, 768, "per_channel", 1),
    (100, 192, 768, "rows_of_32", 1),
    (300, 256, 512, "per_channel", 8),  # input-dim groups of 64
    (77, 160, 320, "per_channel", 5),  # groups of 64 with a K that is no power of two
    (33, 64, 200, "per_channel", 1),  # K with no power-of-two divisor >= 32: masked K loop
]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("int4", [False, True])
@pytest.mark.parametrize("m,n,k,rows,g_in,out_dtype", [
    *[(*case, torch.float16) for case in GEMM_CASES],
    (100, 192, 768, "rows_of_32", 1, torch.bfloat16),
    (300, 256, 512, "per_channel", 8, torch.float32),
])
def test_every_candidate_config_matches_float64(int4, m, n, k, rows, g_in, out_dtype):
    g_out = n if rows == "per_channel" else n // 32
    (x_q, x_scale, w, w_scale, bias), w_q = make_operands(m, n, k, int4=int4, g_out=g_out, g_in=g_in, bias=True,
                                                          seed=m + n + k, device="cuda")
    ref = float64_reference(x_q.cpu(), x_scale.cpu(), w_q, w_scale.cpu(), bias.cpu())
    configs = candidate_configs(m, k, k // g_in if g_in > 1 else None)
    assert configs, "every case here has a Triton config"
    for cfg in configs:
        y = triton_gemm.triton_int_linear(x_q, x_scale, w, w_scale, bias, out_dtype, int4=int4, config=cfg)
        assert y.dtype == out_dtype and y.shape == (m, n)
        err = ((y.double().cpu() - ref).norm() / ref.norm()).item()
        tol = 1e-6 if out_dtype == torch.float32 else 4e-3
        assert err <= tol, (cfg, err)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("int4", [False, True])
def test_int_mm_fallback_matches_float64(int4):
    (x_q, x_scale, w, w_scale, bias), w_q = make_operands(40, 128, 256, int4=int4, g_out=128, g_in=4, bias=True,
                                                          seed=7, device="cuda")
    ref = float64_reference(x_q.cpu(), x_scale.cpu(), w_q, w_scale.cpu(), bias.cpu())
    y = triton_gemm.int_mm_linear(x_q, x_scale, w, w_scale, bias, torch.float32, int4=int4)
    assert ((y.double().cpu() - ref).norm() / ref.norm()).item() <= 1e-6


@needs_gpu
@pytest.mark.gpu
def test_autotuned_call_with_3d_input_and_no_bias():
    (x_q, x_scale, w, w_scale, _), w_q = make_operands(2 * 48, 256, 768, int4=False, g_out=256, g_in=1,
                                                       bias=False, seed=3, device="cuda")
    y = triton_gemm.triton_int_linear(x_q.view(2, 48, 768), x_scale.view(2, 48, 1), w, w_scale, None,
                                      torch.float16, int4=False)
    ref = float64_reference(x_q.cpu(), x_scale.cpu(), w_q, w_scale.cpu(), None).view(2, 48, 256)
    assert y.shape == (2, 48, 256)
    assert ((y.double().cpu() - ref).norm() / ref.norm()).item() <= 4e-3


@needs_gpu
@pytest.mark.gpu
def test_forced_config_with_huge_tile_still_correct():
    (x_q, x_scale, w, w_scale, bias), w_q = make_operands(5, 64, 128, int4=True, g_out=64, g_in=1, bias=True,
                                                          seed=11, device="cuda")
    y = triton_gemm.triton_int_linear(x_q, x_scale, w, w_scale, bias, torch.float32, int4=True,
                                      config=GemmConfig(128, 128, 128, 8, 3))
    ref = float64_reference(x_q.cpu(), x_scale.cpu(), w_q, w_scale.cpu(), bias.cpu())
    assert ((y.double().cpu() - ref).norm() / ref.norm()).item() <= 1e-6
