"""fuse_add_rmsnorm_quant: a decoder's residual add and the quantized RMSNorm after it as one zq.add_rmsnorm_quant,
the same values bit for bit on the CPU (the op's reference is the unfused composition); its Numba kernel on a GPU
against the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zqcompile
from helpers import apply_pass, count_ops, make_tiny_llama, op_targets, token_batch
from zqcompile import ops
from zqcompile.passes import CompileContext, cleanup, fuse_add_rmsnorm_quant
from zqcompile.pipeline import run_target_phases
from zqcompile.recipe import load_recipe

FUSED = torch.ops.zq.add_rmsnorm_quant.default
NORM = torch.ops.zq.rmsnorm_quant.default
ADD = torch.ops.aten.add.Tensor
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
K = 32


class AddNorm(nn.Module):
    """Two pre-norm residual steps: ``h = x + out; q, s = rmsnorm_quant(h)``, the sum read again by the next add
    (``read_norm``: the normalised value is returned too; ``broadcast``: the residual is one row)."""

    def __init__(self, read_norm: bool = False, broadcast: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(K) + 0.5)
        self.read_norm, self.broadcast = read_norm, broadcast

    def forward(self, x, out1, out2):
        h = x + (out1[0] if self.broadcast else out1)
        y, q1, s1 = torch.ops.zq.rmsnorm_quant(h, self.weight, 1e-6)
        h = h + out2
        _, q2, s2 = torch.ops.zq.rmsnorm_quant(h, self.weight, 1e-6)
        return (q1, s1, q2, s2, h, *((y,) if self.read_norm else ()))


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple((torch.randn(2, 5, K, generator=g) * scale).to(dtype) for scale in (1.0, 3.0, 0.5))


def _context() -> CompileContext:
    return CompileContext(load_recipe("w8a8"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_residual_adds_and_quantized_norms_become_one_op_with_the_same_values(dtype):
    args = _inputs(dtype)
    module = AddNorm().to(dtype)
    gm = torch.export.export(module, args).module()
    with torch.no_grad():
        expected = gm(*args)
        result = apply_pass(fuse_add_rmsnorm_quant, gm, _context())
        got = gm(*args)
    apply_pass(cleanup, gm, None)
    assert result.counters == {"fuse_add_rmsnorm_quant.add_rmsnorm": 2}
    assert count_ops(gm, FUSED) == 2 and count_ops(gm, NORM) == 0 and count_ops(gm, ADD) == 0
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    # independent of the ops: the last sum is x + out1 + out2 rounded per add, as eager torch adds them
    x, out1, out2 = args
    assert torch.equal(got[4], (x + out1) + out2)
    h = (x.double() + out1.double()).to(dtype).double()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * module.weight.double()
    dequantized = got[0].double() * got[1].double()
    assert ((dequantized - normed).abs() <= got[1].double() * 0.5 + 2e-2 * normed.abs()).all()


@pytest.mark.parametrize("module, reason", [
    (AddNorm(read_norm=True), "normalised value is read"),
    (AddNorm(broadcast=True), "broadcasts"),
], ids=["norm_read", "broadcast"])
def test_what_it_cannot_fuse_is_refused_with_a_reason(module, reason):
    gm = torch.export.export(module, _inputs()).module()
    ctx = _context()
    result = apply_pass(fuse_add_rmsnorm_quant, gm, ctx)
    assert result.counters["fuse_add_rmsnorm_quant.add_rmsnorm"] == 1  # the other norm of the two fuses
    assert any(reason in why for why in ctx.target_skipped.values())


def test_a_norm_without_a_residual_add_is_unchanged():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(K))

        def forward(self, x, out1, out2):
            return torch.ops.zq.rmsnorm_quant(x * out1, self.weight, 1e-6)[1:]

    gm = torch.export.export(Plain(), _inputs()).module()
    before = op_targets(gm)
    ctx = _context()
    result = apply_pass(fuse_add_rmsnorm_quant, gm, ctx)
    assert not result.modified and op_targets(gm) == before and ctx.target_skipped == {}


def test_the_cuda_target_of_a_tiny_llama_fuses_every_residual_norm_exactly():
    """The cuda target phases of a W8A8 Llama's forward and generation graphs, run on the CPU (graph work): every
    norm after a residual add (two per layer, less the first layer's input norm) fused; the same logits and cache
    bit for bit as the compiled graph (the other cuda rewrites are exact too)."""
    model = make_tiny_llama()
    qmodel = zqcompile.compile(model, "w8a8", max_cache_len=16)
    layers = model.config.num_hidden_layers
    ids = token_batch(2, 8)
    generation = qmodel.generation
    cache_inputs = (ids, torch.ones(2, 16, dtype=torch.long), torch.arange(8).expand(2, 8), torch.arange(8))
    for gm, inputs in ((qmodel.graph_module, qmodel.graph_inputs(ids, torch.ones_like(ids))),
                       (generation.graph_module, cache_inputs)):
        ctx = _context()
        executed = run_target_phases(gm, ctx, "cuda")
        assert ctx.counters["fuse_add_rmsnorm_quant.add_rmsnorm"] == 2 * layers - 1
        assert count_ops(executed, FUSED) == 2 * layers - 1 and count_ops(executed, NORM) == 1
        caches = [() if gm is qmodel.graph_module else tuple(generation.layout.allocate(2, 16, "cpu"))
                  for _ in range(2)]
        with torch.no_grad():
            expected = gm(*inputs, *caches[0])
            got = executed(*inputs, *caches[1])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        for a, b in zip(*caches):
            assert torch.equal(a, b)


# ---- GPU: the Numba kernel ---------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_first", [False, True])
def test_add_rmsnorm_kernel_matches_the_reference_on_gpu(dtype, weight_first):
    """Decode (one row) and prefill rows of Llama-7B's width: the sum bit for bit, scales to 1e-6, INT8 values
    within one step on at most 1% (the kernel multiplies by 1 / scale, see kernels.py)."""
    zqcompile.backends.register_cuda_kernels()
    g = torch.Generator().manual_seed(3)
    weight = (torch.rand(4096, generator=g) + 0.5).to(torch.float32 if weight_first else dtype).cuda()
    for rows in (1, 3 * 129):
        x, residual = ((torch.randn(rows, 4096, generator=g) * 4).to(dtype).cuda() for _ in range(2))
        got = ops.add_rmsnorm_quant(x, residual, weight, 1e-5, weight_first)
        with ops.add_rmsnorm_quant.set_kernel_enabled("cuda", False):
            ref = ops.add_rmsnorm_quant(x, residual, weight, 1e-5, weight_first)
        assert torch.equal(got[0], ref[0])
        torch.testing.assert_close(got[2], ref[2], rtol=1e-6, atol=0)
        diff = (got[1].int() - ref[1].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01
