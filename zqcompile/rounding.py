"""Plain arithmetic of the survey's weight methods: GPTQ rounding, AWQ's scale search, LoRC's low-rank factors.

The graph passes (passes/gptq_round_weights.py, awq_scale_weights.py, low_rank_correction.py) feed these
functions the weights and the calibration statistics of one layer at a time. Every result lies on the grid
of :func:`zqcompile.quant.quantize_weight` (same ``[G_out, G_in]`` scale (and asymmetric min) layout, same
integer range), so ``quantize_weights`` stores it unchanged and the kernels, ONNX export and save/load see
nothing new.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zqcompile.quant import dequantize_weight_values, grid_params, quantize_weight, round_to_grid, weight_groups

GPTQ_DAMPING = 0.01  # fraction of the mean Hessian diagonal added to it (the GPTQ paper's default)
GPTQ_BLOCK = 128  # columns per lazy batch update (the GPTQ paper's B)
GPTQ_ORDERS = ("natural", "act-order")  # column orders gptq_best_order tries (natural wins a tie)


@dataclass(frozen=True)
class Layout:
    """The grid a weight is rounded to: bits, the two group sizes and the symmetry of quant.quantize_weight."""

    bits: int
    group_size: int | None
    input_group_size: int | None
    symmetric: bool = True

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Round-to-nearest on this grid (quant.quantize_weight)."""
        return quantize_weight(weight, self.bits, self.group_size, self.input_group_size, self.symmetric)


@dataclass(frozen=True)
class RoundedWeight:
    """Integers and scales a method chose for a weight, in quant.quantize_weight's layout."""

    q: torch.Tensor  # int8 [N, K], values in [-qmax, qmax] (asymmetric: [0, 15])
    scale: torch.Tensor  # float32 [G_out, G_in]
    w_min: torch.Tensor | None  # float32 [G_out, G_in] for an asymmetric layout, else None
    layout: Layout
    source: torch.Tensor  # the floating-point weight that was rounded (LoRC corrects the error against it)


def output_error(weight: torch.Tensor, rounded: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output error ``tr(E H E^T) / tr(W H W^T)`` with ``E = W - rounded`` and ``H = X^T X``: the squared
    error of the layer's outputs on the calibration inputs, over their squared norm (0 for no data)."""
    w = weight.double()
    e = w - rounded.double()
    h = hessian.double()
    signal = torch.einsum("nk,kj,nj->", w, h, w).item()
    return torch.einsum("nk,kj,nj->", e, h, e).item() / signal if signal > 0 else 0.0


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, layout: Layout,
                  damping: float = GPTQ_DAMPING, block: int = GPTQ_BLOCK, act_order: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ / OPTQ (Frantar et al., 2023): round ``weight`` [N, K] column by column, feeding each column's
    rounding error forward to the columns not yet rounded through the inverse of ``hessian`` = X^T X [K, K].

    Returns (int8 values, float32 scales [G_out, G_in], float32 mins or None) in quant.quantize_weight's layout,
    on the layout's grid (symmetric or asymmetric). In natural order (``act_order`` False) the columns go left to
    right and the scales (and mins) of an input-dim group are taken from the group's error-updated weights when the
    sweep reaches it (GPTQ's grouping); with one input group they are the round-to-nearest ones. With ``act_order``
    (GPTQ's "desc_act" with AutoGPTQ's ``static_groups``) every group's grid is first taken from the weights as
    they are (round-to-nearest's grid), then the columns are rounded in descending order of the Hessian diagonal:
    the inputs with the most energy first, while the most columns are left to absorb their error. The groups stay
    the layout's contiguous input-dim groups either way, so the result is stored like any other. With a diagonal
    Hessian no error is fed forward and both orders give round-to-nearest exactly.
    """
    n, k = weight.shape
    g_out, g_in = weight_groups(n, k, layout.group_size, layout.input_group_size)
    rows, width = n // g_out, k // g_in
    if width < k:  # a lazy batch holds whole input groups, so a group's scales see all earlier feedback
        block = max(block // width, 1) * width
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    dead = torch.diagonal(h) == 0  # inputs never seen: no constraint on their column
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damping * torch.diagonal(h).mean() * torch.eye(k, dtype=h.dtype, device=h.device)
    if act_order:
        _, scale, w_min = layout.quantize(w)  # static groups: every grid fixed before any feedback
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    else:
        scale = torch.zeros(g_out, g_in, dtype=torch.float32, device=weight.device)
        w_min = None if layout.symmetric else torch.zeros_like(scale)
        order = torch.arange(k, device=weight.device)
    groups = (order // width).tolist()  # the input group of each column in sweep order
    # upper Cholesky factor of H^-1: row i holds the feedback of column i's error onto columns > i
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(n, k, dtype=torch.int8, device=weight.device)
    for start in range(0, k, block):
        end = min(start + block, k)
        errors = torch.zeros(n, end - start, dtype=w.dtype, device=w.device)
        for i in range(start, end):
            g = groups[i]
            if not act_order and i % width == 0:  # first column of an input group: its grid, from the updated weights
                group = w[:, i:i + width].reshape(g_out, rows, width)
                group_scale, group_min = grid_params(group.amin(dim=(1, 2)), group.amax(dim=(1, 2)), layout.bits,
                                                     layout.symmetric)
                scale[:, g] = group_scale
                if w_min is not None:
                    w_min[:, g] = group_min
            col_scale = scale[:, g].double().repeat_interleave(rows)
            col_min = None if w_min is None else w_min[:, g].double().repeat_interleave(rows)
            q[:, i] = round_to_grid(w[:, i], col_scale, col_min, layout.bits)
            dequantized = q[:, i].double() * col_scale + (0.0 if col_min is None else col_min)
            error = (w[:, i] - dequantized) / h_inv[i, i]
            w[:, i + 1:end] -= error[:, None] * h_inv[i, i + 1:end][None, :]
            errors[:, i - start] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    if act_order:
        q[:, order] = q.clone()  # back to the weight's column order
    return q, scale, w_min


def gptq_best_order(weight: torch.Tensor, hessian: torch.Tensor, layout: Layout
                    ) -> tuple[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], dict[str, float]]:
    """GPTQ in both column orders (:func:`gptq_quantize` with and without ``act_order``), keeping the one with the
    lower :func:`output_error` on ``hessian`` (natural order on a tie). Neither dominates: act-order rounds the
    loud inputs first but fixes every grid before any feedback; natural order lets feedback reshape each group's
    grid but may round a loud input last. So the layer's own calibration data decides.

    Returns (the winner, "natural" or "act-order"; its (int8 values, scales, mins); both orders' errors)."""
    rounded = {order: gptq_quantize(weight, hessian, layout, act_order=order == "act-order") for order in GPTQ_ORDERS}
    errors = {order: output_error(weight, dequantize_weight_values(*r).to(weight.dtype), hessian)
              for order, r in rounded.items()}
    best = min(GPTQ_ORDERS, key=lambda order: errors[order])  # min keeps the first (natural) on a tie
    return best, rounded[best], errors


def awq_scales(x: torch.Tensor, mean_abs: torch.Tensor, weights: list[torch.Tensor], layouts: list[Layout],
               grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """AWQ (Lin et al., 2024): per-input-channel factors ``s = mean_abs**alpha`` (normalised; ``mean_abs`` is
    the channels' mean |x| over all calibration tokens, made equal across channels that must share a factor),
    searched over
    ``alpha`` in {0, 1/grid, ..., (grid-1)/grid}, minimising the summed squared output error of the readers
    ``sum_r ||x W_r^T - (x / s) Q(W_r * s)^T||^2`` on the calibration rows ``x`` [T, K].

    Returns (the factors [K] (all ones when alpha 0 wins), the error with alpha 0 (plain rounding), the best
    error), errors relative to ``sum_r ||x W_r^T||^2``.
    """
    xf = x.double()
    references = [xf @ w.double().T for w in weights]
    signal = sum(r.pow(2).sum().item() for r in references) or 1.0
    mean_abs = mean_abs.double().clamp_min(1e-8)
    best = (torch.ones_like(mean_abs), float("inf"))
    plain = float("inf")
    for step in range(grid):
        alpha = step / grid
        factors = mean_abs ** alpha
        factors = factors / (factors.max() * factors.min()).sqrt()  # centred in log scale, as in AWQ
        error = 0.0
        for w, layout, reference in zip(weights, layouts, references):
            scaled = w.double() * factors
            rounded = dequantize_weight_values(*layout.quantize(scaled)).double()
            error += ((xf / factors) @ rounded.T - reference).pow(2).sum().item()
        error /= signal
        if step == 0:
            plain = error
        if error < best[1]:
            best = (factors, error)
    return best[0].to(x.dtype), plain, best[1]


def low_rank_factors(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRC (ZeroQuant-V2): the truncated SVD of a weight's rounding error ``E`` [N, K] as ``U_r S_r`` [N, r] and
    ``V_r^T`` [r, K] (float32), so that ``E ~ (U_r S_r) V_r^T`` is the best rank-r approximation."""
    u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
    rank = min(rank, s.numel())
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()
