"""Accuracy of W8A8 on the real pretrained models that ship in pip packages, on real text.

Measured here (torch 2.13 CPU), asserted with a small margin and printed (run with -s to see them):
- all-MiniLM-L6-v2 on the first 32 sentences of rt_polarity_4000.json (743 tokens): token-embedding cosine vs
  FP32 min 0.9915 / mean 0.9970; sentence-embedding cosine min 0.9949 / mean 0.9965. The issue's target of
  0.999 is not reached by plain W8A8 PTQ.
- SmolLM2-135M-Instruct on the first 512 tokens of austen_persuasion.txt (one 512-token window): perplexity
  FP32 28.26, W8A8 29.12, ratio 1.030 (the target is within 1%).
"""

from __future__ import annotations

import json

import pytest
import torch

import zqcompile
from zqcompile.evaluate import sentence_embeddings, text_perplexity
from zqcompile.models import load_pretrained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def minilm():
    """(FP32 model, W8A8 model, tokenizer)."""
    model, tokenizer = load_pretrained("all-MiniLM-L6-v2")
    return model, zqcompile.compile(model, "w8a8"), tokenizer


@pytest.fixture(scope="session")
def smollm2():
    model, tokenizer = load_pretrained("SmolLM2-135M-Instruct")
    return model, zqcompile.compile(model, "w8a8"), tokenizer


@pytest.fixture(scope="session")
def sentences(data_dir) -> list[str]:
    return [row["text"] for row in json.loads((data_dir / "rt_polarity_4000.json").read_text())[:32]]


def test_minilm_w8a8_token_and_sentence_embeddings(minilm, sentences):
    model, qmodel, tokenizer = minilm
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        expected, out = model(**batch).last_hidden_state, qmodel(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    token_cosine = torch.nn.functional.cosine_similarity(expected[real].double(), out[real].double(), dim=-1)
    pooled_fp = sentence_embeddings(model, tokenizer, sentences)
    pooled_q = sentence_embeddings(qmodel, tokenizer, sentences)
    sentence_cosine = (pooled_fp.double() * pooled_q.double()).sum(-1)
    print(f"\nall-MiniLM-L6-v2 W8A8 over {int(real.sum())} tokens: token cosine min {token_cosine.min():.4f} "
          f"mean {token_cosine.mean():.4f}; sentence cosine min {sentence_cosine.min():.4f} "
          f"mean {sentence_cosine.mean():.4f}")
    assert token_cosine.min() >= 0.989 and token_cosine.mean() >= 0.995
    assert sentence_cosine.min() >= 0.992 and sentence_cosine.mean() >= 0.995
    assert qmodel.context.counters["lower.int8_linear"] == 36  # 6 layers x 6 linears; the pooler stays FP
    assert qmodel.weight_memory().ratio_vs_fp16 < 0.51


def test_smollm2_w8a8_perplexity_on_austen(smollm2, data_dir):
    model, qmodel, tokenizer = smollm2
    text = (data_dir / "austen_persuasion.txt").read_text()
    fp = text_perplexity(model, tokenizer, text, max_tokens=512, window=512)
    quantized = text_perplexity(qmodel, tokenizer, text, max_tokens=512, window=512)
    ratio = quantized.value / fp.value
    print(f"\nSmolLM2-135M W8A8: FP32 {fp}; W8A8 {quantized}; ratio {ratio:.4f}")
    assert fp.tokens_scored == quantized.tokens_scored == 511
    assert 20 < fp.value < 40  # a trained LM on real prose (a random one scores ~50,000)
    assert ratio <= 1.04
    assert qmodel.context.counters["lower.int8_linear"] == 30 * 7  # every linear but the lm_head
