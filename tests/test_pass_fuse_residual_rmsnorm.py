"""fuse_residual_rmsnorm: a decoder's residual add and the quantized RMSNorm after it as one zq.add_rmsnorm_quant,
the last add and the final (not quantized) norm as one zq.add_rmsnorm; the same values bit for bit on the CPU (the
ops' references are the unfused compositions); their Numba kernel on a GPU against the references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import zqcompile
from helpers import apply_pass, count_ops, cuda_target_runs, make_tiny_llama, op_targets
from zqcompile import ops
from zqcompile.passes import CompileContext, cleanup, fuse_residual_rmsnorm, remove_tensor_asserts
from zqcompile.recipe import load_recipe

FUSED = torch.ops.zq.add_rmsnorm_quant.default
FINAL = torch.ops.zq.add_rmsnorm.default
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
        result = apply_pass(fuse_residual_rmsnorm, gm, _context())
        got = gm(*args)
    apply_pass(cleanup, gm, None)
    assert result.counters == {"fuse_residual_rmsnorm.add_rmsnorm_quant": 2}
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
    result = apply_pass(fuse_residual_rmsnorm, gm, ctx)
    assert result.counters["fuse_residual_rmsnorm.add_rmsnorm_quant"] == 1  # the other norm of the two fuses
    assert any(reason in why for why in ctx.target_skipped.values())


def test_the_last_add_and_the_final_norm_become_one_op_with_the_same_values():
    """transformers' LlamaRMSNorm (float32 statistics, cast back, times the weight) of a residual sum that is
    returned too, in float16."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class Final(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = LlamaRMSNorm(K, eps=1e-5)
            nn.init.uniform_(self.norm.weight, 0.5, 1.5)

        def forward(self, x, out1, out2):
            h = x + out1
            return self.norm(h), h

    args = _inputs(torch.float16)
    module = Final().half()
    gm = torch.export.export(module, args).module()
    apply_pass(remove_tensor_asserts, gm, None)  # as the pipeline's canonicalize phase does
    with torch.no_grad():
        expected = gm(*args)
        result = apply_pass(fuse_residual_rmsnorm, gm, _context())
        apply_pass(cleanup, gm, None)
        got = gm(*args)
    assert result.counters == {"fuse_residual_rmsnorm.add_rmsnorm": 1}
    assert op_targets(gm) == [str(FINAL), "<built-in function getitem>", "<built-in function getitem>"]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with torch.no_grad():  # and the module itself
        assert torch.equal(got[0], module(*args)[0])


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
    result = apply_pass(fuse_residual_rmsnorm, gm, ctx)
    assert not result.modified and op_targets(gm) == before and ctx.target_skipped == {}


def test_the_cuda_target_of_a_tiny_llama_fuses_every_residual_norm_exactly():
    """The cuda target phases of a W8A8 Llama's forward and generation graphs, run on the CPU (graph work): every
    quantized norm after a residual add (two per layer, less the first layer's input norm) and the final norm fused,
    no add left; the same logits and cache bit for bit as the compiled graph (the other cuda rewrites are exact
    too)."""
    model = make_tiny_llama()
    layers = model.config.num_hidden_layers
    for executed, ctx, expected, got, caches in cuda_target_runs(zqcompile.compile(model, "w8a8", max_cache_len=16),
                                                                 _context):
        assert ctx.counters["fuse_residual_rmsnorm.add_rmsnorm_quant"] == 2 * layers - 1
        assert ctx.counters["fuse_residual_rmsnorm.add_rmsnorm"] == 1  # the final norm
        assert count_ops(executed, FUSED) == 2 * layers - 1 and count_ops(executed, NORM, FINAL) == 2
        float_adds = [n for n in executed.graph.nodes if n.target is ADD and n.meta["val"].is_floating_point()]
        assert not float_adds and count_ops(executed, torch.ops.aten.rsqrt.default) == 0
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        for a, b in zip(*caches):
            assert torch.equal(a, b)


# ---- GPU: the Numba kernel (add_rmsnorm_quant's: tests/test_gpu_backend.py, with the other fused ops) ----------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_final_add_rmsnorm_kernel_matches_the_reference_on_gpu(dtype):
    """The sum bit for bit; the norm within one unit of its dtype's last place (float32: 1e-6 relative, the
    statistics' sums are ordered differently), for decode and prefill rows of Llama-7B's width."""
    zqcompile.backends.register_cuda_kernels()
    g = torch.Generator().manual_seed(4)
    weight = (torch.rand(4096, generator=g) + 0.5).to(dtype).cuda()
    tolerance = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 1e-6}[dtype]
    for rows in (1, 3 * 129):
        x, residual = ((torch.randn(rows, 4096, generator=g) * 4).to(dtype).cuda() for _ in range(2))
        got = ops.add_rmsnorm(x, residual, weight, 1e-5)
        with ops.add_rmsnorm.set_kernel_enabled("cuda", False):
            ref = ops.add_rmsnorm(x, residual, weight, 1e-5)
        assert torch.equal(got[0], ref[0])
        torch.testing.assert_close(got[1].float(), ref[1].float(), rtol=tolerance, atol=tolerance)
