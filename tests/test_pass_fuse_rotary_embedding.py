"""fuse_rotary_embedding: HF's apply_rotary_pos_emb of a layer's queries and keys as one zq.rotary_embedding, the
same values (bit for bit: the op rounds as eager torch does); its Numba kernel on a GPU against the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

import zqcompile
from helpers import apply_pass, count_ops, cuda_target_runs, make_tiny_llama, op_targets
from zqcompile import ops
from zqcompile.passes import CompileContext, cleanup, fuse_rotary_embedding
from zqcompile.recipe import load_recipe

ROTARY = torch.ops.zq.rotary_embedding.default
CAT = torch.ops.aten.cat.default
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
B, HQ, HK, S, D = 2, 4, 2, 5, 8


class Rotary(nn.Module):
    """Two layers of transformers' apply_rotary_pos_emb (cos/sin unsqueezed per layer, as Llama's layers do)."""

    def __init__(self, per_head_cos: bool = False, keys: bool = True):
        super().__init__()
        self.per_head_cos, self.keys = per_head_cos, keys

    def forward(self, q, k, cos, sin):
        outputs = []
        for _ in range(2):
            c, s = (t.unsqueeze(1) for t in (cos, sin))
            if self.per_head_cos:
                c, s = c.expand(-1, q.shape[1], -1, -1) * 1, s.expand(-1, q.shape[1], -1, -1) * 1
            q = q * c + rotate_half(q) * s
            if self.keys:
                ck, sk = (c[:, :k.shape[1]], s[:, :k.shape[1]]) if self.per_head_cos else (c, s)
                k = (k * ck) + (rotate_half(k) * sk)
            outputs += [q, k]
        return outputs


def _inputs(dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, S, HQ, D, generator=g).transpose(1, 2)  # strided, as the projections' views are
    k = torch.randn(B, HK, S, D, generator=g)
    angles = torch.rand(B, S, D // 2, generator=g).repeat(1, 1, 2) * 6
    return q.to(dtype), k.to(dtype), angles.cos().to(dtype), angles.sin().to(dtype)


def _context() -> CompileContext:
    return CompileContext(load_recipe("w8a8"))


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Independent reference: each pair (x_i, x_{i + D/2}) rotated by its angle, in float64."""
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    c, s = cos[:, None, :, : D // 2], sin[:, None, :, : D // 2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_queries_and_keys_are_rotated_by_one_op_with_the_same_values(dtype):
    args = _inputs(dtype)
    gm = torch.export.export(Rotary(), args).module()
    with torch.no_grad():
        expected = gm(*args)
        result = apply_pass(fuse_rotary_embedding, gm, _context())
        got = gm(*args)
    apply_pass(cleanup, gm, None)
    assert result.counters == {"fuse_rotary_embedding.pairs": 2}
    assert count_ops(gm, ROTARY) == 2 and count_ops(gm, CAT) == 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    q, k, cos, sin = (a.double() for a in args)
    for _ in range(2):
        q, k = _rotated(q, cos, sin), _rotated(k, cos, sin)
    if dtype == torch.float64:
        torch.testing.assert_close(got[-2], q, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[-1], k, rtol=1e-12, atol=1e-12)


def test_a_graph_without_the_pattern_is_unchanged():
    class Other(nn.Module):
        def forward(self, q, k, cos, sin):
            return q * cos[:, None] + q.flip(-1) * sin[:, None]  # not rotate_half

    gm = torch.export.export(Other(), _inputs()).module()
    before = op_targets(gm)
    ctx = _context()
    result = apply_pass(fuse_rotary_embedding, gm, ctx)
    assert not result.modified and op_targets(gm) == before and ctx.target_skipped == {}


@pytest.mark.parametrize("module, reason", [
    (Rotary(per_head_cos=True, keys=True), "do not broadcast over the heads"),
    (Rotary(keys=False), "no partner"),
], ids=["per_head_cos", "queries_only"])
def test_what_it_cannot_fuse_is_refused_with_a_reason(module, reason):
    gm = torch.export.export(module, _inputs()).module()
    ctx = _context()
    result = apply_pass(fuse_rotary_embedding, gm, ctx)
    assert count_ops(gm, ROTARY) == 2 * result.counters["fuse_rotary_embedding.pairs"]
    assert any(reason in why for why in ctx.target_skipped.values())


def test_the_cuda_target_of_a_tiny_decoder_rotates_and_attends_exactly():
    """Both cuda-target rewrites of a GQA Llama's forward and generation graphs, run on the CPU (they are graph
    work): every layer's rotary embedding fused and its attention over the stored KV heads, the same logits
    (Qwen2's rotary embedding is the same transformers function; its capture is tested with the GQA pass)."""
    model = make_tiny_llama()
    layers = model.config.num_hidden_layers
    for _, ctx, expected, got, _ in cuda_target_runs(zqcompile.compile(model, "w8a8", max_cache_len=16), _context):
        assert ctx.counters["fuse_rotary_embedding.pairs"] == layers
        assert ctx.counters["grouped_query_attention.fold_query_heads"] == layers and ctx.target_skipped == {}
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# ---- GPU: the Numba kernel ---------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rotary_kernel_matches_the_reference_on_gpu(dtype):
    """Prefill (strided q, cos per sequence) and decode (S = 1, cos shared by the batch) shapes, Llama-7B's head
    dim: 16-bit outputs bit for bit (each product and the sum rounded as eager torch rounds them), float32 to
    a few ulps (the GPU may contract a product and a sum into one FMA)."""
    zqcompile.backends.register_cuda_kernels()
    g = torch.Generator().manual_seed(5)
    for batch, seq, cos_batch in ((3, 17, 3), (32, 1, 1)):
        q = torch.randn(batch, seq, 32, 128, generator=g).transpose(1, 2).to(dtype).cuda()
        k = torch.randn(batch, seq, 8, 128, generator=g).transpose(1, 2).to(dtype).cuda()
        angles = torch.rand(cos_batch, 1, seq, 64, generator=g).repeat(1, 1, 1, 2) * 100
        cos, sin = angles.cos().to(dtype).cuda(), angles.sin().to(dtype).cuda()
        got = ops.rotary_embedding(q, k, cos, sin)
        with ops.rotary_embedding.set_kernel_enabled("cuda", False):
            ref = ops.rotary_embedding(q, k, cos, sin)
        for a, b in zip(got, ref):
            assert a.is_contiguous() and a.shape == b.shape
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(a, b)
