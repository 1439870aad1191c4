"""The weight-streaming small-M GEMM (zqcompile/backends/triton_small_m.py).

CPU: config and split-K selection, and the kernel itself under Triton's interpreter (``TRITON_INTERPRET=1``
runs the kernel's Python on CPU tensors, program after program) at tiny shapes, for W8A8, W4A8, W8A16 and
W4A16, with and without split-K, groups, bias and a ragged K, against a float64 reference. GPU (skipped without
one): every candidate config of every variant at decode shapes, and the ops' CUDA kernels (dispatch by M).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_triton_gemm import float64_reference, make_operands, needs_gpu, rel_err
from zqcompile.backends import triton_gemm, triton_small_m
from zqcompile.backends.autotune import OutOfResources
from zqcompile.backends.triton_small_m import StreamConfig, block_m_for, candidate_configs, split_k_for
from zqcompile.errors import ZQError
from zqcompile.backends.triton_gemm import GemmConfig
from zqcompile.quant import dequantize_weight_values, pack_int4, unpack_weight


def weight_only_float64(x, w, w_scale, bias) -> torch.Tensor:
    y = x.double() @ dequantize_weight_values(unpack_weight(w.cpu(), w_scale.cpu()), w_scale.cpu()).double().T
    return y + bias.double().cpu() if bias is not None else y


def weight_only_operands(m, n, k, *, int4, g_in, bias, seed, dtype=torch.float16, device="cpu"):
    (_, _, w, w_scale, b), _ = make_operands(m, n, k, int4=int4, g_out=n, g_in=g_in, bias=bias, seed=seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return tuple(None if t is None else t.to(device) for t in (x, w, w_scale, b if b is None else b.to(dtype)))


# ---- CPU: selection ------------------------------------------------------------------------------------

def test_block_m_holds_all_tokens():
    assert [block_m_for(m) for m in (1, 16, 17, 32, 33, 64)] == [16, 16, 32, 32, 64, 64]


def test_split_k_fills_the_gpu_but_keeps_two_k_tiles_per_split():
    assert split_k_for(4096, 4096, 64, 256, 4, 132) == 8  # 64 column tiles -> 528 programs wanted, 8 = 16 / 2
    assert split_k_for(11008, 4096, 64, 256, 2, 132) == 2  # 172 column tiles x 2
    assert split_k_for(4096, 11008, 128, 256, 2, 132) == 9
    assert split_k_for(64, 256, 32, 256, 4, 132) == 1  # one K tile: no split


def test_candidate_configs_hold_whole_groups():
    p = triton_gemm._Problem(8, 4096, 4096, 4096, 4096 // 64)
    assert all(cfg.block_k % 64 == 0 for cfg in candidate_configs(p))
    p = triton_gemm._Problem(8, 4096, 4096, 4096, 4096 // 512)
    assert all(cfg.block_k == 512 for cfg in candidate_configs(p))
    small_k = triton_gemm._Problem(8, 96, 80, 96, 1)
    assert {cfg.block_k for cfg in candidate_configs(small_k)} == {128}


def test_applies_only_where_the_kernel_is_exact():
    def applies(m, g_in, k=4096, int8_acts=True, dtype=None):
        return triton_small_m.stream_kernel_applies(triton_gemm._Problem(m, 64, k, 64, g_in), int8_acts, dtype)
    assert applies(1, 1) and applies(64, 64) and not applies(65, 1) and not applies(0, 1)
    assert applies(8, 4096 // 32)  # groups of 32: INT4 halves of 16 joined back into one MMA
    assert not applies(8, 4096 // 16)  # groups of 16: narrower than one INT8 MMA
    assert not applies(8, 3, k=96 * 3)  # groups of 96: no power of two
    assert applies(8, 1, int8_acts=False, dtype=torch.bfloat16)
    assert not applies(8, 1, int8_acts=False, dtype=torch.float32)


def test_weight_only_args_are_checked():
    x, w, w_scale, bias = weight_only_operands(2, 64, 128, int4=True, g_in=2, bias=True, seed=0)
    assert triton_small_m.check_weight_only_args(x, w, w_scale, bias).k == 128
    with pytest.raises(ZQError, match="floating point"):
        triton_small_m.check_weight_only_args(x.to(torch.int8), w, w_scale, bias)
    with pytest.raises(ZQError, match="bias dtype"):
        triton_small_m.check_weight_only_args(x, w, w_scale, bias.float())
    with pytest.raises(ZQError, match="in_features"):
        triton_small_m.check_weight_only_args(x[:, :64], w, w_scale, bias)


# ---- CPU: the kernel under Triton's interpreter -----------------------------------------------------------

# (M, N, K, int4, G_in, bias, config): split-K with and without groups, ragged N and K, several sub-tiles per K step
INTERPRETER_CASES = [
    (1, 48, 256, False, 1, True, StreamConfig(32, 64, 4, 2, 8)),  # 4 K tiles, split 2; N tile past N
    (3, 32, 200, False, 1, False, StreamConfig(32, 64, 4, 2, 1)),  # K = 200: masked last tile
    (5, 64, 256, True, 4, True, StreamConfig(32, 128, 4, 2, 8)),  # INT4, groups of 64, 2 per K step, split 2
    (17, 32, 256, True, 1, True, StreamConfig(32, 64, 4, 2, 1)),  # INT4 per channel, BLOCK_M 32
]
WIDEN_CONFIG = StreamConfig(32, 256, 4, 2, 1)


def widen_operands():
    """Every int8 weight value (one row, K = 256) and every nibble (twice each, packed), picked out one per
    output row by identity activations."""
    q = torch.arange(-127, 129, dtype=torch.int16).clamp(max=127).to(torch.int8).view(1, 256)
    nibbles = torch.tensor([v | (v << 4) for v in range(16)] * 8, dtype=torch.uint8).view(1, 128)
    return [(torch.eye(256, dtype=torch.float16)[:16], w) for w in (q, nibbles)]


# INT4 in the half-split layout through both kernels, symmetric and asymmetric: (M, N, K, group width or None,
# asymmetric, weight-streaming config, tiled (prefill) kernel config)
INT4_CASES = [
    (1, 48, 256, 32, True, StreamConfig(32, 64, 4, 2, 8), GemmConfig(16, 32, 32, 4, 2)),  # halves joined; split-K
    (5, 40, 192, 64, True, StreamConfig(32, 128, 4, 2, 1), GemmConfig(16, 32, 64, 4, 2)),  # 3 groups: ragged K step
    (64, 32, 128, 32, False, StreamConfig(32, 64, 4, 2, 1), GemmConfig(64, 32, 32, 4, 2)),
    (5, 48, 200, None, True, StreamConfig(32, 64, 4, 2, 1), GemmConfig(16, 32, 128, 4, 2)),  # per channel, K tail
    (3, 32, 256, None, False, StreamConfig(32, 64, 4, 2, 8), GemmConfig(16, 32, 64, 4, 2)),  # per channel, split-K
    (17, 32, 256, 128, True, StreamConfig(32, 256, 4, 2, 8), GemmConfig(32, 32, 64, 4, 2)),  # 2 K tiles per group
]


def gemv(block_n: int, block_k: int, waves: int) -> StreamConfig:
    return StreamConfig(block_n, block_k, 4, 2, waves, "gemv")


# The GEMV kernel (M <= 8: BLOCK_M 1, 4, 8, 2): INT4 (M, N, K, group width or None, asymmetric, config) like INT4_CASES,
# and INT8 (M, N, K, G_in, bias, config) like INTERPRETER_CASES
GEMV_INT4_CASES = [
    (1, 48, 256, 32, True, gemv(32, 64, 8)),  # split-K 4 ways, N tile past N
    (3, 40, 192, 64, False, gemv(32, 128, 1)),  # 3 groups, 2 per step: the last step half empty
    (5, 32, 256, None, False, gemv(16, 64, 8)),  # per channel, split-K
    (2, 48, 200, None, True, gemv(32, 64, 1)),  # per channel, K tail
]
GEMV_INT8_CASES = [
    (1, 48, 256, 1, True, gemv(32, 64, 8)),
    (3, 32, 200, 1, False, gemv(32, 64, 1)),  # K tail
    (8, 32, 256, 4, True, gemv(16, 128, 8)),  # input-dim groups of 64, 2 per step, split-K
]


def int4_operands(m: int, n: int, k: int, width: int | None, asym: bool, seed: int):
    """INT8 and fp16 activations and an INT4 weight (symmetric [-8, 7] or asymmetric [0, 15]) packed half-split,
    with scales (and mins) per row and group of ``width`` values. The INT8 side is built so that float32 computes
    it exactly: power-of-two weight scales (2^-5..2^-3), mins (-2^-3..-2^-1) and activation scale (2^-7), every
    partial sum a multiple of 2^-5 below 2^19; so a kernel must equal the float64 product bit for bit, whatever
    order it adds in."""
    g = torch.Generator().manual_seed(seed)
    g_in = k // (width or k)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int8) - (0 if asym else 8)
    w_scale = 2.0 ** -torch.randint(3, 6, (n, g_in), generator=g).float()
    w_min = -(2.0 ** -torch.randint(1, 4, (n, g_in), generator=g).float()) if asym else None
    x_q = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    x16 = torch.randn(m, k, generator=g).half()
    return x_q, torch.full((m, 1), 2.0 ** -7), x16, pack_int4(q, width or k, symmetric=not asym), q, w_scale, w_min


def int4_float64(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor, w_min: torch.Tensor | None):
    """x @ (s * q (+ min)).T in float64, each group's scale and min repeated over its columns by hand."""
    width = q.shape[1] // w_scale.shape[1]
    w = q.double() * w_scale.double().repeat_interleave(width, 1)
    if w_min is not None:
        w = w + w_min.double().repeat_interleave(width, 1)
    return x.double() @ w.T


def run_int4_cases() -> dict:
    out = {}
    for i, (m, n, k, width, asym, stream_cfg, tiled_cfg) in enumerate(INT4_CASES):
        x_q, x_scale, x16, w, _, w_scale, w_min = int4_operands(m, n, k, width, asym, seed=i)
        out["stream", i] = triton_small_m.stream_int_linear(x_q, x_scale, w, w_scale, None, torch.float32, int4=True,
                                                            config=stream_cfg, w_min=w_min)
        out["stream16", i] = triton_small_m.stream_weight_only_linear(x16, w, w_scale, None, config=stream_cfg,
                                                                      w_min=w_min)
        p = triton_gemm.check_linear_args(x_q, x_scale, w, w_scale, None, True, w_min)
        out["tiled", i] = torch.empty(m, n)
        triton_gemm._launch(x_q, x_scale.reshape(m), w, w_scale, w_min, None, out["tiled", i], p, True, tiled_cfg)
    return out


def run_gemv_cases() -> dict:
    out = {}
    for i, (m, n, k, width, asym, cfg) in enumerate(GEMV_INT4_CASES):
        x_q, x_scale, x16, w, _, w_scale, w_min = int4_operands(m, n, k, width, asym, seed=i)
        out["gemv4", i] = triton_small_m.stream_int_linear(x_q, x_scale, w, w_scale, None, torch.float32, int4=True,
                                                           config=cfg, w_min=w_min)
        out["gemv4_16", i] = triton_small_m.stream_weight_only_linear(x16, w, w_scale, None, config=cfg, w_min=w_min)
    for i, (m, n, k, g_in, bias, cfg) in enumerate(GEMV_INT8_CASES):
        (x_q, x_scale, w, w_scale, b), _ = make_operands(m, n, k, int4=False, g_out=n, g_in=g_in, bias=bias, seed=i)
        out["gemv8", i] = triton_small_m.stream_int_linear(x_q, x_scale, w, w_scale, b, torch.float32, int4=False,
                                                           config=cfg)
        x, w, w_scale, b = weight_only_operands(m, n, k, int4=False, g_in=g_in, bias=bias, seed=i)
        out["gemv8_16", i] = triton_small_m.stream_weight_only_linear(x, w, w_scale, b, config=cfg)
        out["gemv_tickets_left", i] = triton_small_m._workspace(torch.device("cpu"))[1].any().item()
    return out


def run_interpreted_cases() -> dict:
    """Every interpreter case's output; runs in the child process that ``interpreted`` starts."""
    out = run_int4_cases() | run_gemv_cases()
    for i, (m, n, k, int4, g_in, bias, cfg) in enumerate(INTERPRETER_CASES):
        (x_q, x_scale, w, w_scale, b), _ = make_operands(m, n, k, int4=int4, g_out=n, g_in=g_in, bias=bias,
                                                         seed=m + k)
        out["int", i] = triton_small_m.stream_int_linear(x_q, x_scale, w, w_scale, b, torch.float32, int4=int4,
                                                         config=cfg)
        x, w, w_scale, b = weight_only_operands(m, n, k, int4=int4, g_in=g_in, bias=bias, seed=m + k)
        out["weight_only", i] = triton_small_m.stream_weight_only_linear(x, w, w_scale, b, config=cfg)
        out["tickets_left", i] = triton_small_m._workspace(torch.device("cpu"))[1].any().item()
    for i, (x, w) in enumerate(widen_operands()):
        out["widen", i] = triton_small_m.stream_weight_only_linear(x, w, torch.ones(1, 1), None, config=WIDEN_CONFIG)
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """The interpreter cases' outputs, computed in a child process: TRITON_INTERPRET=1 must be set before Triton
    is first imported (its own library functions are decorated then), so it cannot be switched on here."""
    pytest.importorskip("triton", minversion="3.7")  # 3.6's interpreter fails on numpy >= 2.4 scalars
    result = tmp_path_factory.mktemp("interpreter") / "outputs.pt"
    code = ("import sys, torch, test_triton_small_m as t; "
            f"torch.save(t.run_interpreted_cases(), {str(result)!r})")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result)


@pytest.mark.parametrize("case", range(len(INTERPRETER_CASES)))
def test_interpreted_int_kernel_matches_float64(interpreted, case):
    m, n, k, int4, g_in, bias, _ = INTERPRETER_CASES[case]
    (x_q, x_scale, w, w_scale, b), w_q = make_operands(m, n, k, int4=int4, g_out=n, g_in=g_in, bias=bias, seed=m + k)
    y = interpreted["int", case]
    assert y.shape == (m, n) and rel_err(y, float64_reference(x_q, x_scale, w_q, w_scale, b)) <= 1e-6
    assert not interpreted["tickets_left", case]  # the last split reset the tile's ticket for the next call


@pytest.mark.parametrize("case", range(len(INTERPRETER_CASES)))
def test_interpreted_weight_only_kernel_matches_float64(interpreted, case):
    m, n, k, int4, g_in, bias, _ = INTERPRETER_CASES[case]
    x, w, w_scale, b = weight_only_operands(m, n, k, int4=int4, g_in=g_in, bias=bias, seed=m + k)
    y = interpreted["weight_only", case]
    assert y.dtype == torch.float16 and y.shape == (m, n)
    assert rel_err(y, weight_only_float64(x, w, w_scale, b)) <= 1e-3  # fp16 output rounding


def test_interpreted_kernel_widens_every_weight_value(interpreted):
    """The fp16 exponent trick on every int8 value, the nibble unpacking on every nibble."""
    for i, (_, w) in enumerate(widen_operands()):
        assert torch.equal(interpreted["widen", i][:, 0].float(), unpack_weight(w, torch.ones(1, 1))[0, :16].float())


@pytest.mark.parametrize("case", range(len(INT4_CASES)))
def test_interpreted_int4_kernels_equal_the_exact_product(interpreted, case):
    """Both kernels, W4A8 (symmetric and asymmetric, groups of 32 / 64 / 128 or none, M = 1..64, ragged N and K,
    split-K): bit-equal to the float64 product of the same integers (exact by construction, int4_operands), as
    is the reference op; W4A16 within fp16 rounding."""
    m, n, k, width, asym, _, _ = INT4_CASES[case]
    x_q, x_scale, x16, w, q, w_scale, w_min = int4_operands(m, n, k, width, asym, seed=case)
    exact = int4_float64(x_q, q, w_scale, w_min) * 2.0 ** -7
    assert torch.equal(torch.ops.zq.int4_linear(x_q, x_scale, w, w_scale, None, torch.float32, w_min).double(), exact)
    for kernel in ("stream", "tiled"):
        assert torch.equal(interpreted[kernel, case].double(), exact), kernel
    y16 = interpreted["stream16", case]
    assert y16.dtype == torch.float16 and rel_err(y16, int4_float64(x16, q, w_scale, w_min)) <= 1e-3


@pytest.mark.parametrize("case", range(len(GEMV_INT4_CASES)))
def test_interpreted_gemv_int4_equals_the_exact_product(interpreted, case):
    """The GEMV kernel on INT4 weights (dp4a on nibble words for W4A8, float32 for W4A16), symmetric and asymmetric,
    grouped and per channel: W4A8 bit-equal to the exact product (int4_operands), W4A16 within fp16 rounding."""
    m, n, k, width, asym, _ = GEMV_INT4_CASES[case]
    x_q, _, x16, _, q, w_scale, w_min = int4_operands(m, n, k, width, asym, seed=case)
    assert torch.equal(interpreted["gemv4", case].double(), int4_float64(x_q, q, w_scale, w_min) * 2.0 ** -7)
    assert rel_err(interpreted["gemv4_16", case], int4_float64(x16, q, w_scale, w_min)) <= 1e-3


@pytest.mark.parametrize("case", range(len(GEMV_INT8_CASES)))
def test_interpreted_gemv_int8_matches_float64(interpreted, case):
    m, n, k, g_in, bias, _ = GEMV_INT8_CASES[case]
    (x_q, x_scale, w, w_scale, b), w_q = make_operands(m, n, k, int4=False, g_out=n, g_in=g_in, bias=bias, seed=case)
    assert rel_err(interpreted["gemv8", case], float64_reference(x_q, x_scale, w_q, w_scale, b)) <= 1e-6
    x, w, w_scale, b = weight_only_operands(m, n, k, int4=False, g_in=g_in, bias=bias, seed=case)
    y16 = interpreted["gemv8_16", case]
    assert y16.shape == (m, n) and rel_err(y16, weight_only_float64(x, w, w_scale, b)) <= 1e-3
    assert not interpreted["gemv_tickets_left", case]


def test_gemv_refuses_what_it_cannot_read():
    """M past GEMV_MAX_M, a K that is no whole number of 32-bit words, or activation rows off a 4-byte boundary: a
    forced GEMV config is refused (the tuner never offers it there)."""
    cfg = gemv(32, 64, 1)
    for m, k, offset in ((9, 256, 0), (2, 202, 0), (2, 256, 1)):
        (x_q, x_scale, w, w_scale, _), _ = make_operands(m, 32, k, int4=False, g_out=32, g_in=1, bias=False, seed=0)
        x_q = torch.zeros(m * k + offset, dtype=torch.int8)[offset:].view(m, k).copy_(x_q)
        p = triton_gemm.check_linear_args(x_q, x_scale, w, w_scale, None, False)
        assert not triton_small_m.gemv_kernel_applies(x_q, w, p, int4=False)
        assert all(c.kernel == "mma" for c in candidate_configs(p, gemv=False))
        with pytest.raises(ZQError, match="needs M <= 8"):
            triton_small_m.stream_int_linear(x_q, x_scale, w, w_scale, None, torch.float32, int4=False, config=cfg)
    x = torch.randn(2, 256).half()[:, :202]  # fp16 activations: no word reads, any K and row pitch
    p = triton_small_m.check_weight_only_args(x, torch.zeros(32, 202, dtype=torch.int8), torch.ones(32, 1), None)
    assert triton_small_m.gemv_kernel_applies(x, torch.zeros(32, 202, dtype=torch.int8), p, int4=False)


def test_group_sums_converted_exactly_only_where_they_stay_small():
    """The add-and-subtract int-to-float conversion of group sums holds for |sum| <= 2^22 (1.5 * 2^23 + sum stays in
    [2^23, 2^24]): groups of up to 2048 INT4 or 256 INT8 values of |activation| <= 128."""
    assert triton_gemm.small_group_sums(2048, int4=True) and not triton_gemm.small_group_sums(4096, int4=True)
    assert triton_gemm.small_group_sums(256, int4=False) and not triton_gemm.small_group_sums(512, int4=False)
    assert 2048 * 128 * 15 <= 2**22 < 512 * 128 * 128


def test_gemv_candidates_only_at_small_m():
    """The GEMV configs join the candidates up to GEMV_MAX_M, with fewer MMA configs there; their K step holds whole
    groups as the MMA kernel's does."""
    p = triton_gemm._Problem(4, 4096, 4096, 4096, 4096 // 64)
    configs = candidate_configs(p, int4=True, gemv=True)
    kinds = [c.kernel for c in configs]
    assert kinds[0] == "mma" and "gemv" in kinds and len(configs) <= 8
    assert all(c.block_k % 64 == 0 for c in configs)
    assert triton_small_m.gemv_block_m(3) == 4 and triton_small_m.gemv_block_m(1) == 1


# ---- GPU ------------------------------------------------------------------------------------------------

GPU_CASES = [  # (M, N, K, int4, G_in, every config or the default only): every config on the W8A8 decode layout
    (1, 4096, 4096, False, 1, True), (7, 1000, 4096, True, 64, False), (33, 4096, 1024, False, 1, False),
    (64, 1024, 2048, True, 32, False), (16, 512, 704, False, 1, False),  # K = 704: masked tail
]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,int4,g_in,every", GPU_CASES)
def test_configs_match_float64_on_gpu(m, n, k, int4, g_in, every):
    (x_q, x_scale, w, w_scale, bias), w_q = make_operands(m, n, k, int4=int4, g_out=n, g_in=g_in, bias=True,
                                                          seed=m + n + k, device="cuda")
    ref = float64_reference(x_q.cpu(), x_scale.cpu(), w_q, w_scale.cpu(), bias.cpu())
    x, w16, s16, b16 = weight_only_operands(m, n, k, int4=int4, g_in=g_in, bias=True, seed=m + k, device="cuda")
    ref16 = weight_only_float64(x.cpu(), w16, s16, b16)
    p = triton_gemm.check_linear_args(x_q, x_scale, w, w_scale, bias, int4)
    configs = candidate_configs(p, int4, triton_small_m.gemv_kernel_applies(x_q, w, p, int4))
    for cfg in configs if every else configs[:1]:
        for _ in range(2):  # the second call finds the tickets the first one reset
            y = triton_small_m.stream_int_linear(x_q, x_scale, w, w_scale, bias, torch.float32, int4=int4, config=cfg)
            assert rel_err(y, ref) <= 1e-6, cfg
            y16 = triton_small_m.stream_weight_only_linear(x, w16, s16, b16, config=cfg)
            assert rel_err(y16, ref16) <= 1e-3, cfg


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 64, 200])
@pytest.mark.parametrize("width,asym", [(32, True), (64, True), (32, False), (64, False), (None, True), (None, False)])
def test_int4_half_split_kernels_on_gpu(m, width, asym):
    """Every INT4 candidate config of the kernel M dispatches to (weight-streaming for M <= 64, tiled above), W4A8
    and W4A16, symmetric and asymmetric, N and K ragged against the tiles, against the float64 product."""
    from zqcompile.backends import register_cuda_kernels

    register_cuda_kernels()
    n, k = 1000, 4096 if width else 4032
    x_q, x_scale, x16, w, q, w_scale, w_min = (t if t is None else t.cuda()
                                               for t in int4_operands(m, n, k, width, asym, seed=m + n))
    ref = int4_float64(x_q.cpu(), q.cpu(), w_scale.cpu(), None if w_min is None else w_min.cpu()) * 2.0 ** -7
    ref16 = int4_float64(x16.cpu(), q.cpu(), w_scale.cpu(), None if w_min is None else w_min.cpu())
    p = triton_gemm.check_linear_args(x_q, x_scale, w, w_scale, None, True, w_min)
    if m <= triton_small_m.MAX_M:
        configs = candidate_configs(p, int4=True, gemv=triton_small_m.gemv_kernel_applies(x_q, w, p, int4=True))
        for i, cfg in enumerate(configs):
            y = triton_small_m.stream_int_linear(x_q, x_scale, w, w_scale, None, torch.float32, int4=True,
                                                 config=cfg, w_min=w_min)
            assert rel_err(y, ref) <= 1e-6, cfg
            try:  # fp16 activation tiles take twice the shared memory of INT8 ones
                y16 = triton_small_m.stream_weight_only_linear(x16, w, w_scale, None, config=cfg, w_min=w_min)
            except OutOfResources:  # the tuner drops such a candidate (autotune.first_runs); the default must fit
                assert i > 0, f"the untuned default {cfg} does not fit the GPU"
                continue
            assert rel_err(y16, ref16) <= 1e-3, cfg
    else:
        for cfg in triton_gemm.candidate_configs(m, k, width):
            y = triton_gemm.triton_int_linear(x_q, x_scale, w, w_scale, None, torch.float32, int4=True, config=cfg,
                                              w_min=w_min)
            assert rel_err(y, ref) <= 1e-6, cfg
    y = torch.ops.zq.int4_linear(x_q, x_scale, w, w_scale, None, torch.float32, w_min)  # the registered kernel
    assert rel_err(y, ref) <= 1e-6


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 65, 300])
def test_registered_kernels_dispatch_by_m_and_match_the_reference(m):
    from zqcompile.backends import reference_kernels, register_cuda_kernels

    register_cuda_kernels()
    (x_q, x_scale, w, w_scale, bias), _ = make_operands(m, 256, 512, int4=True, g_out=256, g_in=8, bias=True,
                                                        seed=m, device="cuda")
    x, w16, s16, b16 = weight_only_operands(m, 256, 512, int4=False, g_in=1, bias=True, seed=m, device="cuda")
    calls = [lambda: torch.ops.zq.int4_linear(x_q, x_scale, w, w_scale, bias, torch.float16),
             lambda: torch.ops.zq.weight_only_linear(x, w16, s16, b16)]
    for call in calls:
        y = call()
        with reference_kernels():
            ref = call()
        assert rel_err(y, ref.double().cpu()) <= 2e-3


@needs_gpu
@pytest.mark.gpu
def test_ptx_unpacking_on_gpu():
    """The PTX that widens weights four bytes at a time (triton_gemm._nibbles, _fp16_from_bytes): every int8 value
    and every nibble through the MMA kernel with fp16 activations, and INT4 W4A8 / W4A16 through the MMA stream
    kernel and the tiled prefill kernel, against the exact product (the interpreter runs their Triton stand-ins)."""
    for x, w in widen_operands():
        y = triton_small_m.stream_weight_only_linear(x.cuda(), w.cuda(), torch.ones(1, 1, device="cuda"), None,
                                                     config=WIDEN_CONFIG)
        assert torch.equal(y[:, 0].float().cpu(), unpack_weight(w, torch.ones(1, 1))[0, :16].float())
    for i in (0, 4):  # asymmetric groups of 32 with split-K, symmetric per channel with split-K
        m, n, k, width, asym, stream_cfg, tiled_cfg = INT4_CASES[i]
        x_q, x_scale, x16, w, q, w_scale, w_min = (t if t is None else t.cuda()
                                                   for t in int4_operands(m, n, k, width, asym, seed=i))
        exact = int4_float64(x_q.cpu(), q.cpu(), w_scale.cpu(), None if w_min is None else w_min.cpu()) * 2.0 ** -7
        y = triton_small_m.stream_int_linear(x_q, x_scale, w, w_scale, None, torch.float32, int4=True,
                                             config=stream_cfg, w_min=w_min)
        assert torch.equal(y.double().cpu(), exact), i
        p = triton_gemm.check_linear_args(x_q, x_scale, w, w_scale, None, True, w_min)
        y = torch.empty(m, n, device="cuda")
        triton_gemm._launch(x_q, x_scale.reshape(m), w, w_scale, w_min, None, y, p, True, tiled_cfg)
        assert torch.equal(y.double().cpu(), exact), i
        y16 = triton_small_m.stream_weight_only_linear(x16, w, w_scale, None, config=stream_cfg, w_min=w_min)
        assert rel_err(y16, int4_float64(x16.cpu(), q.cpu(), w_scale.cpu(),
                                         None if w_min is None else w_min.cpu())) <= 1e-3, i


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k,width,asym", [(1, 4096, 4096, 64, False), (3, 1000, 4032, 32, True)])
def test_gemv_on_gpu(m, n, k, width, asym):
    """Every GEMV config (dp4a and float32 products, on the GPU's own instructions) at decode shapes, INT4 and (the
    same shapes) INT8, against the float64 product; W4A8 to float32 summation order."""
    x_q, x_scale, x16, w, q, w_scale, w_min = (t if t is None else t.cuda()
                                               for t in int4_operands(m, n, k, width, asym, seed=m + n))
    ref = int4_float64(x_q.cpu(), q.cpu(), w_scale.cpu(), None if w_min is None else w_min.cpu()) * 2.0 ** -7
    ref16 = int4_float64(x16.cpu(), q.cpu(), w_scale.cpu(), None if w_min is None else w_min.cpu())
    p = triton_gemm.check_linear_args(x_q, x_scale, w, w_scale, None, True, w_min)
    (x8, s8, w8, ws8, b8), w8_q = make_operands(m, n, k, int4=False, g_out=n, g_in=k // (width or k), bias=True,
                                                seed=m, device="cuda")
    ref8 = float64_reference(x8.cpu(), s8.cpu(), w8_q, ws8.cpu(), b8.cpu())
    assert triton_small_m.gemv_kernel_applies(x_q, w, p, int4=True)
    for cfg in [c for c in candidate_configs(p, int4=True, gemv=True) if c.kernel == "gemv"]:
        for _ in range(2):  # the second call finds the tickets the first one reset
            y = triton_small_m.stream_int_linear(x_q, x_scale, w, w_scale, None, torch.float32, int4=True,
                                                 config=cfg, w_min=w_min)
            assert rel_err(y, ref) <= 1e-6, cfg
        if not asym:
            y8 = triton_small_m.stream_int_linear(x8, s8, w8, ws8, b8, torch.float32, int4=False, config=cfg)
            assert rel_err(y8, ref8) <= 1e-6, cfg
    for cfg in [c for c in candidate_configs(p, int4=True, gemv=True, int8_acts=False) if c.kernel == "gemv"]:
        y16 = triton_small_m.stream_weight_only_linear(x16, w, w_scale, None, config=cfg, w_min=w_min)
        assert rel_err(y16, ref16) <= 1e-3, cfg


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["mma", "gemv"])
def test_split_k_kernel_inside_cuda_graph_replays(kernel):
    (x_q, x_scale, w, w_scale, bias), w_q = make_operands(4, 4096, 4096, int4=False, g_out=4096, g_in=1, bias=True,
                                                          seed=2, device="cuda")
    configs = candidate_configs(triton_gemm.check_linear_args(x_q, x_scale, w, w_scale, bias, False), gemv=True)
    cfg = next(c for c in configs if c.kernel == kernel)
    run = lambda: triton_small_m.stream_int_linear(x_q, x_scale, w, w_scale, bias, torch.float32, int4=False,
                                                   config=cfg)
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    ref = float64_reference(x_q.cpu(), x_scale.cpu(), w_q, w_scale.cpu(), bias.cpu())
    for _ in range(3):
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, ref) <= 1e-6


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("family,recipe", [("llama", "w8a16"), ("llama", "w4a16"), ("gpt2", "w4a8"),
                                           ("llama", "w4a16-asym"), ("llama", "w4a8-asym")])
def test_compiled_model_matches_reference_kernels(family, recipe):
    """Whole tiny models at 48 tokens (the weight-streaming kernels) against the reference kernels."""
    import zqcompile
    from helpers import TINY_MODELS, token_batch
    from zqcompile.backends import reference_kernels

    qmodel = zqcompile.compile(TINY_MODELS[family]().half().cuda(), recipe, backend="cuda")
    ids = token_batch(3, 16, seed=1).cuda()
    out = qmodel(input_ids=ids)["logits"]
    with reference_kernels():
        ref = qmodel.graph_module(*qmodel.graph_inputs(input_ids=ids))[0]
    assert rel_err(out, ref.double().cpu()) <= 1e-2
