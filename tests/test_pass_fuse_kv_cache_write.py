"""fuse_kv_cache_write: a layer's rotary embedding and its two KV-cache writes as one zq.rotary_embedding_kv_cache,
the same outputs and the same cache bit for bit on the CPU; its Numba kernel on a GPU against the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

import zqcompile
from helpers import apply_pass, count_ops, make_tiny_llama, op_targets, token_batch
from zqcompile import ops
from zqcompile.passes import CompileContext, cleanup, fuse_kv_cache_write, fuse_rotary_embedding
from zqcompile.pipeline import run_target_phases
from zqcompile.recipe import load_recipe

FUSED = torch.ops.zq.rotary_embedding_kv_cache.default
ROTARY = torch.ops.zq.rotary_embedding.default
WRITE = torch.ops.aten.index_copy_.default
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
B, H, S, L, D = 2, 2, 3, 8, 8


class CachedAttention(nn.Module):
    """One layer of HF's attention over the static cache as zqcompile/kv_cache.py captures it: rotary embedding of
    q and k, ``index_copy_`` of k and v into the caches at ``positions``, SDPA over the caches. ``read_keys``:
    the rotated keys are returned too; ``value_positions``: the values are written at other slots."""

    def __init__(self, read_keys: bool = False, value_positions: bool = False):
        super().__init__()
        self.read_keys, self.value_positions = read_keys, value_positions

    def forward(self, q, k, v, cos, sin, positions, other_positions, key_cache, value_cache):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        keys = key_cache.index_copy_(2, positions, k)
        values = value_cache.index_copy_(2, other_positions if self.value_positions else positions, v)
        out = F.scaled_dot_product_attention(q, keys, values)
        return (out, k) if self.read_keys else (out,)


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, generator=g).transpose(1, 2).to(dtype) for _ in range(3))  # strided views
    angles = torch.rand(B, S, D // 2, generator=g).repeat(1, 1, 2) * 6
    caches = [torch.randn(B, H, L, D, generator=g).to(dtype) for _ in range(2)]
    return (q, k, v, angles.cos().to(dtype), angles.sin().to(dtype), torch.tensor([2, 3, 5]), torch.tensor([0, 1, 7]),
            *caches)


def _context() -> CompileContext:
    return CompileContext(load_recipe("w8a8"))


def _run(gm: torch.fx.GraphModule, args: tuple[torch.Tensor, ...]) -> tuple[tuple, list[torch.Tensor]]:
    caches = [t.clone() for t in args[-2:]]
    with torch.no_grad():
        return gm(*args[:-2], *caches), caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_and_cache_writes_become_one_op_with_the_same_values(dtype):
    args = _inputs(dtype)
    gm = torch.export.export(CachedAttention(), args).module()
    expected, expected_caches = _run(gm, args)
    apply_pass(fuse_rotary_embedding, gm, _context())
    result = apply_pass(fuse_kv_cache_write, gm, _context())
    apply_pass(cleanup, gm, None)
    got, caches = _run(gm, args)
    assert result.counters == {"fuse_kv_cache_write.rotary_and_cache_write": 1}
    assert count_ops(gm, FUSED) == 1 and count_ops(gm, ROTARY, WRITE) == 0
    assert torch.equal(got[0], expected[0])
    for a, b in zip(caches, expected_caches):
        assert torch.equal(a, b)
    # independent of the ops: the written slots hold the rotated keys (float64) and the values, the others are kept
    q, k, v, cos, sin, positions, _, key_cache, value_cache = (a.double() if a.is_floating_point() else a
                                                               for a in args)
    kept = [slot for slot in range(L) if slot not in positions.tolist()]
    rotated = k * cos[:, None] + rotate_half(k) * sin[:, None]
    torch.testing.assert_close(caches[0][:, :, positions].double(), rotated, rtol=0, atol=4e-3)
    assert torch.equal(caches[1][:, :, positions].double(), v)
    assert torch.equal(caches[0][:, :, kept].double(), key_cache[:, :, kept])
    assert torch.equal(caches[1][:, :, kept].double(), value_cache[:, :, kept])


@pytest.mark.parametrize("module, reason", [
    (CachedAttention(read_keys=True), "rotated keys are read elsewhere"),
    (CachedAttention(value_positions=True), "different positions"),
], ids=["keys_read", "other_positions"])
def test_what_it_cannot_fuse_is_refused_with_a_reason(module, reason):
    gm = torch.export.export(module, _inputs()).module()
    apply_pass(fuse_rotary_embedding, gm, _context())
    before = op_targets(gm)
    ctx = _context()
    result = apply_pass(fuse_kv_cache_write, gm, ctx)
    assert not result.modified and op_targets(gm) == before
    assert any(reason in why for why in ctx.target_skipped.values())


def test_cache_writes_without_a_fused_rotary_embedding_are_unchanged():
    """GPT-2's attention writes the projected keys as they are: not this pass's pattern (the rotary pass did not
    run here); the graph is left alone with a reason."""
    gm = torch.export.export(CachedAttention(), _inputs()).module()
    before = op_targets(gm)
    ctx = _context()
    result = apply_pass(fuse_kv_cache_write, gm, ctx)
    assert not result.modified and op_targets(gm) == before
    assert any("not the output of a fused rotary embedding" in why for why in ctx.target_skipped.values())


def test_the_cuda_target_of_a_tiny_llama_writes_its_cache_in_the_rotary_kernel_exactly():
    """The generation graph of a W8A8 GQA Llama through the cuda target phases on the CPU: every layer's cache
    writes fused, the prefill and decode logits and the cache bit for bit those of the compiled graph; the
    forward graph (no cache) has nothing to fuse."""
    model = make_tiny_llama()
    qmodel = zqcompile.compile(model, "w8a8", max_cache_len=16)
    layers = model.config.num_hidden_layers
    generation = qmodel.generation
    ctx = _context()
    executed = run_target_phases(generation.graph_module, ctx, "cuda")
    assert ctx.counters["fuse_kv_cache_write.rotary_and_cache_write"] == layers and ctx.target_skipped == {}
    assert count_ops(executed, FUSED) == layers and count_ops(executed, WRITE, ROTARY) == 0
    ids = token_batch(2, 9)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    results = []
    for gm in (generation.graph_module, executed):
        cache = generation.layout.allocate(2, 16, "cpu")
        with torch.no_grad():
            prefill = gm(ids[:, :8], mask, torch.arange(8).expand(2, 8), torch.arange(8), *cache)[0]
            decode = gm(ids[:, 8:], mask, torch.full((2, 1), 8), torch.tensor([8]), *cache)[0]
        results.append((prefill, decode, cache))
    (prefill, decode, cache), (prefill_f, decode_f, cache_f) = results
    assert torch.equal(prefill_f, prefill) and torch.equal(decode_f, decode)
    for a, b in zip(cache_f, cache):
        assert torch.equal(a, b)
    forward_ctx = _context()
    run_target_phases(qmodel.graph_module, forward_ctx, "cuda")
    assert "fuse_kv_cache_write.rotary_and_cache_write" not in forward_ctx.counters


# ---- GPU: the Numba kernel ---------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rotary_cache_kernel_matches_the_reference_on_gpu(dtype):
    """Prefill (strided projections, cos per sequence, the prompt at slots 5..) and decode (S = 1, batch 32)
    shapes of Llama-7B's heads: the rotated queries and the cache bit for bit in 16 bits (float32 to a few ulps:
    the GPU may contract a product and a sum into one FMA); the slots not written are untouched."""
    zqcompile.backends.register_cuda_kernels()
    g = torch.Generator().manual_seed(5)
    for batch, seq, cos_batch, start in ((3, 17, 3, 5), (32, 1, 1, 40)):
        qkv = torch.randn(batch, seq, (32 + 2 * 8) * 128, generator=g).to(dtype).cuda()  # the fused projection
        q, k, v = (t.view(batch, seq, -1, 128).transpose(1, 2) for t in qkv.split([32 * 128, 8 * 128, 8 * 128], -1))
        angles = torch.rand(cos_batch, 1, seq, 64, generator=g).repeat(1, 1, 1, 2) * 100
        cos, sin = angles.cos().to(dtype).cuda(), angles.sin().to(dtype).cuda()
        positions = torch.arange(start, start + seq, device="cuda")
        caches = [torch.randn(batch, 8, 64, 128, generator=g).to(dtype).cuda() for _ in range(2)]
        caches += [cache.clone() for cache in caches]  # the reference's caches start equal: unwritten slots compare
        got = ops.rotary_embedding_kv_cache(q, k, v, cos, sin, caches[0], caches[1], positions)
        with ops.rotary_embedding_kv_cache.set_kernel_enabled("cuda", False):
            ref = ops.rotary_embedding_kv_cache(q, k, v, cos, sin, caches[2], caches[3], positions)
        plain = ops.rotary_embedding(q, k, cos, sin)  # the plain op's kernel reads the strided views too
        assert got.is_contiguous() and got.shape == ref.shape
        pairs = ((got, ref), (caches[0], caches[2]), (caches[1], caches[3]), (plain[0], ref),
                 (plain[1], caches[2][:, :, start:start + seq]))
        for a, b in pairs:
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(a, b)
