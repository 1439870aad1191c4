"""grouped_query_attention: SDPA over HF's repeat_kv becomes SDPA over the KV heads as stored, the same values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import apply_pass, count_ops, make_tiny_llama, make_tiny_qwen2, op_targets
from zqcompile.passes import CompileContext, cleanup, grouped_query_attention
from zqcompile.recipe import load_recipe

SDPA = torch.ops.aten.scaled_dot_product_attention.default
EXPAND = torch.ops.aten.expand.default
INDEX_COPY = torch.ops.aten.index_copy_.default
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
B, HEADS, KV, S, L, D = 2, 6, 2, 3, 5, 8


def repeat_kv(x: torch.Tensor, rep: int) -> torch.Tensor:
    """transformers' repeat_kv, as Llama / Qwen2 / Mistral call it."""
    batch, kv, length, dim = x.shape
    return x[:, :, None, :, :].expand(batch, kv, rep, length, dim).reshape(batch, kv * rep, length, dim)


def tiled(x: torch.Tensor, rep: int) -> torch.Tensor:
    """Another order (head h reads KV head h % kv): the pass must not take it for repeat_kv."""
    batch, kv, length, dim = x.shape
    return x[:, None].expand(batch, rep, kv, length, dim).reshape(batch, rep * kv, length, dim)


class Attention(nn.Module):
    """Two layers of attention over repeated keys/values, both reading one mask (as HF's layers do)."""

    def __init__(self, repeat=repeat_kv, causal: bool = False):
        super().__init__()
        self.repeat, self.causal = repeat, causal

    def forward(self, q, k, v, mask=None):
        rep = q.shape[1] // k.shape[1]
        k, v = self.repeat(k, rep), self.repeat(v, rep)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return F.scaled_dot_product_attention(h * 0.5, k, v, attn_mask=mask, is_causal=self.causal)


def _inputs(seq: int = S, mask: str | None = "bool", heads: int = HEADS):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, heads, seq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, KV, L, D, generator=g, dtype=torch.float64) for _ in range(2))
    if mask is None:
        return q, k, v
    keep = torch.rand(B, 1, seq, L, generator=g) > 0.3
    keep[..., 0] = True  # every query sees a slot
    return q, k, v, keep if mask == "bool" else torch.where(keep, 0.0, -torch.rand(keep.shape, generator=g) * 9)


def _reference(q, k, v, mask=None, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v with keys/values repeated by repeat_interleave, twice, in float64."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    bias = torch.zeros(q.shape[2], k.shape[2], dtype=torch.float64)
    if causal:
        bias = bias.masked_fill(torch.ones_like(bias, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        bias = bias + (torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask)
    h = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5 + bias, -1) @ v
    return torch.softmax(h * 0.5 @ k.transpose(-1, -2) / D ** 0.5 + bias, -1) @ v


def _export(module: nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    return torch.export.export(module, args).module()


def _context() -> CompileContext:
    return CompileContext(load_recipe("w8a8"))


def _kv_read_in_place(gm: torch.fx.GraphModule) -> bool:
    """Every SDPA reads its keys and values as given (graph inputs or the cache writes), not a repeat of them."""
    def source(node):
        while node.target is torch.ops.aten.slice.Tensor:
            node = node.args[0]
        return node
    sdpa = [n for n in gm.graph.nodes if n.target is SDPA]
    return bool(sdpa) and all(source(n.args[i]).op == "placeholder" or source(n.args[i]).target is INDEX_COPY
                              for n in sdpa for i in (1, 2))


@pytest.mark.parametrize("mask", ["bool", "float", None])
def test_repeated_keys_values_are_read_in_place_with_the_same_values(mask):
    args = _inputs(mask=mask)
    gm = _export(Attention(), *args)
    assert not _kv_read_in_place(gm)
    with torch.no_grad():
        expected = gm(*args)
        result = apply_pass(grouped_query_attention, gm, _context())
        got = gm(*args)
    assert result.counters == {"grouped_query_attention.fold_query_heads": 2}
    assert _kv_read_in_place(gm)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, _reference(*args), rtol=1e-12, atol=1e-12)
    apply_pass(cleanup, gm, None)  # the repeats nothing reads now (the pipeline's cleanup runs after the pass)
    assert count_ops(gm, EXPAND) == (0 if mask is None else 1)  # the mask's rows repeated once, for both layers


def test_a_one_token_query_reads_the_mask_as_it_is():
    args = _inputs(seq=1, mask="float")
    gm = _export(Attention(), *args)
    with torch.no_grad():
        result = apply_pass(grouped_query_attention, gm, _context())
        got = gm(*args)
    assert result.counters == {"grouped_query_attention.fold_query_heads": 2}
    mask = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "mask")
    assert all(n.args[3] is mask for n in gm.graph.nodes if n.target is SDPA)  # [B, 1, 1, L]: no repeat
    apply_pass(cleanup, gm, None)
    assert count_ops(gm, EXPAND) == 0
    torch.testing.assert_close(got, _reference(*args), rtol=1e-12, atol=1e-12)


def test_causal_attention_without_a_mask_uses_enable_gqa():
    args = _inputs(seq=L, mask=None)
    gm = _export(Attention(causal=True), *args)
    with torch.no_grad():
        result = apply_pass(grouped_query_attention, gm, _context())
        got = gm(*args)
    assert result.counters == {"grouped_query_attention.enable_gqa": 2}
    assert all(n.kwargs["enable_gqa"] and n.kwargs["is_causal"] for n in gm.graph.nodes if n.target is SDPA)
    assert _kv_read_in_place(gm)
    torch.testing.assert_close(got, _reference(*args, causal=True), rtol=1e-12, atol=1e-12)


def test_attention_without_repeated_keys_values_is_unchanged():
    args = _inputs(mask="bool", heads=KV)
    gm = _export(Attention(repeat=lambda x, rep: x), *args)
    before = op_targets(gm)
    ctx = _context()
    result = apply_pass(grouped_query_attention, gm, ctx)
    assert not result.modified and op_targets(gm) == before and ctx.target_skipped == {}


class PerHeadMask(nn.Module):
    def forward(self, q, k, v, keep):
        mask = keep.expand(-1, q.shape[1], -1, -1).clone()
        return F.scaled_dot_product_attention(q, repeat_kv(k, 3), repeat_kv(v, 3), attn_mask=mask)


class OnlyKeysRepeated(nn.Module):
    def forward(self, q, k, v, keep):
        return F.scaled_dot_product_attention(q, repeat_kv(k, 3), v.repeat(1, 3, 1, 1), attn_mask=keep)


@pytest.mark.parametrize("module, reason", [
    (Attention(repeat=tiled), "not dim 2"),
    (PerHeadMask(), "differs per head"),
    (OnlyKeysRepeated(), "not repeated alike"),
], ids=["tiled_order", "per_head_mask", "only_keys_repeated"])
def test_what_it_cannot_prove_equal_is_refused_with_a_reason(module, reason):
    args = _inputs(mask="bool")
    gm = _export(module, *args)
    before = op_targets(gm)
    ctx = _context()
    result = apply_pass(grouped_query_attention, gm, ctx)
    assert not result.modified and op_targets(gm) == before
    assert ctx.target_skipped and all(reason in why for why in ctx.target_skipped.values())


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_qwen2], ids=["llama", "qwen2"])
def test_a_tiny_gqa_decoder_generation_graph_attends_over_the_cache_in_place(make):
    """The captured generation graph (static KV cache) of a float64 decoder with 4 heads over 2 KV heads: the
    prefill and a decode step give the same logits and write the same cache with and without the pass."""
    from zqcompile.capture import _export
    from zqcompile.kv_cache import _CachedLMWrapper, cache_layout, dynamic_shapes, example_inputs
    model = make().double()
    model.config._attn_implementation = "sdpa"
    # capture_static_cache's export, in float64 (zqcompile itself compiles float32 / float16 / bfloat16 models)
    layout, _ = cache_layout(model, torch.float64, torch.device("cpu"))
    inputs, cache = dynamic_shapes(layout, model.config.max_position_embeddings)
    gm = _export(_CachedLMWrapper(model, torch.float64).eval(), example_inputs(layout, "cpu"),
                 (*inputs, tuple(cache)), type(model).__name__)
    graph = torch.fx.Graph()  # a copy to rewrite, as the pipeline's target phases make one
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen
    rewritten = torch.fx.GraphModule(gm, graph)
    ctx = _context()
    result = apply_pass(grouped_query_attention, rewritten, ctx)
    layers = model.config.num_hidden_layers
    assert result.counters == {"grouped_query_attention.fold_query_heads": layers}
    assert _kv_read_in_place(rewritten) and not _kv_read_in_place(gm)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    outputs = []
    for graph in (gm, rewritten):
        cache = layout.allocate(2, 16, "cpu")
        with torch.no_grad():
            prefill = graph(ids[:, :6], mask, torch.arange(6).expand(2, 6), torch.arange(6), *cache)[0]
            decode = graph(ids[:, 6:], mask, torch.full((2, 1), 6), torch.tensor([6]), *cache)[0]
        outputs.append((prefill, decode, cache))
    (prefill, decode, cache), (prefill_r, decode_r, cache_r) = outputs
    torch.testing.assert_close(prefill_r, prefill, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(decode_r, decode, rtol=1e-12, atol=1e-12)
    for a, b in zip(cache_r, cache):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():  # and the decoder itself, on the whole (unpadded) sequence
        hf = model(input_ids=ids[:1], use_cache=False).logits[:, -1]
    torch.testing.assert_close(decode_r[:1, -1], hf, rtol=1e-10, atol=1e-10)


# ---- GPU: the folded attention runs in fused SDPA kernels ------------------------------------------------------

@pytest.mark.gpu
@needs_gpu
def test_folded_and_enable_gqa_attention_run_in_fused_cuda_kernels():
    """fp16 on the GPU, the math backend switched off: the folded SDPA (mask) runs in memory-efficient / flash /
    cuDNN attention and the causal enable_gqa SDPA in flash attention, close to the float64 reference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    fused = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    for module, args, backends in ((Attention(), _inputs(mask="float"), fused),
                                   (Attention(), _inputs(seq=1, mask="float"), fused),
                                   (Attention(causal=True), _inputs(seq=L, mask=None), [SDPBackend.FLASH_ATTENTION])):
        half = [a.half().cuda() if a.is_floating_point() else a.cuda() for a in args]
        gm = _export(module, *half)
        apply_pass(grouped_query_attention, gm, _context())
        with torch.no_grad(), sdpa_kernel(backends):
            got = gm(*half)
        torch.testing.assert_close(got.double().cpu(), _reference(*args, causal=module.causal), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_gpu
def test_cuda_decoder_decode_step_equals_the_unrewritten_graph():
    """The tiny GQA Llama compiled for CUDA (fp16, every linear kept in FP16): the executed generation graph's
    decode step, with the pass and without it (target_passes), gives the same logits up to fp16 rounding."""
    import zqcompile
    model = make_tiny_llama().half().cuda()
    fp = {"base": "w8a8", "keep_fp": ["*"]}
    with_pass = zqcompile.compile(model, fp, max_cache_len=32).generation
    without = zqcompile.compile(model, fp, max_cache_len=32,
                                target_passes=["fuse_sibling_linears", "additive_attention_mask"]).generation
    assert with_pass.context.counters["grouped_query_attention.fold_query_heads"] == model.config.num_hidden_layers
    assert _kv_read_in_place(with_pass.executed_graph) and not _kv_read_in_place(without.executed_graph)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2)).cuda()
    logits = []
    for generation in (with_pass, without):
        steps = generation.steps
        mask, positions = torch.ones_like(ids), torch.arange(9, device="cuda").expand(3, 9)
        steps.prefill(ids[:, :8], mask[:, :8], positions[:, :8], 4)
        logits.append(steps.decode(ids[:, 8], positions[:, 8]).double())
    error = (logits[0] - logits[1]).norm(dim=-1) / logits[1].norm(dim=-1)
    assert error.max() <= 1e-2
