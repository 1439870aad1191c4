"""zqcompile.evaluate against hand-computed values: perplexity windows, Spearman, probe, similarity score."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from zqcompile import ZQError
from zqcompile.evaluate import (
    bootstrap_change, bootstrap_perplexity, load_lee50, logistic_probe_accuracy, mean_cosine, perplexity_of_ids,
    similarity_spearman, spearman,
)

VOCAB = 7


class PositionAwareBigram(torch.nn.Module):
    """Logits = table[previous token] + bias[position inside the window]: the score depends on the windowing."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.table = torch.randn(VOCAB, VOCAB, generator=generator, dtype=torch.float64)
        self.position_bias = torch.randn(16, VOCAB, generator=generator, dtype=torch.float64)

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        seq = input_ids.shape[1]
        return SimpleNamespace(logits=self.table[input_ids] + self.position_bias[:seq])


def hand_window_nlls(model: PositionAwareBigram, ids: list[int], window: int, stride: int) -> list[tuple[float, int]]:
    """(NLL sum, tokens) per window; token j is scored by the first window [s, s + window) that contains it
    after a token already scored."""
    windows, prev_end, start = [], 0, 0
    while True:
        end = min(start + window, len(ids))
        nll, scored = 0.0, 0
        for j in range(max(prev_end, start + 1), end):
            logits = model.table[ids[j - 1]] + model.position_bias[j - 1 - start]
            nll -= logits[ids[j]].item() - math.log(sum(math.exp(v) for v in logits.tolist()))
            scored += 1
        if scored:  # a last window of one token is context only
            windows.append((nll, scored))
        prev_end = end
        if end == len(ids):
            return windows
        start += stride


def hand_perplexity(model: PositionAwareBigram, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    windows = hand_window_nlls(model, ids, window, stride)
    scored = sum(count for _, count in windows)
    return math.exp(sum(nll for nll, _ in windows) / scored), scored


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 3), (5, 5), (16, 16)])
def test_perplexity_matches_hand_computed_value(window, stride):
    model = PositionAwareBigram()
    ids = torch.randint(0, VOCAB, (21,), generator=torch.Generator().manual_seed(1))
    result = perplexity_of_ids(model, ids, window=window, stride=stride)
    expected, scored = hand_perplexity(model, ids.tolist(), window, stride)
    assert result.tokens_scored == scored
    if stride < window:  # overlapping windows score every token after the first exactly once
        assert scored == ids.numel() - 1
    assert result.value == pytest.approx(expected, rel=1e-5)
    assert (result.window, result.stride) == (window, stride)


def exact_bootstrap_quantiles(per_text: list[list[float]], tail: float) -> tuple[float, float]:
    """Quantiles of the exact bootstrap distribution, every one of the n^n resamples of each text enumerated.

    ``per_text[t]`` lists the windows' values of text t, here (model NLL - reference NLL, tokens) pairs.
    """
    distributions = []
    for windows in per_text:
        outcomes = [math.exp(sum(windows[i][0] for i in draw) / sum(windows[i][1] for i in draw)) - 1
                    for draw in itertools.product(range(len(windows)), repeat=len(windows))]
        distributions.append(outcomes)
    means = sorted(sum(combo) / len(combo) for combo in itertools.product(*distributions))
    return means[int(tail * len(means))], means[int((1 - tail) * len(means)) - 1]


def test_bootstrap_interval_matches_exhaustive_enumeration():
    """Two texts of 3 windows each: the Monte Carlo interval against all 27 x 27 resamples, by hand."""
    reference = PositionAwareBigram()
    model = PositionAwareBigram()
    with torch.no_grad():  # a "quantized" model: the reference plus noise
        model.table += 0.3 * torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    pairs, per_text, changes = [], [], []
    for seed, length in ((6, 24), (7, 22)):
        ids = torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))
        result, ref = perplexity_of_ids(model, ids, window=8), perplexity_of_ids(reference, ids, window=8)
        pairs.append((result, ref))
        mine, theirs = hand_window_nlls(model, ids.tolist(), 8, 8), hand_window_nlls(reference, ids.tolist(), 8, 8)
        assert len(mine) == 3
        assert result.window_nll == pytest.approx([nll for nll, _ in mine], rel=1e-6)  # logits scored in float32
        per_text.append([(a - b, count) for (a, count), (b, _) in zip(mine, theirs)])
        changes.append(math.exp(sum(diff for diff, _ in per_text[-1]) / sum(c for _, c in mine)) - 1)
    interval = bootstrap_change(pairs, samples=20000, level=0.9)
    assert interval.value == pytest.approx(sum(changes) / 2, rel=1e-4)
    low, high = exact_bootstrap_quantiles(per_text, 0.05)
    spread = high - low
    assert interval.low == pytest.approx(low, abs=0.05 * spread)
    assert interval.high == pytest.approx(high, abs=0.05 * spread)
    assert interval.low < interval.value < interval.high


def test_bootstrap_of_a_model_against_itself_is_zero_and_perplexity_interval_brackets_it():
    model = PositionAwareBigram()
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(8))
    result = perplexity_of_ids(model, ids, window=8)
    same = bootstrap_change([(result, result)])
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    interval = bootstrap_perplexity(result)
    per_window = [math.exp(nll / count) for nll, count in zip(result.window_nll, result.window_tokens)]
    assert min(per_window) <= interval.low < result.value < interval.high <= max(per_window)
    other = perplexity_of_ids(model, ids[:20], window=8)
    with pytest.raises(ZQError, match="same windows"):
        bootstrap_change([(result, other)])


def test_perplexity_of_uniform_model_is_vocab_size():
    uniform = lambda input_ids: SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))  # noqa: E731
    assert perplexity_of_ids(uniform, torch.arange(10) % VOCAB, window=4).value == pytest.approx(VOCAB)


def test_perplexity_rejects_bad_arguments():
    model = PositionAwareBigram()
    with pytest.raises(ZQError, match="at least 2"):
        perplexity_of_ids(model, torch.tensor([1]))
    with pytest.raises(ZQError, match="stride"):
        perplexity_of_ids(model, torch.arange(6), window=4, stride=5)


def test_spearman_with_ties_matches_hand_computation():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y = torch.tensor([5.0, 6.0, 7.0, 8.0, 7.0])  # ranks 1, 2, 3.5, 5, 3.5
    rx, ry = [1, 2, 3, 4, 5], [1, 2, 3.5, 5, 3.5]
    mx, my = sum(rx) / 5, sum(ry) / 5
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    expected = cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)  # monotone, not linear


def test_spearman_matches_scipy_on_random_data_with_ties():
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(2)
    x = torch.randint(0, 10, (200,), generator=generator).double()
    y = x + torch.randint(0, 6, (200,), generator=generator).double()
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-10)


def test_similarity_spearman_uses_upper_triangle_only():
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    normed = torch.nn.functional.normalize(embeddings, dim=-1)
    human = torch.tril(torch.randn(6, 6, generator=generator, dtype=torch.float64))  # lower part: noise
    i, j = torch.triu_indices(6, 6, offset=1)
    human[i, j] = (normed @ normed.T)[i, j] * 2 + 1  # a monotone function of the cosines
    assert similarity_spearman(embeddings, human) == pytest.approx(1.0)


def test_mean_cosine():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    assert mean_cosine(a, b) == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    with pytest.raises(ZQError, match="shape"):
        mean_cosine(a, b[:1])


def test_logistic_probe_fits_a_separable_problem_and_converges():
    generator = torch.Generator().manual_seed(4)
    direction = torch.randn(8, generator=generator)
    x = torch.randn(400, 8, generator=generator)
    margin = x @ direction
    keep = margin.abs() > 0.5  # a clear margin: a fitted linear probe must get all of them
    x, y = x[keep], (margin[keep] > 0).long()
    accuracy = logistic_probe_accuracy(x[:200], y[:200], x[200:], y[200:])
    assert accuracy == 1.0
    shuffled = y[torch.randperm(y.numel(), generator=generator)]  # labels unrelated to the features
    assert logistic_probe_accuracy(x[:200], shuffled[:200], x[200:], shuffled[200:]) < 0.7


def test_lee50_loader_reads_the_shared_data(data_dir):
    documents, human = load_lee50(str(data_dir / "lee50.txt"), str(data_dir / "lee50_similarities.tsv"))
    assert len(documents) == 50 and human.shape == (50, 50)
    assert torch.all(human.diagonal() == 1.0)
