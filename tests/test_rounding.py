"""The survey methods' arithmetic (zqcompile/rounding.py) on tiny layers, against independent references:
GPTQ in both column orders against the optimal-brain-quantization update written directly (explicit inverse
Hessian, one column at a time), against round-to-nearest, and the choice between the orders; AWQ's search against
its own grid evaluated by hand; LoRC against the truncated SVD."""

from __future__ import annotations

import pytest
import torch

from zqcompile.quant import dequantize_weight_values, qmax_for_bits, quantize_weight
from zqcompile.rounding import Layout, awq_scales, gptq_best_order, gptq_quantize, low_rank_factors, output_error

LAYOUTS = [Layout(8, None, None), Layout(4, None, None), Layout(4, None, 8), Layout(4, 2, 8), Layout(8, 4, None)]
ASYM_LAYOUTS = [Layout(4, None, None, symmetric=False), Layout(4, None, 8, symmetric=False),
                Layout(4, 2, 16, symmetric=False)]


def correlated_inputs(tokens: int = 256, k: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=generator) + 2 * torch.eye(k)
    return torch.randn(tokens, k, generator=generator) @ mixing  # strongly correlated input channels


def loud_inputs(seed: int = 0) -> torch.Tensor:
    """Correlated inputs with four channels 8x louder than the rest, spread over the input groups (as in LLM
    activations): act-order rounds them first, natural order rounds them wherever they sit."""
    loudness = torch.ones(32)
    loudness[[3, 13, 22, 31]] = 8.0
    return correlated_inputs(seed=seed) * loudness


def layer(n: int = 16, k: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def obq_reference(weight: torch.Tensor, hessian: torch.Tensor, layout: Layout, damping: float = 0.01,
                  act_order: bool = False):
    """GPTQ's rounding written as the optimal-brain-quantization update, in float64: round column i, move the
    not-yet-rounded columns by -err_i / Hinv_ii * Hinv[i, :], then eliminate i from the inverse Hessian (its row
    and column become 0, so rounded columns never move again). Natural order: columns left to right, a group's
    absmax scale taken from its updated weights when its first column comes; act-order: every scale taken from the
    weight first, columns in descending order of the Hessian diagonal."""
    qmax = qmax_for_bits(layout.bits)
    n, k = weight.shape
    rows = layout.group_size or 1
    width = layout.input_group_size or k
    w = weight.double().clone()
    h = hessian.double() + damping * torch.diagonal(hessian.double()).mean() * torch.eye(k, dtype=torch.float64)
    h_inv = torch.linalg.inv(h)
    q = torch.zeros(n, k, dtype=torch.int8)
    scale = torch.zeros(n // rows, k // width)

    def take_scale(g: int) -> None:
        group = w[:, g * width:(g + 1) * width].reshape(n // rows, rows * width)
        absmax = group.abs().amax(1)
        scale[:, g] = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax)).float()

    if act_order:
        for g in range(k // width):
            take_scale(g)
    order = sorted(range(k), key=lambda i: -h[i, i].item()) if act_order else range(k)
    for i in order:
        if not act_order and i % width == 0:
            take_scale(i // width)
        s = scale[:, i // width].double().repeat_interleave(rows)
        column = torch.clamp(torch.round(w[:, i] / s), -qmax, qmax)
        q[:, i] = column.to(torch.int8)
        w -= ((w[:, i] - column * s) / h_inv[i, i])[:, None] * h_inv[i][None, :]
        h_inv -= h_inv[:, i:i + 1] @ h_inv[i:i + 1, :] / h_inv[i, i]
    return q, scale


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_gptq_equals_the_obq_update_written_directly(layout, act_order):
    x = loud_inputs() if act_order else correlated_inputs()  # loud channels: a sweep order far from natural
    hessian = x.T.double() @ x.double()
    q, scale, _ = gptq_quantize(layer(), hessian, layout, block=8, act_order=act_order)  # lazy batches of 8
    q_ref, scale_ref = obq_reference(layer(), hessian, layout, act_order=act_order)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert (q.int() - q_ref.int()).abs().max() <= 1  # float64 summation order may flip an exact .5
    assert (q != q_ref).float().mean() < 0.01


@pytest.mark.parametrize("layout", LAYOUTS + ASYM_LAYOUTS, ids=str)
def test_gptq_error_is_strictly_below_round_to_nearest_on_correlated_inputs(layout):
    weight, x = layer(), correlated_inputs()
    hessian = x.T.double() @ x.double()
    nearest = dequantize_weight_values(*quantize_weight(weight, layout.bits, layout.group_size,
                                                        layout.input_group_size, layout.symmetric))
    gptq = dequantize_weight_values(*gptq_quantize(weight, hessian, layout))
    rtn_error = (x.double() @ (weight - nearest).double().T).pow(2).sum()
    gptq_error = (x.double() @ (weight - gptq).double().T).pow(2).sum()
    assert gptq_error < 0.9 * rtn_error
    signal = (x.double() @ weight.double().T).pow(2).sum()
    assert output_error(weight, gptq, hessian) == pytest.approx((gptq_error / signal).item(), rel=1e-6)


@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
@pytest.mark.parametrize("layout", LAYOUTS + ASYM_LAYOUTS, ids=str)
def test_gptq_with_a_diagonal_hessian_is_round_to_nearest(layout, act_order):
    weight = layer()
    hessian = torch.diag(torch.rand(32, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1)
    q, scale, w_min = gptq_quantize(weight, hessian, layout, act_order=act_order)
    q_rtn, scale_rtn, w_min_rtn = quantize_weight(weight, layout.bits, layout.group_size, layout.input_group_size,
                                                  layout.symmetric)
    assert torch.equal(q, q_rtn) and torch.equal(scale, scale_rtn)
    assert (w_min is None) == layout.symmetric
    if not layout.symmetric:  # on the asymmetric grid: integers in [0, 15], the round-to-nearest mins
        assert q.min() >= 0 and q.max() <= 15 and torch.equal(w_min, w_min_rtn)


@pytest.mark.parametrize("layout", LAYOUTS + ASYM_LAYOUTS, ids=str)
def test_act_order_beats_natural_order_and_round_to_nearest_on_loud_channels(layout):
    weight, x = layer(), loud_inputs()
    hessian = x.T.double() @ x.double()
    q_rtn, scale_rtn, w_min_rtn = layout.quantize(weight)
    q, scale, w_min = gptq_quantize(weight, hessian, layout, act_order=True)
    assert torch.equal(scale, scale_rtn) and (w_min is None or torch.equal(w_min, w_min_rtn))  # static groups

    def error(rounded: torch.Tensor) -> float:  # squared output error on the inputs themselves
        return (x.double() @ (weight.double() - rounded.double()).T).pow(2).sum().item()

    natural = error(dequantize_weight_values(*gptq_quantize(weight, hessian, layout)))
    act_order = error(dequantize_weight_values(q, scale, w_min))
    assert act_order <= natural and act_order < 0.9 * error(dequantize_weight_values(q_rtn, scale_rtn, w_min_rtn))


@pytest.mark.parametrize(("x", "expected"), [
    (loud_inputs(), "act-order"),  # loud channels anywhere: act-order rounds them while feedback can still help
    (correlated_inputs() * torch.linspace(8.0, 1.0, 32), "natural"),  # already loudest first: natural order's
], ids=["loud-channels", "loudest-first"])                               # grids follow the feedback
def test_gptq_best_order_keeps_the_order_with_the_lower_output_error(x, expected):
    weight, layout = layer(), Layout(4, None, 8)
    hessian = x.T.double() @ x.double()
    errors = {}
    for order in ("natural", "act-order"):  # each order's error computed here, on the inputs themselves
        rounded = dequantize_weight_values(*gptq_quantize(weight, hessian, layout, act_order=order == "act-order"))
        errors[order] = ((x.double() @ (weight - rounded).double().T).pow(2).sum()
                         / (x.double() @ weight.double().T).pow(2).sum()).item()
    best, (q, scale, w_min), reported = gptq_best_order(weight, hessian, layout)
    assert best == min(errors, key=errors.get) == expected
    assert reported == pytest.approx(errors, rel=1e-6)
    assert torch.equal(q, gptq_quantize(weight, hessian, layout, act_order=best == "act-order")[0])


def test_gptq_ignores_inputs_it_never_saw():
    weight, x = layer(), correlated_inputs()
    x[:, 5] = 0  # a dead input channel: its column is zeroed, the rest still rounds
    q, _, _ = gptq_quantize(weight, x.T.double() @ x.double(), Layout(8, None, None))
    assert torch.all(q[:, 5] == 0) and q.abs().sum() > 0


def test_awq_picks_the_grid_point_with_the_least_output_error():
    x = torch.randn(128, 32) * torch.linspace(0.1, 8.0, 32)  # a few large channels, as in LLM activations
    weights, layouts = [layer(16, 32, 3), layer(8, 32, 4)], [Layout(4, None, 8), Layout(4, None, 8)]
    factors, plain, best = awq_scales(x, x.abs().mean(0), weights, layouts, grid=10)

    def error(f: torch.Tensor) -> float:  # the objective evaluated independently
        total = sum(((x.double() / f.double()) @ dequantize_weight_values(*quantize_weight(
            w * f, 4, None, 8)).double().T - x.double() @ w.double().T).pow(2).sum() for w in weights)
        return (total / sum((x.double() @ w.double().T).pow(2).sum() for w in weights)).item()

    mean_abs = x.abs().mean(0).double()
    candidates = [mean_abs ** (i / 10) / ((mean_abs ** (i / 10)).max() * (mean_abs ** (i / 10)).min()).sqrt()
                  for i in range(10)]
    errors = [error(c.float()) for c in candidates]
    assert plain == pytest.approx(errors[0], rel=1e-6) and best == pytest.approx(min(errors), rel=1e-6)
    assert best < plain  # activation-aware scaling helps on these channels
    torch.testing.assert_close(factors.double(), candidates[errors.index(min(errors))], rtol=1e-5, atol=0)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_low_rank_factors_are_the_truncated_svd_of_the_error(rank):
    weight = layer(24, 32)
    error = weight - dequantize_weight_values(*quantize_weight(weight, 4))
    a, b = low_rank_factors(error, rank)
    assert a.shape == (24, rank) and b.shape == (rank, 32)
    u, s, vh = torch.linalg.svd(error.double())
    truncated = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    torch.testing.assert_close((a.double() @ b.double()), truncated, rtol=0, atol=1e-5)
    # Eckart-Young: what is left is exactly the discarded singular values
    residual = torch.linalg.matrix_norm(error.double() - a.double() @ b.double())
    assert residual.item() == pytest.approx(s[rank:].pow(2).sum().sqrt().item(), rel=1e-5)
