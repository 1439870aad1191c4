"""The Triton INT8/INT4 GEMM (zqcompile/backends/triton_gemm.py).

CPU tests cover the config selection, the TMA operand checks and argument checks; the GPU tests (skipped
without a GPU) run every candidate tile config of each M bucket (the persistent TMA kernel's too, on sm_90),
for INT8 and INT4 weights, per-channel, output-row groups and input-dim groups, against a float64 reference
of the same integer arithmetic.
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
    w = pack_int4(w_q, k // g_in) if int4 else w_q
    to = (lambda t: None if t is None else t.to(device))
    return tuple(map(to, (x_q, x_scale, w, w_scale, b))), w_q


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of a (GPU) result against a float64 CPU reference."""
    return ((y.double().cpu() - ref).norm() / ref.norm()).item()


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


def test_tma_configs_only_where_the_tma_kernel_applies():
    large = candidate_configs(4096, 3072, None, tma=True)
    assert large[0].kernel == "tma_persistent"  # the untuned default at large M
    assert {cfg.kernel for cfg in large} == {"tma_persistent", "tiled"}
    medium = candidate_configs(64, 768, None, tma=True)
    assert medium[0].kernel == "tiled" and {cfg.kernel for cfg in medium} == {"tma_persistent", "tiled"}
    assert {cfg.kernel for cfg in candidate_configs(4096, 3072, None)} == {"tiled"}
    assert {cfg.kernel for cfg in candidate_configs(8, 768, None, tma=True)} == {"tiled"}  # decode: weight-bound
    assert {cfg.kernel for cfg in candidate_configs(4096, 512, 64, tma=True)} == {"tiled"}  # input-dim groups
    for cfg in large:
        assert cfg.kernel == "tma_persistent" or (not cfg.subtile and cfg.ctas_per_sm == 1)


def test_tma_operands_need_16_byte_alignment():
    ok = torch.zeros(8, 64, dtype=torch.int8)
    assert triton_gemm.tma_operands_ok(ok, torch.zeros(4, 8, dtype=torch.float16))
    assert not triton_gemm.tma_operands_ok(torch.zeros(8, 40, dtype=torch.int8))  # 40-byte row pitch
    assert not triton_gemm.tma_operands_ok(torch.zeros(8 * 64 + 1, dtype=torch.int8)[1:].view(8, 64))  # base
    assert not triton_gemm.tma_operands_ok(torch.zeros(64, 64, dtype=torch.int8).t())  # not row-major
    assert not triton_gemm.tma_operands_ok(torch.zeros(4, 12, dtype=torch.float16))  # 24-byte row pitch
    assert triton_gemm.tma_operands_ok(torch.zeros(4, 12, dtype=torch.float32)[:, :8])  # 48-byte pitch, strided
    assert not triton_gemm.tma_kernel_applies(ok, ok, ok, int4=False, g_in=1)  # CPU tensors: no TMA


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
    (300, 160, 336, "rows_of_32", 1),  # TMA kernel: partial tiles in M, N and K (K = 16 * 21)
    (130, 64, 96, "per_channel", 1),  # K tiles of 32 (32-byte TMA boxes)
]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("int4", [False, True])
@pytest.mark.parametrize("m,n,k,rows,g_in,out_dtype", [
    *[(*case, torch.float16) for case in GEMM_CASES],
    (100, 192, 768, "rows_of_32", 1, torch.bfloat16),
    (300, 256, 512, "per_channel", 8, torch.float32),
    (300, 160, 336, "rows_of_32", 1, torch.float32),
])
def test_every_candidate_config_matches_float64(int4, m, n, k, rows, g_in, out_dtype):
    g_out = n if rows == "per_channel" else n // 32
    (x_q, x_scale, w, w_scale, bias), w_q = make_operands(m, n, k, int4=int4, g_out=g_out, g_in=g_in, bias=True,
                                                          seed=m + n + k, device="cuda")
    ref = float64_reference(x_q.cpu(), x_scale.cpu(), w_q, w_scale.cpu(), bias.cpu())
    tma = triton_gemm.tma_kernel_applies(x_q, w, torch.empty(m, n, dtype=out_dtype, device="cuda"), int4=int4,
                                         g_in=g_in)
    configs = candidate_configs(m, k, k // g_in if g_in > 1 else None, tma=tma)
    assert configs, "every case here has a Triton config"
    for cfg in configs:
        y = triton_gemm.triton_int_linear(x_q, x_scale, w, w_scale, bias, out_dtype, int4=int4, config=cfg)
        assert y.dtype == out_dtype and y.shape == (m, n)
        err = rel_err(y, ref)
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
    assert rel_err(y, ref) <= 1e-6


@needs_gpu
@pytest.mark.gpu
def test_autotuned_call_with_3d_input_and_no_bias():
    (x_q, x_scale, w, w_scale, _), w_q = make_operands(2 * 48, 256, 768, int4=False, g_out=256, g_in=1,
                                                       bias=False, seed=3, device="cuda")
    y = triton_gemm.triton_int_linear(x_q.view(2, 48, 768), x_scale.view(2, 48, 1), w, w_scale, None,
                                      torch.float16, int4=False)
    ref = float64_reference(x_q.cpu(), x_scale.cpu(), w_q, w_scale.cpu(), None).view(2, 48, 256)
    assert y.shape == (2, 48, 256)
    assert rel_err(y, ref) <= 4e-3


@needs_gpu
@pytest.mark.gpu
def test_forced_config_with_huge_tile_still_correct():
    (x_q, x_scale, w, w_scale, bias), w_q = make_operands(5, 64, 128, int4=True, g_out=64, g_in=1, bias=True,
                                                          seed=11, device="cuda")
    y = triton_gemm.triton_int_linear(x_q, x_scale, w, w_scale, bias, torch.float32, int4=True,
                                      config=GemmConfig(128, 128, 128, 8, 3))
    ref = float64_reference(x_q.cpu(), x_scale.cpu(), w_q, w_scale.cpu(), bias.cpu())
    assert rel_err(y, ref) <= 1e-6


needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                                  reason="needs a Hopper (sm_90) GPU: the TMA kernel")


@needs_hopper
@pytest.mark.gpu
def test_tma_kernel_inside_cuda_graph_capture():
    (x_q, x_scale, w, w_scale, bias), w_q = make_operands(200, 256, 512, int4=False, g_out=256, g_in=1, bias=True,
                                                          seed=5, device="cuda")
    ref = float64_reference(x_q.cpu(), x_scale.cpu(), w_q, w_scale.cpu(), bias.cpu())
    cfg = next(cfg for cfg in candidate_configs(200, 512, None, tma=True) if cfg.kernel == "tma_persistent")
    run = lambda: triton_gemm.triton_int_linear(x_q, x_scale, w, w_scale, bias, torch.float16,
                                                int4=False, config=cfg)
    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, ref) <= 4e-3


@needs_hopper
@pytest.mark.gpu
def test_misaligned_activations_use_the_tiled_kernel():
    (x_q, x_scale, w, w_scale, bias), w_q = make_operands(64, 128, 256, int4=False, g_out=128, g_in=1, bias=True,
                                                          seed=9, device="cuda")
    shifted = torch.empty(64 * 256 + 1, dtype=torch.int8, device="cuda")[1:].view(64, 256)
    shifted.copy_(x_q)  # same values, base address 1 byte past a 16-byte boundary
    tma_config = next(cfg for cfg in candidate_configs(64, 256, None, tma=True) if cfg.kernel == "tma_persistent")
    with pytest.raises(ZQError, match="TMA"):
        triton_gemm.triton_int_linear(shifted, x_scale, w, w_scale, bias, torch.float16, int4=False,
                                      config=tma_config)
    y = triton_gemm.triton_int_linear(shifted, x_scale, w, w_scale, bias, torch.float16, int4=False)
    ref = float64_reference(x_q.cpu(), x_scale.cpu(), w_q, w_scale.cpu(), bias.cpu())
    assert rel_err(y, ref) <= 4e-3
