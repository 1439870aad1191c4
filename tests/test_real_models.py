"""Accuracy of W8A8 (plain ZeroQuant, and with activation smoothing) on the real pretrained models that ship
in pip packages, on real text.

Measured here (torch 2.13 CPU), asserted with a small margin and printed (run with -s to see them):
- all-MiniLM-L6-v2 on the first 32 sentences of rt_polarity_4000.json (743 tokens): token-embedding cosine vs
  FP32 min / mean, sentence-embedding cosine min / mean: w8a8 0.9915 / 0.9970, 0.9949 / 0.9965;
  w8a8-smooth 0.9970 / 0.9987, 0.9983 / 0.9989. The issue's target of 0.999 is not quite reached.
- SmolLM2-135M-Instruct on the first 512 tokens of austen_persuasion.txt (one 512-token window): perplexity
  FP32 28.26, w8a8 29.12 (ratio 1.030), w8a8-smooth 28.46 (ratio 1.007; the target is within 1%).
"""

from __future__ import annotations

import json

import pytest
import torch

from zqcompile.evaluate import sentence_embeddings, text_perplexity

pytestmark = pytest.mark.slow


RECIPES = ("w8a8", "w8a8-smooth")
# the bounds each recipe is held to: (token cosine min, mean, sentence cosine min, mean) and perplexity ratio
MINILM_BOUNDS = {"w8a8": (0.989, 0.995, 0.992, 0.995), "w8a8-smooth": (0.996, 0.998, 0.997, 0.9985)}
SMOLLM2_MAX_RATIO = {"w8a8": 1.04, "w8a8-smooth": 1.012}


@pytest.fixture(scope="session", params=RECIPES)
def minilm(request, compiled_pretrained):
    return (*compiled_pretrained("all-MiniLM-L6-v2", request.param), request.param)


@pytest.fixture(scope="session", params=RECIPES)
def smollm2(request, compiled_pretrained):  # perplexity: forward only (conftest: W8A8 is shared with generation)
    return (*compiled_pretrained("SmolLM2-135M-Instruct", request.param), request.param)


@pytest.fixture(scope="session")
def sentences(data_dir) -> list[str]:
    return [row["text"] for row in json.loads((data_dir / "rt_polarity_4000.json").read_text())[:32]]


def test_minilm_token_and_sentence_embeddings(minilm, sentences):
    model, qmodel, tokenizer, recipe = minilm
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        expected, out = model(**batch).last_hidden_state, qmodel(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    token_cosine = torch.nn.functional.cosine_similarity(expected[real].double(), out[real].double(), dim=-1)
    pooled_fp = sentence_embeddings(model, tokenizer, sentences)
    pooled_q = sentence_embeddings(qmodel, tokenizer, sentences)
    sentence_cosine = (pooled_fp.double() * pooled_q.double()).sum(-1)
    print(f"\nall-MiniLM-L6-v2 {recipe} over {int(real.sum())} tokens: token cosine min {token_cosine.min():.4f} "
          f"mean {token_cosine.mean():.4f}; sentence cosine min {sentence_cosine.min():.4f} "
          f"mean {sentence_cosine.mean():.4f}")
    token_min, token_mean, sentence_min, sentence_mean = MINILM_BOUNDS[recipe]
    assert token_cosine.min() >= token_min and token_cosine.mean() >= token_mean
    assert sentence_cosine.min() >= sentence_min and sentence_cosine.mean() >= sentence_mean
    assert qmodel.context.counters["lower.int8_linear"] == 36  # 6 layers x 6 linears; the pooler stays FP
    assert qmodel.weight_memory().ratio_vs_fp16 < 0.51


def test_smollm2_perplexity_on_austen(smollm2, data_dir):
    model, qmodel, tokenizer, recipe = smollm2
    text = (data_dir / "austen_persuasion.txt").read_text()
    fp = text_perplexity(model, tokenizer, text, max_tokens=512, window=512)
    quantized = text_perplexity(qmodel, tokenizer, text, max_tokens=512, window=512)
    ratio = quantized.value / fp.value
    print(f"\nSmolLM2-135M {recipe}: FP32 {fp}; quantized {quantized}; ratio {ratio:.4f}")
    assert fp.tokens_scored == quantized.tokens_scored == 511
    assert 20 < fp.value < 40  # a trained LM on real prose (a random one scores ~50,000)
    assert ratio <= SMOLLM2_MAX_RATIO[recipe]
    assert qmodel.context.counters["lower.int8_linear"] == 30 * 7  # every linear but the lm_head
