"""The Numba kernels' logic, run through Numba's CUDA simulator against the reference ops (zqcompile/ops.py).

``NUMBA_ENABLE_CUDASIM`` is read when ``numba.cuda`` is first imported, so it cannot be switched on inside
a test process that may already hold the real CUDA target. This module therefore runs itself: in a normal
pytest process it defines one test that reruns this file in a subprocess with the simulator on, and in that
subprocess it defines the kernel tests. The simulator has no warp shuffles, so it runs the shared-memory
tree reduction; tests/test_gpu_backend.py runs both reductions on a GPU.

Tolerances (issue 3): int8 values exact up to +-1 where the two sides round a tie or a last-ulp difference
differently, scales to 1e-6 relative, float16/bfloat16 outputs to one ulp, float32 outputs to 1e-6 relative.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zqcompile import ops
from zqcompile.errors import ZQError

IN_SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
REPO = Path(__file__).resolve().parents[1]

if not IN_SIMULATOR:
    @pytest.mark.slow
    def test_numba_kernels_in_cuda_simulator():
        pytest.importorskip("numba")
        env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "--tb=short", "-p", "no:cacheprovider",
                               __file__],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
        assert " passed" in proc.stdout and " failed" not in proc.stdout, proc.stdout[-2000:]

else:
    from zqcompile.backends.numba_cuda import kernels

    # The simulator's launcher polls its block's threads in a loop that holds the GIL between switches: a 1 ms
    # switch interval (5 ms by default) lets the threads reach each barrier sooner and halves this file's time.
    sys.setswitchinterval(0.001)
    # Every simulated thread swaps the kernel module's `cuda` global while iterating over the module's globals; the
    # first warning raised inside a kernel (numpy's "invalid value" on a NaN row) adds __warningregistry__ to those
    # globals meanwhile, and another thread's iteration fails ("dictionary changed size"). Create it up front.
    vars(kernels).setdefault("__warningregistry__", {})

    THREADS = 32  # one warp per row keeps the simulator (one Python thread per CUDA thread) quick
    DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    # float32 outputs differ from torch by float32 rounding of differently ordered sums (a few ulps);
    # float16/bfloat16 outputs are rounded once more, so they agree up to one ulp of their dtype
    TOLERANCE = {torch.float32: 1e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}

    def to_numba(t: torch.Tensor) -> np.ndarray:
        """The array a kernel gets: bfloat16 as its int16 bits, everything else as it is."""
        t = t.contiguous()
        return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().copy()

    def from_numba(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t

    def outputs(rows: int, k: int, dtype: torch.dtype | None = None):
        q = np.full((rows, k), 99, np.int8)  # poisoned: every element must be written
        scale = np.full(rows, np.nan, np.float32)
        if dtype is None:
            return q, scale
        y = to_numba(torch.full((rows, k), float("nan"), dtype=dtype))
        return y, q, scale

    def check_quant(q: np.ndarray, scale: np.ndarray, ref_q: torch.Tensor, ref_scale: torch.Tensor) -> None:
        ref_q = ref_q.reshape(q.shape).numpy().astype(np.int32)
        ref_scale = ref_scale.reshape(scale.shape).numpy()
        np.testing.assert_allclose(scale, ref_scale, rtol=1e-6, atol=0)
        diff = np.abs(q.astype(np.int32) - ref_q)
        assert diff.max() <= 1, diff.max()
        assert (diff > 0).mean() <= 0.01, f"{(diff > 0).sum()} of {diff.size} int8 values differ by 1"

    def check_float(y: np.ndarray, ref: torch.Tensor) -> None:
        got = from_numba(y, ref.dtype).float()
        tol = TOLERANCE[ref.dtype] * ref.float().abs().clamp_min(1.0)
        assert torch.all((got - ref.float()).abs() <= tol), (got - ref.float()).abs().max()

    def x_bytes(dtype: torch.dtype) -> int:
        return torch.empty(0, dtype=dtype).element_size()

    def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 2.0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    # every dtype with K larger than the block (several columns per thread); K smaller than the block at one dtype
    # (which columns a thread takes does not depend on the dtype)
    DTYPE_SHAPES = [(dtype, 3, 40) for dtype in DTYPES] + [(torch.float16, 2, 7)]

    # ---- quantize_per_token ------------------------------------------------------------------------
    @pytest.mark.parametrize("dtype,rows,k", DTYPE_SHAPES)
    @pytest.mark.parametrize("vec", [None, 1, 2, 4])
    def test_quantize_per_token_matches_reference(dtype, rows, k, vec):
        if vec and (k % vec or vec * x_bytes(dtype) > 8):
            pytest.skip("this word width does not apply to the shape / dtype")
        x = randn(rows, k, dtype=dtype, seed=rows * k)
        q, scale = outputs(rows, k)
        kernels.quantize_per_token(to_numba(x), q, scale, threads=THREADS, vec=vec)
        check_quant(q, scale, *ops.quantize_per_token(x))

    def test_quantize_rounds_half_to_even_and_zero_row_gets_scale_one():
        # absmax 127 -> scale exactly 1, so x / scale are the values themselves: ties at .5 go to even
        x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5, 3.5, -126.5], [0.0] * 8])
        q, scale = outputs(2, 8)
        kernels.quantize_per_token(to_numba(x), q, scale, threads=THREADS)
        assert q[0].tolist() == [127, 0, 2, 2, -2, 0, 4, -126]
        assert q[1].tolist() == [0] * 8
        assert scale.tolist() == [1.0, 1.0]

    # ---- layernorm_quant / add_layernorm_quant -------------------------------------------------------
    @pytest.mark.parametrize("dtype,rows,k", DTYPE_SHAPES)
    @pytest.mark.parametrize("with_residual", [False, True])
    @pytest.mark.parametrize("vec", [None, 1])
    def test_layernorm_quant_matches_reference(dtype, rows, k, with_residual, vec):
        x = randn(rows, k, dtype=dtype, seed=1) + 0.5
        residual = randn(rows, k, dtype=dtype, seed=2)
        weight, bias = randn(k, dtype=dtype, seed=3, scale=1.0), randn(k, dtype=dtype, seed=4, scale=0.3)
        y, q, scale = outputs(rows, k, dtype)
        kernels.layernorm_quant(to_numba(x), to_numba(weight), to_numba(bias), 1e-5, y, q, scale,
                                residual=to_numba(residual) if with_residual else None, threads=THREADS,
                                vec=vec)
        if with_residual:
            ref = ops.add_layernorm_quant(x, residual, weight, bias, 1e-5)
        else:
            ref = ops.layernorm_quant(x, weight, bias, 1e-5)
        check_float(y, ref[0])
        check_quant(q, scale, ref[1], ref[2])

    def test_layernorm_quant_without_affine_parameters():
        x = randn(3, 40, dtype=torch.float16, seed=5)
        y, q, scale = outputs(3, 40, torch.float16)
        kernels.layernorm_quant(to_numba(x), None, None, 1e-12, y, q, scale, threads=THREADS)
        ref = ops.layernorm_quant(x, None, None, 1e-12)
        check_float(y, ref[0])
        check_quant(q, scale, ref[1], ref[2])

    def test_layernorm_statistics_match_float64():
        # independent of the reference op: mean 0 / variance 1 per row after the kernel, in float64
        x = randn(2, 40, dtype=torch.float32, seed=6) * 3 + 1
        y, q, scale = outputs(2, 40, torch.float32)
        kernels.layernorm_quant(to_numba(x), None, None, 0.0, y, q, scale, threads=THREADS)
        y64 = torch.from_numpy(y).double()
        assert torch.allclose(y64.mean(-1), torch.zeros(2, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(y64.var(-1, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-5)

    # ---- rmsnorm_quant --------------------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
    def test_rmsnorm_quant_matches_reference(dtype, weight_dtype):
        weight_dtype = dtype if weight_dtype == "same" else weight_dtype
        x = randn(3, 40, dtype=dtype, seed=7)
        weight = randn(40, dtype=weight_dtype, seed=8, scale=1.0)
        ref = ops.rmsnorm_quant(x, weight, 1e-6)
        y, q, scale = outputs(3, 40, ref[0].dtype)
        kernels.rmsnorm_quant(to_numba(x), to_numba(weight), 1e-6, y, q, scale, threads=THREADS)
        check_float(y, ref[0])
        check_quant(q, scale, ref[1], ref[2])

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_rmsnorm_quant_weight_first_matches_gemma(dtype):
        """Gemma's (1 + w) RMSNorm: the float32 weight multiplies before the cast back to x's dtype."""
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
        x = randn(3, 40, dtype=dtype, seed=17)
        norm = Gemma3RMSNorm(40, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(randn(40, dtype=dtype, seed=18, scale=0.5))
            expected = norm(x)
        weight = norm.weight.detach().float() + 1.0
        ref = ops.rmsnorm_quant(x, weight, 1e-6, True)
        assert torch.equal(ref[0], expected)  # the op is Gemma's norm
        y, q, scale = outputs(3, 40, dtype)
        kernels.rmsnorm_quant(to_numba(x), to_numba(weight), 1e-6, y, q, scale, weight_first=True, threads=THREADS)
        check_float(y, expected)
        check_quant(q, scale, ref[1], ref[2])

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("weight_first", [False, True])
    @pytest.mark.parametrize("vec", [None, 1])
    def test_add_rmsnorm_quant_matches_reference(dtype, weight_first, vec):
        """The residual sum bit for bit (x's dtype), the INT8 of the norm of that sum as the reference."""
        x, residual = randn(3, 40, dtype=dtype, seed=19), randn(3, 40, dtype=dtype, seed=20)
        weight = randn(40, dtype=torch.float32 if weight_first else dtype, seed=21, scale=1.0)
        ref = ops.add_rmsnorm_quant(x, residual, weight, 1e-6, weight_first)
        h, q, scale = outputs(3, 40, dtype)
        kernels.add_rmsnorm_quant(to_numba(x), to_numba(residual), to_numba(weight), 1e-6, h, q, scale,
                                  weight_first=weight_first, threads=THREADS, vec=vec)
        assert torch.equal(from_numba(h, dtype), x + residual)
        check_quant(q, scale, ref[1], ref[2])

    @pytest.mark.parametrize("dtype,rows,k", DTYPE_SHAPES)
    def test_add_rmsnorm_matches_reference(dtype, rows, k):
        """The final norm (not quantized): the sum bit for bit, the norm within the float tolerance."""
        x, residual = randn(rows, k, dtype=dtype, seed=22), randn(rows, k, dtype=dtype, seed=23)
        weight = randn(k, dtype=dtype, seed=24, scale=1.0)
        ref = ops.add_rmsnorm(x, residual, weight, 1e-6)
        h, y = (to_numba(torch.full((rows, k), float("nan"), dtype=dtype)) for _ in range(2))
        kernels.add_rmsnorm(to_numba(x), to_numba(residual), to_numba(weight), 1e-6, h, y, threads=THREADS)
        assert torch.equal(from_numba(h, dtype), ref[0])
        check_float(y, ref[1])

    # ---- gelu_quant / relu_quant / silu_mul_quant / gelu_mul_quant --------------------------------------
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("approximate", ["none", "tanh"])
    @pytest.mark.parametrize("with_bias", [False, True])
    def test_gelu_quant_matches_reference(dtype, approximate, with_bias):
        x = randn(3, 40, dtype=dtype, seed=9)
        bias = randn(40, dtype=dtype, seed=10, scale=0.5) if with_bias else None
        q, scale = outputs(3, 40)
        kernels.gelu_quant(to_numba(x), None if bias is None else to_numba(bias), approximate, q, scale,
                           threads=THREADS)
        check_quant(q, scale, *ops.gelu_quant(x, bias, approximate))

    @pytest.mark.parametrize("dtype,rows,k", DTYPE_SHAPES)
    @pytest.mark.parametrize("vec", [None, 1])
    def test_silu_mul_quant_matches_reference(dtype, rows, k, vec):
        gate, up = randn(rows, k, dtype=dtype, seed=11), randn(rows, k, dtype=dtype, seed=12)
        q, scale = outputs(rows, k)
        kernels.silu_mul_quant(to_numba(gate), to_numba(up), q, scale, threads=THREADS, vec=vec)
        check_quant(q, scale, *ops.silu_mul_quant(gate, up))

    @pytest.mark.parametrize("dtype,rows,k", DTYPE_SHAPES)
    def test_relu_quant_matches_float64_relu(dtype, rows, k):
        x = randn(rows, k, dtype=dtype, seed=19)
        q, scale = outputs(rows, k)
        kernels.relu_quant(to_numba(x), q, scale, threads=THREADS)
        check_quant(q, scale, *ops.quantize_per_token(x.double().relu()))

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("approximate", ["none", "tanh"])
    @pytest.mark.parametrize("vec", [None, 1])
    def test_gelu_mul_quant_matches_reference(dtype, approximate, vec):
        gate, up = randn(3, 40, dtype=dtype, seed=20), randn(3, 40, dtype=dtype, seed=21)
        q, scale = outputs(3, 40)
        kernels.gelu_mul_quant(to_numba(gate), to_numba(up), approximate, q, scale, threads=THREADS, vec=vec)
        check_quant(q, scale, *ops.gelu_mul_quant(gate, up, approximate))

    # ---- the online Hadamard: hadamard_quant / silu_mul_hadamard_quant / gelu_mul_hadamard_quant -------------
    # widths of one block, of several blocks (192 = 3 x 64) and of many small ones; several rows per block of
    # threads with a partial last one (5 rows, 2 or 4 per block), and a row wider than its threads' first pass
    HADAMARD_SHAPES = [(3, 64, 64, 32, None), (5, 128, 128, 32, 2), (5, 192, 64, 32, 4), (2, 192, 16, 64, 1)]

    # every dtype at the shape with several blocks and rows per block of threads, every shape at one dtype
    @pytest.mark.parametrize("dtype,rows,k,block,threads,rows_per_block",
                             [(dtype, *HADAMARD_SHAPES[2]) for dtype in DTYPES]
                             + [(torch.float16, *shape) for shape in HADAMARD_SHAPES if shape != HADAMARD_SHAPES[2]])
    def test_hadamard_quant_matches_reference(dtype, rows, k, block, threads, rows_per_block):
        x = randn(rows, k, dtype=dtype, seed=k + block)
        q, scale = outputs(rows, k)
        kernels.hadamard_quant(to_numba(x), block, q, scale, threads=threads, rows_per_block=rows_per_block)
        check_quant(q, scale, *ops.hadamard_quant(x, block))

    # silu at every dtype, the other activations at one, on the shape of several blocks; many small blocks once
    GATED_CASES = [(dtype, "silu") for dtype in DTYPES] + [(torch.float16, "none"), (torch.bfloat16, "tanh")]

    @pytest.mark.parametrize("dtype,activation,rows,k,block,threads,rows_per_block",
                             [(*case, *HADAMARD_SHAPES[2]) for case in GATED_CASES]
                             + [(torch.float16, "silu", *HADAMARD_SHAPES[3])])
    def test_gated_hadamard_quant_matches_reference(dtype, activation, rows, k, block, threads, rows_per_block):
        gate, up = randn(rows, k, dtype=dtype, seed=22), randn(rows, k, dtype=dtype, seed=23)
        q, scale = outputs(rows, k)
        geometry = {"threads": threads, "rows_per_block": rows_per_block}
        if activation == "silu":
            kernels.silu_mul_hadamard_quant(to_numba(gate), to_numba(up), block, q, scale, **geometry)
            ref = ops.silu_mul_hadamard_quant(gate, up, block)
        else:
            kernels.gelu_mul_hadamard_quant(to_numba(gate), to_numba(up), activation, block, q, scale, **geometry)
            ref = ops.gelu_mul_hadamard_quant(gate, up, activation, block)
        check_quant(q, scale, *ref)

    @pytest.mark.parametrize("block", [16, 64])
    def test_hadamard_quant_dequantizes_to_the_dense_float64_transform(block):
        # independent of the reference op: scipy's Hadamard matrix in float64, blocks of the row; the kernel's INT8
        # values times the scale are within half a step (plus float32 rounding) of it
        linalg = pytest.importorskip("scipy.linalg")
        x = randn(3, 192, dtype=torch.float32, seed=24)
        x[:, 7] *= 30.0  # an outlier channel: the transform spreads it over its block
        dense = torch.tensor(linalg.hadamard(block), dtype=torch.float64) / block ** 0.5
        expected = (x.double().view(3, -1, block) @ dense).view(3, 192)
        q, scale = outputs(3, 192)
        kernels.hadamard_quant(to_numba(x), block, q, scale, threads=THREADS)
        got = torch.from_numpy(q).double() * torch.from_numpy(scale).double()[:, None]
        step = torch.from_numpy(scale).double()[:, None]
        assert torch.all((got - expected).abs() <= step * (0.5 + 1e-5) + 1e-6)
        assert torch.allclose(torch.from_numpy(scale).double(), expected.abs().amax(-1) / 127, rtol=1e-6)

    @pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
    def test_hadamard_quant_nan_row_gets_a_nan_scale_other_rows_unchanged():
        x = planted(randn(4, 64, dtype=torch.float16, seed=25))
        q, scale = outputs(4, 64)
        kernels.hadamard_quant(to_numba(x), 32, q, scale, threads=THREADS)
        ref_q, ref_scale = ops.hadamard_quant(x, 32)
        assert np.isnan(scale[1:3]).all() and torch.isnan(ref_scale[1:3]).all()
        check_quant(q[[0, 3]], scale[[0, 3]], ref_q[[0, 3]], ref_scale[[0, 3]])

    def test_hadamard_block_and_shared_memory_limits_raise():
        q, scale = outputs(2, 48)
        for block in (0, 12, 32):  # not a power of two >= 2, or not dividing 48
            with pytest.raises(ZQError, match="Hadamard block"):
                kernels.hadamard_quant(np.ones((2, 48), np.float32), block, q, scale, threads=THREADS)
        k = kernels.MAX_HADAMARD_ROW // 2
        q, scale = outputs(4, k)
        with pytest.raises(ZQError, match="shared memory"):
            kernels.hadamard_quant(np.ones((4, k), np.float16), 64, q, scale, threads=256, rows_per_block=4)

    def test_bfloat16_codec_matches_torch_casts():
        # the in-kernel bfloat16 rounding and word packing (device functions called directly, as the simulator allows)
        decode, round_bf16, insert = kernels._CODECS["bf16"]
        g = torch.Generator().manual_seed(13)
        values = torch.randn(200, generator=g) * 10.0 ** torch.randint(-3, 4, (200,), generator=g)
        exact = values.bfloat16().float()
        ties = exact + exact.abs() * 2.0 ** -8  # halfway to the next bfloat16 (up to exponent edges)
        for v in torch.cat([values, ties, torch.tensor([0.0, -0.0, 1e38, -1e38])]).tolist():
            expected = torch.tensor([np.float32(v)]).bfloat16()
            rounded = round_bf16(np.float32(v))
            assert rounded == expected.float().item(), v
            bits = int(expected.view(torch.int16).item()) & 0xFFFF
            word = insert(np.uint64(0), rounded, 2)  # third element of a four-element word
            assert int(word) == bits << 32, v
            assert decode(word, 2) == expected.float().item() and decode(word, 1) == 0.0, v

    def test_float16_codec_is_exact_for_every_pattern():
        # decoding from a word and packing back: all 65536 patterns, subnormals, inf and NaN included
        decode, _, insert = kernels._CODECS["f16"]
        patterns = np.arange(2 ** 16, dtype=np.uint64)
        expected = patterns.astype(np.uint16).view(np.float16).astype(np.float32)
        got = np.array([decode(np.uint64(int(h) << 48), 3) for h in patterns], dtype=np.float32)
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.int32), expected[~nan].view(np.int32))  # signed zeros too
        repacked = np.array([int(insert(np.uint32(0), v, 1)) >> 16 for v in got[~nan]], dtype=np.int64)
        assert np.array_equal(repacked, patterns[~nan].astype(np.int64))

    @pytest.mark.parametrize("approximate", ["none", "tanh"])
    def test_gelu_forms_on_every_float16_input(approximate):
        # the kernel's GELU (one exponential instead of erff / tanhf) on every finite float16, against float64 GELU
        gelu = kernels._gelu_tanh if approximate == "tanh" else kernels._gelu_erf
        x16 = np.arange(2 ** 16, dtype=np.uint16).view(np.float16)
        x = x16[np.isfinite(x16)].astype(np.float32)
        got = np.array([gelu(v) for v in x], dtype=np.float32)
        exact = torch.nn.functional.gelu(torch.from_numpy(x).double(), approximate=approximate).numpy()
        # within ~1e-7 of the v/2 term (erf's fit: 6.4e-8) plus a few float32 roundings of the result
        bound = np.abs(x) * 0.5 * 1.2e-7 + np.abs(exact) * 2.0 ** -21 + 1e-30
        assert np.all(np.abs(got - exact) <= bound), x[np.argmax(np.abs(got - exact) / bound)]
        # what the kernel keeps is the float16 rounding: that of torch's float32 GELU for normal x > 0 (where a
        # row's absmax, hence its scale, comes from) but for exact values within a float32 ulp of a float16 tie
        # (1 of the 30720 inputs for tanh; subnormal x/2 all sit on ties), and closer to the exact value than
        # torch's for x < 0, where 1 + erf / 1 + tanh cancel in torch's formula
        ours = got.astype(np.float16)
        torchs = torch.nn.functional.gelu(torch.from_numpy(x), approximate=approximate).half().numpy()
        exact16 = exact.astype(np.float32).astype(np.float16)
        positive, negative = x >= 2.0 ** -14, x < 0
        assert (ours != torchs)[positive].sum() <= 1
        assert (ours != exact16)[negative].sum() <= (torchs != exact16)[negative].sum() // 4

    def test_int8_words_pack_signed_values():
        insert = kernels._insert_i8
        word = np.uint32(0)
        for h, value in enumerate([-127, 5, 0, 127]):
            word = insert(word, value, h)
        assert np.array([word], dtype=np.uint32).view(np.int8).tolist() == [-127, 5, 0, 127]

    def test_misaligned_rows_use_narrower_words():
        # a view starting one element in is 2 bytes past a 4-byte boundary: the launch picks one-element words
        flat = to_numba(randn(3 * 40 + 1, dtype=torch.float16, seed=14))
        x = flat[1:].reshape(3, 40)
        assert x.__array_interface__["data"][0] % 4 == 2
        q, scale = outputs(3, 40)
        kernels.quantize_per_token(x, q, scale, threads=THREADS)
        check_quant(q, scale, *ops.quantize_per_token(torch.from_numpy(np.ascontiguousarray(x))))
        with pytest.raises(ZQError, match="vec=2"):
            kernels.quantize_per_token(x, q, scale, threads=THREADS, vec=2)

    @pytest.mark.parametrize("rows_per_block", [2, 4])
    def test_several_rows_per_block_with_a_partial_last_block(rows_per_block):
        x = randn(5, 40, dtype=torch.float16, seed=15)
        residual = randn(5, 40, dtype=torch.float16, seed=16)
        y, q, scale = outputs(5, 40, torch.float16)
        kernels.layernorm_quant(to_numba(x), None, None, 1e-5, y, q, scale, residual=to_numba(residual),
                                threads=THREADS, rows_per_block=rows_per_block)
        ref = ops.add_layernorm_quant(x, residual, None, None, 1e-5)
        check_float(y, ref[0])
        check_quant(q, scale, ref[1], ref[2])

    # ---- NaN / Inf rows ----------------------------------------------------------------------------------
    def planted(x: torch.Tensor) -> torch.Tensor:
        """x with a NaN in row 1 and an Inf in row 2 (rows 0 and 3 stay finite)."""
        x = x.clone()
        x[1, 5] = float("nan")
        x[2, 3] = float("inf")
        return x

    @pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NumPy's, on the planted values
    @pytest.mark.parametrize("op", ["quantize", "layernorm", "add_layernorm", "rmsnorm", "gelu", "silu_mul"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_nan_and_inf_rows_give_nan_scales_other_rows_unchanged(op, dtype):
        # a non-finite row must be NaN after dequantization (as the FP model's value there is not finite), so its
        # scale is NaN: libdevice's fmax alone would drop the NaN and give the row scale 1 or a finite absmax
        x, other = planted(randn(4, 40, dtype=dtype, seed=17)), randn(4, 40, dtype=dtype, seed=18)
        weight, bias = randn(40, dtype=dtype, seed=19, scale=1.0), randn(40, dtype=dtype, seed=20, scale=0.3)
        y, q, scale = outputs(4, 40, dtype)
        if op == "quantize":
            kernels.quantize_per_token(to_numba(x), q, scale, threads=THREADS)
            ref = ops.quantize_per_token(x)
        elif op in ("layernorm", "add_layernorm"):
            residual = to_numba(other) if op == "add_layernorm" else None
            kernels.layernorm_quant(to_numba(x), to_numba(weight), to_numba(bias), 1e-5, y, q, scale,
                                    residual=residual, threads=THREADS)
            ref = (ops.add_layernorm_quant(x, other, weight, bias, 1e-5) if residual is not None
                   else ops.layernorm_quant(x, weight, bias, 1e-5))
        elif op == "rmsnorm":
            kernels.rmsnorm_quant(to_numba(x), to_numba(weight), 1e-6, y, q, scale, threads=THREADS)
            ref = ops.rmsnorm_quant(x, weight, 1e-6)
        elif op == "gelu":
            kernels.gelu_quant(to_numba(x), to_numba(bias), "none", q, scale, threads=THREADS)
            ref = ops.gelu_quant(x, bias, "none")
        else:
            kernels.silu_mul_quant(to_numba(x), to_numba(other), q, scale, threads=THREADS)
            ref = ops.silu_mul_quant(x, other)
        ref_q, ref_scale = ref[-2], ref[-1].reshape(4)
        assert torch.isnan(ref_scale[1:3]).all() and torch.isfinite(ref_scale[[0, 3]]).all()
        assert np.isnan(scale[1:3]).all()
        finite = [0, 3]
        check_quant(q[finite], scale[finite], ref_q[finite], ref_scale[finite])
        if len(ref) == 3:
            assert not torch.isfinite(from_numba(y, ref[0].dtype)[1:3].float()).all(dim=-1).any()
            check_float(y[finite], ref[0][finite])

    # ---- errors -----------------------------------------------------------------------------------------
    def test_unsupported_dtype_raises():
        q, scale = outputs(2, 8)
        with pytest.raises(ZQError, match="float32, float16 or bfloat16"):
            kernels.quantize_per_token(np.ones((2, 8), np.float64), q, scale, threads=THREADS)

    def test_shuffle_reduction_is_refused_in_simulator():
        q, scale = outputs(2, 8)
        with pytest.raises(ZQError, match="no warp shuffles"):
            kernels.quantize_per_token(np.ones((2, 8), np.float32), q, scale, reduction="shuffle")

    def test_rows_longer_than_the_kernels_take_raise():
        k = kernels.MAX_K + 1
        q, scale = outputs(1, k)
        with pytest.raises(ZQError, match="limit"):
            kernels.quantize_per_token(np.ones((1, k), np.float32), q, scale)
        q, scale = outputs(1, 40 * THREADS)
        with pytest.raises(ZQError, match="more threads per row"):  # 40 values per thread would not fit in registers
            kernels.quantize_per_token(np.ones((1, 40 * THREADS), np.float32), q, scale, threads=THREADS)

    def test_strided_output_raises_instead_of_writing_a_copy():
        x = np.ones((2, 8), np.float16)
        y = np.empty((2, 16), np.float16)[:, ::2]  # a strided view: a word view of it would be a copy
        q, scale = outputs(2, 8)
        with pytest.raises(ZQError, match="C-contiguous"):
            kernels.layernorm_quant(x, None, None, 1e-5, y, q, scale, threads=THREADS)

    def test_output_shape_mismatch_raises():
        with pytest.raises(ZQError, match="q must be int8"):
            kernels.quantize_per_token(np.ones((2, 8), np.float32), np.empty((2, 7), np.int8),
                                       np.empty(2, np.float32), threads=THREADS)

    def test_launch_shapes_cover_the_row_within_register_limits():
        for k in (1, 7, 64, 768, 3072, 11008, kernels.MAX_K):
            for vec in (1, 2, 4):
                threads, rows = kernels.launch_shape(k, vec)
                assert threads & (threads - 1) == 0 and 32 <= threads <= 1024 and threads * rows <= 1024
                assert -(-k // threads) <= kernels.MAX_PER_THREAD
        assert kernels.launch_shape(768, 4) == (32, 4) and kernels.launch_shape(3072, 4) == (128, 1)

    def heads(t: torch.Tensor) -> kernels.Heads:
        """A (possibly strided) [B, H, S, D] tensor as the rotary kernel reads it in place: its elements from the
        first on as a flat array, and its strides."""
        t = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        span = 1 + sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
        return kernels.Heads(t.as_strided((span,), (1,)).numpy().copy(), t.shape[1], tuple(t.stride()[:3]))

    def rotary_inputs(dtype: torch.dtype, cos_batch: int, seq: int = 3, batch: int = 2, dim: int = 16):
        """q (4 heads), k and v (2 heads) as strided views of one projection output [B, S, 8 * D], cos and sin."""
        g = torch.Generator().manual_seed(11)
        qkv = torch.randn(batch, seq, 8 * dim, generator=g).to(dtype)
        q, k, v = (t.view(batch, seq, -1, dim).transpose(1, 2) for t in qkv.split([4 * dim, 2 * dim, 2 * dim], -1))
        angles = torch.rand(cos_batch, 1, seq, dim // 2, generator=g).repeat(1, 1, 1, 2) * 6
        return q, k, v, angles.cos().to(dtype), angles.sin().to(dtype)

    def nan_like(t: torch.Tensor) -> np.ndarray:
        return to_numba(torch.full(t.shape, float("nan"), dtype=t.dtype)).reshape(-1)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("cos_batch", [1, 2])
    def test_rotary_embedding_reads_strided_heads_and_equals_the_reference_bit_for_bit(dtype, cos_batch):
        """Queries (4 heads) and keys (2 heads), strided views of one projection, in one launch; cos/sin per
        sequence or shared by the batch."""
        q, k, _, cos, sin = rotary_inputs(dtype, cos_batch)
        ref_q, ref_k = ops.rotary_embedding(q, k, cos, sin)
        q_out, k_out = nan_like(q), nan_like(k)
        kernels.rotary_embedding(heads(q), heads(k), *(to_numba(t).reshape(-1, 16) for t in (cos, sin)), q_out,
                                 k_out, 2, 3)
        assert torch.equal(from_numba(q_out, dtype).reshape(q.shape), ref_q)
        assert torch.equal(from_numba(k_out, dtype).reshape(k.shape), ref_k)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("seq, slots", [(3, [4, 5, 6]), (1, [7])], ids=["prefill", "decode"])
    def test_rotary_embedding_writes_keys_and_values_into_the_cache_as_the_reference(dtype, seq, slots):
        """The rotated keys and the values at their slots of the [B, 2, 8, D] cache, every other slot untouched."""
        q, k, v, cos, sin = rotary_inputs(dtype, 2, seq=seq)
        g = torch.Generator().manual_seed(12)
        caches = [torch.randn(2, 2, 8, 16, generator=g).to(dtype) for _ in range(2)]
        positions = torch.tensor(slots)
        ref_caches = [t.clone() for t in caches]
        ref_q = ops.rotary_embedding_kv_cache(q, k, v, cos, sin, *ref_caches, positions)
        q_out = nan_like(q)
        key_cache, value_cache = (to_numba(t).reshape(-1) for t in caches)
        kernels.rotary_embedding(heads(q), heads(k), *(to_numba(t).reshape(-1, 16) for t in (cos, sin)), q_out,
                                 key_cache, 2, seq, v=heads(v), v_out=value_cache, slots=positions.numpy())
        assert torch.equal(from_numba(q_out, dtype).reshape(q.shape), ref_q)
        assert torch.equal(from_numba(key_cache, dtype).reshape(caches[0].shape), ref_caches[0])
        assert torch.equal(from_numba(value_cache, dtype).reshape(caches[1].shape), ref_caches[1])

    def test_rotary_embedding_writes_no_key_or_value_outside_the_cache():
        """Slot 8 of an 8-slot cache (index_copy_ raises there): that position is written nowhere, slot 7 is."""
        q, k, v, cos, sin = rotary_inputs(torch.float32, 2, seq=2)
        caches = [torch.zeros(2, 2, 8, 16) for _ in range(2)]
        expected = [t.clone() for t in caches]
        ops.rotary_embedding_kv_cache(q[:, :, :1], k[:, :, :1], v[:, :, :1], cos[:, :, :1], sin[:, :, :1],
                                      *expected, torch.tensor([7]))
        key_cache, value_cache = (t.numpy().reshape(-1).copy() for t in caches)
        kernels.rotary_embedding(heads(q), heads(k), *(to_numba(t).reshape(-1, 16) for t in (cos, sin)), nan_like(q),
                                 key_cache, 2, 2, v=heads(v), v_out=value_cache, slots=np.array([7, 8]))
        assert torch.equal(torch.from_numpy(key_cache).view(2, 2, 8, 16), expected[0])
        assert torch.equal(torch.from_numpy(value_cache).view(2, 2, 8, 16), expected[1])

    def test_rotary_embedding_refuses_an_odd_head_dim_a_cos_of_the_wrong_length_and_half_a_cache_write():
        q, k = (kernels.Heads(np.ones(n * 7, np.float32), n, (n * 7, 7, 7)) for n in (2, 1))
        with pytest.raises(ZQError, match="even length"):
            kernels.rotary_embedding(q, k, np.ones((2, 7), np.float32), np.ones((2, 7), np.float32),
                                     q.flat.copy(), k.flat.copy(), 1, 1)
        q, k = (kernels.Heads(np.ones(n * 16, np.float32), n, (n * 16, 8, 8)) for n in (2, 1))
        cos = np.ones((3, 8), np.float32)
        with pytest.raises(ZQError, match="rows"):
            kernels.rotary_embedding(q, k, cos, cos, q.flat.copy(), k.flat.copy(), 1, 2)
        with pytest.raises(ZQError, match="or none of them"):
            kernels.rotary_embedding(q, k, cos[:2], cos[:2], q.flat.copy(), k.flat.copy(), 1, 2,
                                     slots=np.arange(2))
