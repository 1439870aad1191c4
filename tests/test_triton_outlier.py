"""The LLM.int8() outlier GEMM (zqcompile/backends/triton_outlier.py): ``zq.outlier_int8_linear`` on CUDA tensors.

CPU: the argument checks, and both kernels under Triton's interpreter (``TRITON_INTERPRET=1``, in a child process)
at tiny shapes: the row quantization bit-equal to ``quantize_rows`` of the activation with its outlier columns zeroed
(an all-zero row, NaN / Inf rows, a NaN only in an outlier column, ties), and the GEMM within one rounding of the
float64 product of the same integers and within two of the reference op: no outliers, one, outliers on the edges
of K tiles, more than one ``BLOCK_C`` step of them, INT8 and packed INT4 weights with input-dim groups, fp16 / fp32
activations (the interpreter multiplies bf16 as raw bits), a ragged K; the outlier product alone bit-exact.
GPU (skipped without one; bf16 too): the registered kernel against the reference kernel at decode, medium and
prefill M, the outlier product alone, non-finite activations, a CUDA-graph replay, every large-M tiled config at
Llama-7B's 4096 x 4096, and a tiny Llama compiled with ``outlier_threshold`` against the reference kernels.
"""

from __future__ import annotations

import pytest
import torch

from helpers import run_in_triton_interpreter
from test_triton_gemm import needs_gpu, rel_err
from zqcompile import ops
from zqcompile.backends import reference_kernels, triton_gemm, triton_outlier
from zqcompile.backends.triton_gemm import GemmConfig
from zqcompile.errors import ZQError
from zqcompile.quant import dequantize_weight_values, pack_int4, quantize_rows, quantize_weight, unpack_weight


def outlier_operands(m: int, n: int, k: int, columns: list[int], *, int4: bool = False, g_in: int = 1,
                     x_dtype: torch.dtype = torch.float16, bias: bool = True, seed: int = 0, device: str = "cpu"):
    """(x, w, w_scale, columns, w_outlier, bias) as decompose_outliers builds them: the outlier columns of x scaled
    up 30x, the weight quantized with those columns zeroed (INT8 per channel, or INT4 in groups of K / g_in packed
    half-split), their FP16 copy beside it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    cols = torch.tensor(columns, dtype=torch.int64)
    x[:, cols] *= 30
    weight = torch.randn(n, k, generator=g) / k ** 0.5
    q, w_scale, _ = quantize_weight(weight.index_fill(1, cols, 0), 4 if int4 else 8, None,
                                    k // g_in if g_in > 1 else None)
    w = pack_int4(q, k // g_in) if int4 else q
    b = torch.randn(n, generator=g).to(x_dtype) if bias else None
    tensors = (x.to(x_dtype), w, w_scale, cols, weight[:, cols].half(), b)
    return tuple(None if t is None else t.to(device) for t in tensors)


def float64_outlier_reference(x, w, w_scale, columns, w_outlier, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's arithmetic in float64 from the same integers: the reference's quantized inliers times the dequantized
    weight, plus the outlier columns times their weight, plus bias. Returns (y, size), size the same sums of absolute
    values: what the roundings of a floating-point evaluation are relative to."""
    x, w, w_scale, columns, w_outlier = (t.cpu() for t in (x, w, w_scale, columns, w_outlier))
    q, s = quantize_rows(x.index_fill(-1, columns, 0))
    w_in = dequantize_weight_values(unpack_weight(w, w_scale), w_scale).double()
    x_out, w_out = x[:, columns].double(), w_outlier.to(x.dtype).double()  # the op computes in x's dtype
    b = bias.double().cpu() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    y = (q.double() @ w_in.T) * s.double() + x_out @ w_out.T + b
    return y, (q.double().abs() @ w_in.abs().T) * s.double() + x_out.abs() @ w_out.abs().T + b.abs()


def roundings_apart(y: torch.Tensor, ref: torch.Tensor, size: torch.Tensor) -> float:
    """The largest |y - ref| in units of y's dtype's epsilon times ``size``."""
    return ((y.double().cpu() - ref.double().cpu()).abs() / (torch.finfo(y.dtype).eps * size)).max().item()


def assert_rounds_like_the_reference(y: torch.Tensor, operands: tuple) -> None:
    """``y`` within one rounding of its dtype of the float64 result, and within two of the reference op (which rounds
    its INT8 part, its outlier part and their sum apart, where the kernel rounds once). Float32 outputs: float32
    sums of the products in any order, 64 epsilons of the absolute sums."""
    exact, size = float64_outlier_reference(*operands)
    limit = 64.0 if y.dtype == torch.float32 else 1.0
    assert roundings_apart(y, exact, size) <= limit
    with reference_kernels():
        ref = ops.outlier_int8_linear(*operands, y.dtype)
    assert roundings_apart(y, ref, size) <= limit + 1.0


# ---- CPU: checks ---------------------------------------------------------------------------------------------

def test_outlier_args_are_checked():
    x, w, w_scale, cols, w_o, b = outlier_operands(3, 32, 64, [5])
    assert triton_outlier.check_outlier_args(x, w, w_scale, cols, w_o, b).n == 32
    with pytest.raises(ZQError, match="floating point"):
        triton_outlier.check_outlier_args(x.to(torch.int8), w, w_scale, cols, w_o, b)
    with pytest.raises(ZQError, match="int64"):
        triton_outlier.check_outlier_args(x, w, w_scale, cols.int(), w_o, b)
    with pytest.raises(ZQError, match=r"\[N, C\]"):
        triton_outlier.check_outlier_args(x, w, w_scale, cols, w_o[:, :0], b)
    with pytest.raises(ZQError, match="in_features"):
        triton_outlier.check_outlier_args(x[:, :32], w, w_scale, cols, w_o, b)
    with pytest.raises(ZQError, match="only the tiled kernel"):
        triton_outlier.triton_outlier_linear(x, w, w_scale, cols, w_o, b, torch.float16,
                                             config=GemmConfig(64, 64, 64, 4, 3, kernel="tma_persistent"))


# ---- CPU: the kernels under Triton's interpreter ------------------------------------------------------------

EDGES = [0, 31, 32, 63, 64, 127, 128, 255]  # both sides of 32- and 64-wide K tiles, the first and last column
# (M, N, K, outlier columns, INT4, G_in, x dtype, bias, tiled config)
INTERPRETER_CASES = [
    (3, 32, 128, [], False, 1, torch.float16, True, GemmConfig(16, 32, 64, 4, 2)),  # no outliers
    (5, 48, 200, [77], False, 1, torch.float32, True, GemmConfig(16, 32, 64, 4, 2)),  # one; K = 200: masked tail
    (17, 40, 256, EDGES, False, 1, torch.float16, False, GemmConfig(32, 32, 32, 4, 2)),  # tile edges; ragged N
    (4, 32, 256, list(range(1, 256, 6)), False, 1, torch.float16, True, GemmConfig(16, 32, 64, 4, 2)),  # C = 43
    (6, 32, 256, EDGES, True, 4, torch.float16, True, GemmConfig(16, 32, 64, 4, 2)),  # INT4, groups of 64
]


def quant_rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Rows for the row quantization, K = 2500 (three 1024-wide steps), outliers on the steps' edges: ordinary rows,
    only an outlier non-zero, NaN in a kept column, -Inf in a kept column, NaN only in an outlier column, and a row
    of exact halves of its scale (0.5: ties, rounded to even)."""
    x = torch.randn(7, 2500, generator=torch.Generator().manual_seed(3))
    cols = torch.tensor([0, 1023, 1024, 2047, 2048, 2499])
    x[:, cols] *= 50
    x[1] = 0
    x[1, 1024] = 9.0
    x[2, 10] = float("nan")
    x[3, 11] = float("-inf")
    x[4, 2048] = float("nan")
    x[5] = 0
    x[5, 2:256] = (torch.arange(-127, 127) + 0.5) * 0.5
    x[5, 256] = 63.5
    return x, cols


def outlier_only_operands(device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """Inliers all zero, outlier values and weights small integers: the output is the outlier product alone, exact in
    fp16 whatever the order of the sums, so the gathered columns must meet the right weight columns bit for bit."""
    g = torch.Generator().manual_seed(5)
    m, n, k = 3, 32, 256
    cols = torch.tensor(EDGES)
    x = torch.zeros(m, k, dtype=torch.float16)
    x[:, cols] = torch.randint(-8, 9, (m, len(EDGES)), generator=g).half()
    w_o = torch.randint(-8, 9, (n, len(EDGES)), generator=g).half()
    return tuple(t.to(device) for t in (x, torch.zeros(n, k, dtype=torch.int8), torch.ones(n, 1), cols, w_o))


def run_interpreted_cases() -> dict:
    """Every interpreter case's output; runs in the child process of ``run_in_triton_interpreter``."""
    out = {}
    x, cols = quant_rows()
    for dtype in (torch.float32, torch.float16):
        out["quant", dtype] = triton_outlier.quantize_inliers(x.to(dtype), cols)
    cases = [(m, n, k, outlier_operands(m, n, k, columns, int4=int4, g_in=g_in, x_dtype=x_dtype, bias=bias, seed=i),
              cfg) for i, (m, n, k, columns, int4, g_in, x_dtype, bias, cfg) in enumerate(INTERPRETER_CASES)]
    cases.append((3, 32, 256, (*outlier_only_operands(), None), GemmConfig(16, 32, 32, 4, 2)))
    for i, (m, n, k, (x, w, w_scale, cols, w_o, b), cfg) in enumerate(cases):
        p = triton_outlier.check_outlier_args(x, w, w_scale, cols, w_o, b)
        q, s_x = triton_outlier.quantize_inliers(x, cols)
        out["gemm", i] = torch.empty(m, n, dtype=x.dtype)
        triton_outlier.launch(q, s_x, w, w_scale, b, out["gemm", i], x, cols, w_o, p, cfg)
    return out


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    pytest.importorskip("triton", minversion="3.7")  # 3.6's interpreter fails on numpy >= 2.4 scalars
    return run_in_triton_interpreter("test_triton_outlier", "run_interpreted_cases",
                                     tmp_path_factory.mktemp("interpreter") / "outputs.pt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_row_quantization_equals_quantize_rows(interpreted, dtype):
    x, cols = quant_rows()
    q, s = interpreted["quant", dtype]
    q_ref, s_ref = quantize_rows(x.to(dtype).index_fill(-1, cols, 0))
    assert torch.equal(q, q_ref)
    torch.testing.assert_close(s, s_ref.view(-1), rtol=0, atol=0, equal_nan=True)
    assert s.isnan().tolist() == [False, False, True, True, False, False, False]  # NaN / Inf kept; NaN outlier
    assert s[1] == 1.0 and not q[1].any()  # only an outlier: the inliers are all zero, scale 1
    assert s[5] == 0.5 and torch.equal(q[5, 2:256], (torch.arange(-127, 127) + 0.5).round().to(torch.int8))


@pytest.mark.parametrize("case", range(len(INTERPRETER_CASES)))
def test_interpreted_outlier_gemm_matches_float64_and_the_reference(interpreted, case):
    m, n, k, columns, int4, g_in, x_dtype, bias, _ = INTERPRETER_CASES[case]
    operands = outlier_operands(m, n, k, columns, int4=int4, g_in=g_in, x_dtype=x_dtype, bias=bias, seed=case)
    y = interpreted["gemm", case]
    assert y.dtype == x_dtype and y.shape == (m, n)
    assert_rounds_like_the_reference(y, operands)


def test_interpreted_outlier_product_alone_is_bit_exact(interpreted):
    y = interpreted["gemm", len(INTERPRETER_CASES)]
    assert y.any() and torch.equal(y, ops.outlier_int8_linear(*outlier_only_operands(), None, torch.float16))


# ---- GPU ------------------------------------------------------------------------------------------------------

def llama_columns(k: int, share: float, seed: int) -> list[int]:
    return sorted(torch.randperm(k, generator=torch.Generator().manual_seed(seed))[: max(1, int(k * share))].tolist())


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 128, 1024])  # the decode, medium and large configs' buckets
@pytest.mark.parametrize("int4,g_in,share,x_dtype", [
    (False, 1, 0.005, torch.float16), (False, 1, 0.02, torch.float16), (True, 64, 0.01, torch.float16),
    (False, 1, 0.01, torch.bfloat16), (False, 1, 0.01, torch.float32)])
def test_registered_kernel_matches_the_reference_kernel(m, int4, g_in, share, x_dtype):
    from zqcompile.backends import register_cuda_kernels

    register_cuda_kernels()
    operands = outlier_operands(m, 1000, 4096, llama_columns(4096, share, m), int4=int4, g_in=g_in,
                                x_dtype=x_dtype, seed=m, device="cuda")
    assert_rounds_like_the_reference(torch.ops.zq.outlier_int8_linear(*operands, x_dtype), operands)
    q, s = triton_outlier.quantize_inliers(operands[0], operands[3])
    # The reference on the CPU: on CUDA, torch divides by a Python scalar as a multiplication by its reciprocal,
    # so its row scales can be an ulp off the IEEE quotient absmax / 127 that the CPU and the kernel compute (the
    # GPU run of 2026-12-01 saw exactly that at M = 128 and 1024, with the op's output within its rounding).
    q_ref, s_ref = quantize_rows(operands[0].cpu().index_fill(-1, operands[3].cpu(), 0))
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref.view(-1))


@needs_gpu
@pytest.mark.gpu
def test_outlier_product_alone_is_bit_exact_on_gpu():
    y = triton_outlier.triton_outlier_linear(*outlier_only_operands("cuda"), None, torch.float16)
    assert y.any() and torch.equal(y.cpu(), ops.outlier_int8_linear(*outlier_only_operands(), None, torch.float16))


@needs_gpu
@pytest.mark.gpu
def test_non_finite_activations_poison_their_row_only_on_gpu():
    """NaN in a kept column, -Inf in a kept column, NaN in an outlier column: those rows non-finite, as in the
    reference op; the other rows equal to the clean input's."""
    x, *rest = outlier_operands(5, 256, 512, [3, 300], seed=4, device="cuda")
    poisoned = x.clone()
    poisoned[1, 10], poisoned[2, 11], poisoned[3, 300] = float("nan"), float("-inf"), float("nan")
    y, clean = (triton_outlier.triton_outlier_linear(t, *rest, torch.float16) for t in (poisoned, x))
    with reference_kernels():
        ref = ops.outlier_int8_linear(poisoned, *rest, torch.float16)
    assert (~torch.isfinite(y)).all(1).tolist() == [False, True, True, True, False]
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref))
    assert torch.equal(y[[0, 4]], clean[[0, 4]])


@needs_gpu
@pytest.mark.gpu
def test_outlier_kernel_inside_cuda_graph_replays():
    operands = outlier_operands(8, 4096, 4096, llama_columns(4096, 0.01, 8), seed=8, device="cuda")
    exact, size = float64_outlier_reference(*operands)
    run = lambda: triton_outlier.triton_outlier_linear(*operands, torch.float16)  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    for _ in range(3):
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert roundings_apart(y, exact, size) <= 1.0


@needs_gpu
@pytest.mark.gpu
def test_every_config_at_a_llama_shape_on_gpu():
    """Every tiled config of the large-M bucket (the most configs, and the largest tiles) at Llama-7B's 4096 x 4096
    with 1% outliers; the other buckets' first configs run in the tests above."""
    operands = outlier_operands(300, 4096, 4096, llama_columns(4096, 0.01, 300), seed=300, device="cuda")
    for cfg in triton_gemm.candidate_configs(300, 4096, None):
        assert_rounds_like_the_reference(triton_outlier.triton_outlier_linear(*operands, torch.float16, config=cfg),
                                         operands)


@needs_gpu
@pytest.mark.gpu
def test_compiled_llama_with_outliers_matches_reference_kernels():
    import zqcompile
    from helpers import make_tiny_llama, token_batch

    qmodel = zqcompile.compile(make_tiny_llama().half().cuda(), {"base": "w8a8", "outlier_threshold": 2.0},
                               backend="cuda")
    assert qmodel.context.counters["llm_int8.decomposed"] > 0
    ids = token_batch(3, 16, seed=1).cuda()
    out = qmodel(input_ids=ids)["logits"]
    with reference_kernels():
        ref = qmodel.graph_module(*qmodel.graph_inputs(input_ids=ids))[0]
    assert rel_err(out, ref.double().cpu()) <= 1e-2
