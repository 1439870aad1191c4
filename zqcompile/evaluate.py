"""Accuracy measures on real text: decoder perplexity and encoder sentence embeddings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from zqcompile.errors import ZQError


@dataclass(frozen=True)
class Perplexity:
    value: float
    tokens_scored: int
    window: int
    stride: int

    def __str__(self) -> str:
        return (f"perplexity {self.value:.3f} over {self.tokens_scored} tokens "
                f"(window {self.window}, stride {self.stride})")


def perplexity_of_ids(model: Callable, ids: torch.Tensor, window: int = 256, stride: int | None = None) -> Perplexity:
    """exp(mean next-token NLL) of a 1-D token sequence, with a sliding window (HF's recipe).

    Each window of ``window`` tokens starts ``stride`` tokens after the previous one; only the tokens not
    already scored by an earlier window count, so every token after the first is scored exactly once
    with up to ``window - 1`` tokens of context.
    """
    stride = stride or window
    if ids.dim() != 1 or ids.numel() < 2:
        raise ZQError("perplexity needs a 1-D sequence of at least 2 token ids")
    if not 0 < stride <= window:
        raise ZQError(f"stride must be in (0, window={window}], got {stride}")
    total_nll, scored, prev_end = 0.0, 0, 0
    for start in range(0, ids.numel() - 1, stride):
        end = min(start + window, ids.numel())
        chunk = ids[start:end].unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=chunk).logits.float()
        new_from = max(prev_end - start, 1)  # position of the first target not scored yet (>= 1)
        targets = chunk[0, new_from:]
        log_probs = torch.log_softmax(logits[0, new_from - 1:-1], dim=-1)
        total_nll -= log_probs.gather(1, targets[:, None]).sum().item()
        scored += targets.numel()
        prev_end = end
        if end == ids.numel():
            break
    return Perplexity(math.exp(total_nll / scored), scored, window, stride)


def text_perplexity(model: Callable, tokenizer, text: str, max_tokens: int = 1024, window: int = 256,
                    stride: int | None = None) -> Perplexity:
    """Perplexity of the first ``max_tokens`` tokens of ``text``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
    return perplexity_of_ids(model, ids, window, stride)


def sentence_embeddings(model: Callable, tokenizer, sentences: Sequence[str], batch_size: int = 32,
                        max_length: int = 128) -> torch.Tensor:
    """Mean-pooled, L2-normalised token embeddings (sentence-transformers' MiniLM pooling), float32."""
    chunks = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"][..., None].float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(chunks)
