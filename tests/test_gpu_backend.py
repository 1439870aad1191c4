"""The cuda backend: backend selection and its errors (CPU), and on a GPU the Numba kernels through the zq ops,
both block reductions, and whole compiled models through the CUDA-graph runner against the reference kernels.

GPU tests skip without a GPU. "Reference" on a GPU means the ops' reference implementations (zqcompile/ops.py,
the CPU backend's code, plain torch) run on the same CUDA tensors inside ``reference_kernels()``.
"""

from __future__ import annotations

import pytest
import torch

import zqcompile
from zqcompile import ops
from zqcompile.backends import build_runner, reference_kernels, resolve_backend
from zqcompile.backends.cuda_graphs import CUDAGraphRunner
from zqcompile.errors import ZQError

from helpers import TINY_MODELS, TINY_VOCAB, token_batch

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


# ---- selection and errors (CPU) ----------------------------------------------------------------------------

def test_auto_picks_cpu_for_a_cpu_model():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_unknown_backend_is_named():
    with pytest.raises(ZQError, match="unknown backend 'tpu'"):
        resolve_backend("tpu", torch.device("cpu"))


@no_gpu
def test_cuda_backend_without_gpu_says_so():
    with pytest.raises(ZQError, match="needs a CUDA GPU"):
        zqcompile.compile(TINY_MODELS["bert"](), "w8a8", backend="cuda")


def test_cuda_graphs_need_the_cuda_backend():
    with pytest.raises(ZQError, match="cuda_graphs=True needs backend='cuda'"):
        build_runner(torch.nn.Identity(), "cpu", cuda_graphs=True)
    identity = torch.nn.Identity()
    assert build_runner(identity, "cpu", cuda_graphs=None) is identity


def test_graph_runner_refuses_cpu_inputs():
    runner = CUDAGraphRunner(lambda x: x * 2)
    with pytest.raises(ZQError, match="needs CUDA tensor inputs"):
        runner(torch.ones(2))
    with pytest.raises(ZQError, match="max_graphs"):
        CUDAGraphRunner(lambda x: x, max_graphs=0)


def test_cpu_compile_keeps_the_graph_as_runner():
    qmodel = zqcompile.compile(TINY_MODELS["bert"](), "w8a8", backend="cpu")
    assert qmodel.runner is qmodel.graph_module and qmodel.executed_graph is qmodel.graph_module  # it runs itself


# ---- GPU: the Numba kernels through the ops ------------------------------------------------------------------

def _randn(*shape, dtype, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).cuda()


ULP = {torch.float32: 1e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _assert_quant_close(got, ref, dtype):
    """Scales to 1e-6 relative, except rows whose absmax element the two sides rounded to ``dtype`` one ulp
    apart (erf/exp/rsqrt and sum order differ in the last float32 bit): at most 2% of rows, within one ulp.
    int8 values within +-1, and at most 1% of them off."""
    (q, s), (rq, rs) = got, ref
    assert s.shape == rs.shape and s.dtype == torch.float32
    rel = ((s - rs).abs() / rs).flatten()
    assert (rel > 1e-6).float().mean().item() <= 0.02 and rel.max().item() <= ULP[dtype], rel.max()
    diff = (q.int() - rq.int()).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).float().mean().item() <= 0.01


def _assert_float_close(y, ry, dtype):
    """Within one ulp of the dtype the computation rounds to (the output's, or x's for RMSNorm's cast)."""
    assert y.dtype == ry.dtype and y.shape == ry.shape
    tol = max(ULP[y.dtype], ULP[dtype])
    assert torch.all((y.float() - ry.float()).abs() <= tol * ry.float().abs().clamp_min(1.0))


def _op_cases(dtype):
    """(op, args) for every fused op, on BERT-base / Llama-like row widths."""
    x = _randn(4, 33, 768, dtype=dtype, seed=1)
    r = _randn(4, 33, 768, dtype=dtype, seed=2)
    w, b = _randn(768, dtype=dtype, seed=3, scale=1.0), _randn(768, dtype=dtype, seed=4, scale=0.2)
    h = _randn(4, 33, 3072, dtype=dtype, seed=5)
    hb = _randn(3072, dtype=dtype, seed=6, scale=0.3)
    return [
        (ops.quantize_per_token, (x,)),
        (ops.layernorm_quant, (x, w, b, 1e-12)),
        (ops.layernorm_quant, (x, None, None, 1e-5)),
        (ops.add_layernorm_quant, (x, r, w, b, 1e-12)),
        (ops.rmsnorm_quant, (x, w, 1e-6)),
        (ops.rmsnorm_quant, (x, w.float(), 1e-6)),
        (ops.add_rmsnorm_quant, (x, r, w, 1e-6)),  # returns (x + r, q, scale): the sum is compared as the float output
        (ops.add_rmsnorm_quant, (x, r, w.float() + 1, 1e-6, True)),
        (ops.add_rmsnorm_quant, (*(_randn(3, 4096, dtype=dtype, seed=seed) for seed in (12, 13)),
                                 _randn(4096, dtype=dtype, seed=14, scale=1.0), 1e-5)),  # Llama-7B rows
        (ops.gelu_quant, (h, None, "none")),
        (ops.gelu_quant, (h, hb, "tanh")),
        (ops.silu_mul_quant, (h, _randn(4, 33, 3072, dtype=dtype, seed=7))),
        *_hadamard_cases(dtype),
    ]


def _hadamard_cases(dtype):
    """The online-Hadamard ops of the rotation presets at Llama-3.2-1B's widths (o_proj input 2048, down_proj
    input 8192: one block each), a width of several blocks (768 = 3 x 256) and a small block."""
    attn, x = _randn(4, 33, 2048, dtype=dtype, seed=8), _randn(4, 33, 768, dtype=dtype, seed=9)
    gate, up = _randn(2, 17, 8192, dtype=dtype, seed=10), _randn(2, 17, 8192, dtype=dtype, seed=11)
    return [
        (ops.hadamard_quant, (attn, 2048)),
        (ops.hadamard_quant, (x, 256)),
        (ops.hadamard_quant, (x, 16)),
        (ops.silu_mul_hadamard_quant, (gate, up, 8192)),
        (ops.silu_mul_hadamard_quant, (x, attn[..., :768].contiguous(), 256)),
        (ops.gelu_mul_hadamard_quant, (gate, up, "tanh", 8192)),
    ]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_numba_ops_match_reference_on_gpu(dtype):
    zqcompile.backends.register_cuda_kernels()
    for case, (op, args) in enumerate(_op_cases(dtype)):
        got = op(*args)
        with reference_kernels():
            ref = op(*args)
        try:
            if len(ref) == 3:
                _assert_float_close(got[0], ref[0], dtype)
            _assert_quant_close(got[-2:], ref[-2:], dtype)
        except AssertionError as exc:
            raise AssertionError(f"case {case}: {op} with {[getattr(a, 'dtype', a) for a in args]}") from exc


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["tree", "shuffle"])
@pytest.mark.parametrize("vec", [1, 2, 4])
@pytest.mark.parametrize("k,threads,rows_per_block", [(40, 32, 1), (776, 32, 4), (776, 64, 2), (5000, 256, 1)])
def test_reductions_word_widths_and_block_shapes_on_gpu(reduction, vec, k, threads, rows_per_block):
    from zqcompile.backends.numba_cuda import kernels
    from zqcompile.backends.numba_cuda.torch_ops import _nb, _stream

    x = _randn(37, k, dtype=torch.float16, seed=k) + 0.25
    w, b = _randn(k, dtype=torch.float16, seed=1, scale=1.0), _randn(k, dtype=torch.float16, seed=2)
    y = torch.full_like(x, float("nan"))
    q = torch.full(x.shape, 99, dtype=torch.int8, device="cuda")
    s = torch.full((37,), float("nan"), device="cuda")
    kernels.layernorm_quant(_nb(x), _nb(w), _nb(b), 1e-5, _nb(y), _nb(q), _nb(s), stream=_stream(),
                            reduction=reduction, vec=vec, threads=threads, rows_per_block=rows_per_block)
    ref = ops.layernorm_quant(x.cpu(), w.cpu(), b.cpu(), 1e-5)  # the CPU backend itself
    _assert_float_close(y.cpu(), ref[0], torch.float16)
    _assert_quant_close((q.cpu(), s.cpu().view(37, 1)), ref[1:], torch.float16)


@needs_gpu
@pytest.mark.gpu
def test_unsupported_row_length_falls_back_to_reference():
    from zqcompile.backends.numba_cuda import kernels

    zqcompile.backends.register_cuda_kernels()
    x = _randn(2, kernels.MAX_K + 64, dtype=torch.float16, seed=9)
    q, s = ops.quantize_per_token(x)
    rq, rs = ops.quantize_per_token(x.cpu())
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["tree", "shuffle"])
@pytest.mark.parametrize("k,block,threads,rows_per_block", [(192, 64, 32, 4), (2048, 2048, 128, 1),
                                                            (8192, 8192, 1024, 1), (14336, 2048, 512, 1)])
def test_hadamard_kernels_over_block_shapes_on_gpu(reduction, k, block, threads, rows_per_block):
    """Both reductions and explicit geometries (a row of 14336 = 7 x 2048, Llama-3-8B's MLP, is 56 KiB of float32:
    over the shared-memory limit, so the launch refuses it and the op takes the reference path)."""
    from zqcompile.backends.numba_cuda import kernels
    from zqcompile.backends.numba_cuda.torch_ops import _nb, _stream

    gate, up = _randn(37, k, dtype=torch.float16, seed=k), _randn(37, k, dtype=torch.float16, seed=k + 1)
    q = torch.full(gate.shape, 99, dtype=torch.int8, device="cuda")
    s = torch.full((37,), float("nan"), device="cuda")
    launch = lambda: kernels.silu_mul_hadamard_quant(  # noqa: E731
        _nb(gate), _nb(up), block, _nb(q), _nb(s), stream=_stream(), reduction=reduction, threads=threads,
        rows_per_block=rows_per_block)
    if k > kernels.MAX_HADAMARD_ROW:
        with pytest.raises(ZQError, match="shared memory"):
            launch()
        zqcompile.backends.register_cuda_kernels()
        q, s = ops.silu_mul_hadamard_quant(gate, up, block)  # the op's cuda kernel takes the reference path
    else:
        launch()
    ref = ops.silu_mul_hadamard_quant(gate.cpu(), up.cpu(), block)  # the CPU backend itself
    _assert_quant_close((q.cpu(), s.cpu().view(37, 1)), ref, torch.float16)


# ---- GPU: whole models through the runner -----------------------------------------------------------------

def _compile_cuda(family: str, recipe: str, **kwargs):
    model = TINY_MODELS[family]().half().cuda()
    return model, zqcompile.compile(model, recipe, backend="cuda", **kwargs)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("family,recipe", [
    ("bert", "w8a8"), ("bert", "w4a8"), ("gpt2", "w8a8"),
    ("llama", "w8a8"), ("llama", "w4a8"), ("llama", "w8a8-rot"), ("llama", "w4a8-rot"),
])
def test_compiled_model_matches_reference_kernels(family, recipe):
    model, qmodel = _compile_cuda(family, recipe)
    assert isinstance(qmodel.runner, CUDAGraphRunner)
    ids = token_batch(3, 16, seed=1).cuda()
    out = qmodel(input_ids=ids)
    with reference_kernels():
        ref = qmodel.graph_module(*qmodel.graph_inputs(input_ids=ids))
    key = "last_hidden_state" if family == "bert" else "logits"
    assert _rel_err(out[key], ref[0]) <= 1e-2
    with torch.no_grad():
        fp = model(input_ids=ids)[key]
    assert _rel_err(out[key], fp) <= 0.1  # and W8A8 stays close to the fp16 model


@needs_gpu
@pytest.mark.gpu
def test_rotated_llama_on_cuda_matches_the_cpu_compile():
    """w8a8-rot: the executed graph runs the fused online-Hadamard kernels, and its logits are the CPU compile's
    of the same fp16 model up to quantization-tie noise (an INT8 step here and there, SDPA's float order)."""
    _, qmodel = _compile_cuda("llama", "w8a8-rot")
    targets = [n.target for n in qmodel.executed_graph.graph.nodes]
    assert targets.count(torch.ops.zq.silu_mul_hadamard_quant.default) == 2
    assert targets.count(torch.ops.zq.hadamard_quant.default) == 2 and torch.ops.zq.hadamard.default not in targets
    cpu = zqcompile.compile(TINY_MODELS["llama"]().half(), "w8a8-rot", backend="cpu")
    ids = token_batch(3, 16, seed=1)
    got, expected = qmodel(input_ids=ids.cuda()).logits.cpu(), cpu(input_ids=ids).logits
    assert _rel_err(got, expected) <= 2e-2


@needs_gpu
@pytest.mark.gpu
def test_graph_replay_equals_eager_and_the_bound_never_evicts():
    _, qmodel = _compile_cuda("bert", "w8a8", buckets=False)
    runner = qmodel.runner
    runner.max_graphs = 2
    batches = [token_batch(b, s, seed=b).cuda() for b, s in ((2, 8), (3, 16), (1, 32))]
    with pytest.warns(UserWarning, match="max_graphs=2"):
        for ids in batches + batches[:1]:
            replayed = qmodel(input_ids=ids).last_hidden_state
            again = qmodel(input_ids=ids).last_hidden_state  # a replay of the cached graph
            eager = qmodel.executed_graph(*qmodel.graph_inputs(input_ids=ids))[0]
            assert torch.equal(replayed, eager) and torch.equal(again, eager)
    assert runner.captures == 2 and len(runner.cached_signatures) == 2  # the first two shapes stay captured
    assert runner.eager_calls == 2  # the third shape, twice, ran without a graph
    first = qmodel(input_ids=batches[0]).last_hidden_state
    qmodel(input_ids=(batches[0] + 1) % TINY_VOCAB)  # same shape, other tokens: a replay into the same buffers
    assert torch.equal(first, qmodel.executed_graph(*qmodel.graph_inputs(input_ids=batches[0]))[0])  # not overwritten


@needs_gpu
@pytest.mark.gpu
def test_graph_captured_in_inference_mode_replays_outside_it():
    _, qmodel = _compile_cuda("bert", "w8a8")
    ids = token_batch(2, 8).cuda()
    with torch.inference_mode():
        inside = qmodel(input_ids=ids).last_hidden_state
    outside = qmodel(input_ids=ids).last_hidden_state  # copies into the buffers captured above
    assert torch.equal(inside, outside)


@needs_gpu
@pytest.mark.gpu
def test_cuda_graphs_off_runs_the_rewritten_graph_eagerly():
    _, qmodel = _compile_cuda("bert", "w8a8", cuda_graphs=False)
    assert qmodel.runner is qmodel.executed_graph and qmodel.executed_graph is not qmodel.graph_module
    ids = token_batch(2, 8).cuda()
    with reference_kernels():
        ref = qmodel(input_ids=ids).last_hidden_state
    assert _rel_err(qmodel(input_ids=ids).last_hidden_state, ref) <= 1e-2
