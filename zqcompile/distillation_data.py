"""Distillation data that needs no training set: text the model samples itself, random tokens, or the user's text.

``LKDConfig.data`` selects the source (see zqcompile.lkd for how LKD uses it):

- ``"auto"`` (default): ``"self"`` for models that can generate (decoders), ``"random"`` otherwise;
- ``"self"``: text sampled from the floating-point model itself (LLM-QAT): a random first token, then
  ``seq_len - 1`` tokens sampled from the model's own next-token distribution;
- ``"random"``: uniformly random token ids (ZeroQuant's encoder setting, which works for BERT-style models);
- user data: a ``[num_samples, seq_len]`` LongTensor of token ids (for plain ``nn.Module`` s: a float
  tensor of model inputs), or text (a string, a list of strings, or the path of a ``.txt`` file) together
  with ``tokenizer=`` (a tokenizer object or the path/shipped name of a Hugging Face model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zqcompile.capture import is_hf_model, max_positions
from zqcompile.errors import ZQError
from zqcompile.recipe import DATA_SOURCES, LKDConfig


def _can_generate(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


def _vocab_size(model: nn.Module) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise ZQError(f"{type(model).__name__} has no config.vocab_size, so LKD cannot make token ids: pass "
                      f"LKDConfig(data=<tensor of model inputs>)")
    return vocab


def _load_tokenizer(tokenizer: Any):
    if tokenizer is None:
        raise ZQError("LKD got text data but no tokenizer: pass LKDConfig(tokenizer=...) (a tokenizer, a model "
                      "directory or a shipped model name), or token ids as a tensor")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        from zqcompile.pretrained import SHIPPED_MODELS, shipped_model_dir
        path = shipped_model_dir(str(tokenizer)) if str(tokenizer) in SHIPPED_MODELS else tokenizer
        return AutoTokenizer.from_pretrained(path)
    return tokenizer


def _text_ids(config: LKDConfig) -> torch.Tensor:
    data = config.data
    if isinstance(data, (str, os.PathLike)) and str(data).endswith(".txt"):
        if not Path(data).is_file():
            raise ZQError(f"LKD data file {str(data)!r} does not exist")
        data = Path(data).read_text()
    texts = [data] if isinstance(data, str) else list(data)
    if not all(isinstance(t, str) for t in texts):
        raise ZQError("LKD text data must be a string, a list of strings or the path of a .txt file")
    tokenizer = _load_tokenizer(config.tokenizer)
    ids = torch.cat([torch.as_tensor(tokenizer(t).input_ids, dtype=torch.long) for t in texts])
    rows = min(config.num_samples, ids.numel() // config.seq_len)
    if rows == 0:
        raise ZQError(f"LKD text data has {ids.numel()} tokens, fewer than seq_len={config.seq_len}: give more "
                      f"text or a smaller seq_len")
    return ids[:rows * config.seq_len].view(rows, config.seq_len)


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _self_generated_ids(model: nn.Module, config: LKDConfig, device: torch.device) -> torch.Tensor:
    """LLM-QAT-style data: a random first token, then tokens sampled from the model's own distribution."""
    vocab = _vocab_size(model)
    first = torch.randint(0, vocab, (config.num_samples, 1), device=device)
    with torch.no_grad():
        return model.generate(input_ids=first, attention_mask=torch.ones_like(first), do_sample=True, top_k=0,
                              top_p=1.0, temperature=1.0, max_new_tokens=config.seq_len - 1,
                              min_new_tokens=config.seq_len - 1, pad_token_id=0, use_cache=True)


def distillation_data(model: nn.Module, config: LKDConfig) -> tuple[torch.Tensor, str]:
    """(the distillation set [N, ...], a description of where it came from)."""
    device = next(model.parameters()).device
    data = config.data
    if isinstance(data, torch.Tensor):
        if data.dim() < 2 or data.shape[0] == 0:
            raise ZQError(f"LKD data tensor must have shape [num_samples, ...], got {tuple(data.shape)}")
        return data.to(device), f"user tensor {tuple(data.shape)}"
    if not is_hf_model(model):
        raise ZQError(f"LKD on a plain {type(model).__name__} needs its inputs: pass LKDConfig(data=<tensor "
                      f"[num_samples, ...] of model inputs>)")
    limit = max_positions(model.config)
    if limit is not None and config.seq_len > limit:  # the default length does not fit every model
        config = dataclasses.replace(config, seq_len=limit)
    if isinstance(data, str) and data in DATA_SOURCES:
        source = ("self" if _can_generate(model) else "random") if data == "auto" else data
        with _seeded(config.seed):
            if source == "random":
                ids = torch.randint(0, _vocab_size(model), (config.num_samples, config.seq_len), device=device)
                return ids, "random-token"
            if not _can_generate(model):
                raise ZQError(f"LKD data 'self' samples text from the model, but {type(model).__name__} cannot "
                              f"generate; use data='random' or your own text")
            return _self_generated_ids(model, config, device), "self-generated"
    return _text_ids(config).to(device), "user text"
