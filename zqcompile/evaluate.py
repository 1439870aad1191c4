"""Accuracy measures on real text: decoder perplexity, encoder sentence embeddings and downstream scores."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from zqcompile.errors import ZQError


# Perplexity at >= 16k tokens per text: below that, the difference between two W8A8 recipes is within the noise
# of the text (six 1,024-token segments of one text gave one recipe anywhere from -0.5% to +3.4% vs FP32).
EVAL_TOKENS = 16384
EVAL_WINDOW = 512
EVAL_MIN_SCORED = 16000  # fewer scored tokens than this: the evaluation is flagged as noisy


@dataclass(frozen=True)
class Perplexity:
    """exp(mean NLL), with the NLL sum and the scored-token count of every window (for bootstrap intervals)."""

    value: float
    tokens_scored: int
    window: int
    stride: int
    window_nll: tuple[float, ...] = ()
    window_tokens: tuple[int, ...] = ()

    def __str__(self) -> str:
        return (f"perplexity {self.value:.3f} over {self.tokens_scored} tokens "
                f"(window {self.window}, stride {self.stride})")


def perplexity_of_ids(model: Callable, ids: torch.Tensor, window: int = EVAL_WINDOW,
                      stride: int | None = None) -> Perplexity:
    """exp(mean next-token NLL) of a 1-D token sequence, with a sliding window (HF's recipe).

    Each window of ``window`` tokens starts ``stride`` tokens after the previous one; only the tokens not
    already scored by an earlier window count, so with ``stride < window`` every token after the first is
    scored exactly once, with up to ``window - 1`` tokens of context. With ``stride == window``
    (non-overlapping windows) the first token of each window is context only and is not scored.
    """
    stride = stride or window
    if ids.dim() != 1 or ids.numel() < 2:
        raise ZQError("perplexity needs a 1-D sequence of at least 2 token ids")
    if not 0 < stride <= window:
        raise ZQError(f"stride must be in (0, window={window}], got {stride}")
    nlls, counts, prev_end = [], [], 0
    for start in range(0, ids.numel() - 1, stride):
        end = min(start + window, ids.numel())
        chunk = ids[start:end].unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=chunk).logits.float()
        new_from = max(prev_end - start, 1)  # position of the first target not scored yet (>= 1)
        targets = chunk[0, new_from:]
        log_probs = torch.log_softmax(logits[0, new_from - 1:-1], dim=-1)
        nlls.append(-log_probs.gather(1, targets[:, None]).double().sum().item())
        counts.append(targets.numel())
        prev_end = end
        if end == ids.numel():
            break
    return Perplexity(math.exp(sum(nlls) / sum(counts)), sum(counts), window, stride, tuple(nlls), tuple(counts))


def text_perplexity(model: Callable, tokenizer, text: str, max_tokens: int = EVAL_TOKENS, window: int = EVAL_WINDOW,
                    stride: int | None = None) -> Perplexity:
    """Perplexity of the first ``max_tokens`` tokens of ``text``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:max_tokens]
    return perplexity_of_ids(model, ids, window, stride)


# ---- confidence intervals -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided percentile-bootstrap interval at ``level``."""

    value: float
    low: float
    high: float
    level: float

    def percent(self) -> str:
        return f"{100 * self.value:+.2f}% [{100 * self.low:+.2f}, {100 * self.high:+.2f}]"


def _windows(result: Perplexity) -> tuple[torch.Tensor, torch.Tensor]:
    if not result.window_nll:
        raise ZQError("this Perplexity has no per-window scores (it was not computed by perplexity_of_ids)")
    return torch.tensor(result.window_nll, dtype=torch.float64), torch.tensor(result.window_tokens, dtype=torch.float64)


def bootstrap_change(pairs: Sequence[tuple[Perplexity, Perplexity]], samples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> Interval:
    """Mean over texts of ``perplexity / reference perplexity - 1``, with a paired, stratified bootstrap.

    ``pairs`` holds one (model, reference) pair per text, scored on the same windows. Each bootstrap sample
    draws, within every text independently, as many windows as it has, with replacement; both models are
    scored on the same drawn windows (paired, so the interval is that of the *difference*, much narrower
    than either perplexity's own); the relative changes of the texts are averaged.
    """
    if not pairs:
        raise ZQError("bootstrap_change needs at least one (perplexity, reference) pair")
    generator = torch.Generator().manual_seed(seed)
    point, draws = 0.0, torch.zeros(samples, dtype=torch.float64)
    for result, reference in pairs:
        nll, tokens = _windows(result)
        ref_nll, ref_tokens = _windows(reference)
        if not torch.equal(tokens, ref_tokens):
            raise ZQError("a perplexity and its reference were not scored on the same windows")
        index = torch.randint(0, nll.numel(), (samples, nll.numel()), generator=generator)
        point += math.exp((nll.sum() - ref_nll.sum()).item() / tokens.sum().item()) - 1
        draws += torch.exp((nll[index] - ref_nll[index]).sum(1) / tokens[index].sum(1)) - 1
    return _percentile_interval(point / len(pairs), draws / len(pairs), level)


def bootstrap_perplexity(result: Perplexity, samples: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """The perplexity of one text with a bootstrap interval over its windows."""
    nll, tokens = _windows(result)
    index = torch.randint(0, nll.numel(), (samples, nll.numel()), generator=torch.Generator().manual_seed(seed))
    return _percentile_interval(result.value, torch.exp(nll[index].sum(1) / tokens[index].sum(1)), level)


def _percentile_interval(value: float, draws: torch.Tensor, level: float) -> Interval:
    if not 0 < level < 1:
        raise ZQError(f"level must be in (0, 1), got {level}")
    ordered = draws.sort().values
    tail = (1 - level) / 2
    # the lower/upper empirical quantiles: the ceil(n * q)-th smallest draw (1-based)
    low = ordered[max(math.ceil(ordered.numel() * tail) - 1, 0)].item()
    high = ordered[min(math.ceil(ordered.numel() * (1 - tail)) - 1, ordered.numel() - 1)].item()
    return Interval(value, low, high, level)


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


# ---- encoder downstream scores ------------------------------------------------------------------------------

def mean_cosine(embeddings: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows (e.g. quantized vs FP32 sentence embeddings)."""
    if embeddings.shape != reference.shape:
        raise ZQError(f"embeddings {tuple(embeddings.shape)} and reference {tuple(reference.shape)} differ in shape")
    return torch.nn.functional.cosine_similarity(embeddings.double(), reference.double(), dim=-1).mean().item()


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1, tied values sharing the mean of their ranks (as Spearman's rho needs)."""
    order = values.argsort()
    ranks = torch.empty(values.numel(), dtype=torch.float64)
    ranks[order] = torch.arange(values.numel(), dtype=torch.float64)
    _, group, counts = torch.unique(values, return_inverse=True, return_counts=True)
    rank_sums = torch.zeros(counts.numel(), dtype=torch.float64).scatter_add_(0, group, ranks)
    return (rank_sums / counts)[group]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1-D samples (Pearson correlation of their average ranks)."""
    x, y = torch.as_tensor(x).flatten(), torch.as_tensor(y).flatten()
    if x.numel() != y.numel() or x.numel() < 2:
        raise ZQError(f"spearman needs two samples of the same size >= 2, got {x.numel()} and {y.numel()}")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx @ ry / (rx.norm() * ry.norm())).item()


def similarity_spearman(embeddings: torch.Tensor, human: torch.Tensor) -> float:
    """Spearman correlation between embedding cosines and human similarity scores over the pairs i < j."""
    n = embeddings.shape[0]
    if human.shape != (n, n):
        raise ZQError(f"human similarity matrix has shape {tuple(human.shape)}, expected ({n}, {n})")
    normed = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    upper = torch.triu_indices(n, n, offset=1)
    return spearman((normed @ normed.T)[upper[0], upper[1]], human.double()[upper[0], upper[1]])


def load_lee50(documents_path: str, similarities_path: str) -> tuple[list[str], torch.Tensor]:
    """The Lee et al. 50 documents (one per line) and their 50x50 human similarity matrix (tab-separated)."""
    with open(documents_path) as f:
        documents = [line.strip() for line in f if line.strip()]
    with open(similarities_path) as f:
        human = torch.tensor([[float(v) for v in line.split()] for line in f if line.strip()], dtype=torch.float64)
    if human.shape != (len(documents), len(documents)):
        raise ZQError(f"{similarities_path} holds a {tuple(human.shape)} matrix for {len(documents)} documents")
    return documents, human


def logistic_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                            test_y: torch.Tensor, l2: float = 1e-3, max_iter: int = 200) -> float:
    """Test accuracy of an L2-regularised (multinomial) logistic regression fitted on frozen features.

    Full-batch L-BFGS on ``mean cross-entropy + l2 * |W|^2`` (bias unregularised): deterministic and
    converged, so FP32 and quantized embeddings are compared with the same, fully trained probe.
    """
    train_x, test_x = train_x.double(), test_x.double()
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(train_x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    with torch.no_grad():
        return ((test_x @ weight + bias).argmax(-1) == test_y).double().mean().item()
