"""``recipe="auto"``: the cheapest plan per linear whose loss on the model's own samples stays within a budget.

No data and no gradients (NVIDIA ModelOpt's ``auto_quantize`` needs both):

1. **Calibration**: text the model samples itself (decoders: a random first token, then the FP model's own
   next-token distribution, as LKD's ``data="self"``); encoders read random token ids.
2. **Sensitivity**: for every linear and every kind of :data:`KINDS`, the relative output error
   ``|Q(x) Q(W)^T - x W^T| / |x W^T|`` on that linear's calibration inputs (weights quantized as the compiler
   stores them, inputs token-wise INT8 for the A8 kinds).
3. **Search**: a threshold ``t`` gives every linear the cheapest kind whose error is at most ``t`` (FP when none
   is). The plan's loss increase is *measured* on the simulated-quantized model over the calibration set
   (decoders: ``|exp(NLL_q - NLL_fp) - 1|`` of the sampled tokens, i.e. the relative perplexity change;
   encoders: ``1 - mean cosine`` of the outputs); bisection over the measured errors finds the largest ``t``
   whose plan stays within ``budget``.

The plan becomes a :class:`Recipe` (one override per linear, ``keep_fp`` for the FP ones) whose ``auto``
field records the budget, the calibration, the measured increase and every linear's errors: ``inspect``
prints it and ``save`` keeps it. A budget that only the all-FP plan meets raises ZQError.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from zqcompile.distillation_data import distillation_data
from zqcompile.errors import ZQError
from zqcompile.lkd import is_conv1d
from zqcompile.quant import dequantize_weight_values, quantize_rows, quantize_weight
from zqcompile.recipe import LinearPlan, LKDConfig, Recipe

# Cheapest first: INT4 weights are half the bytes of INT8; at equal bytes INT8 activations run the integer GEMM.
KINDS: dict[str, dict[str, Any]] = {
    "W4A8": {"weight_bits": 4, "act_bits": 8, "group_size": None, "input_group_size": 64},
    "W8A8": {"weight_bits": 8, "act_bits": 8, "group_size": None, "input_group_size": None},
    "W8A16": {"weight_bits": 8, "act_bits": None, "group_size": None, "input_group_size": None},
}
# 512 tokens: each bisection step runs the model over them once (most of the time auto takes)
CALIBRATION_SAMPLES = 4
CALIBRATION_SEQ_LEN = 128
BISECTION_STEPS = 8


def _weight(module: nn.Module) -> torch.Tensor:
    """[out, in] (GPT-2's Conv1D stores it transposed)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _fits(kind: str, module: nn.Module) -> bool:
    groups = KINDS[kind]["input_group_size"]
    return groups is None or _weight(module).shape[1] % groups == 0


class QuantizedWeights:
    """Each linear's weight quantized once per weight setting, as the compiler stores it (int8 values and scales:
    a byte per weight; W8A8 and W8A16 share theirs): the errors and every bisection step read the same integers
    instead of quantizing every weight again."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._stored: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def fake(self, name: str, kind: str) -> torch.Tensor:
        """The dequantized weight [out, in] of linear ``name`` as ``kind`` stores it, float32."""
        settings = KINDS[kind]
        key = (name, settings["weight_bits"], settings["group_size"], settings["input_group_size"])
        if key not in self._stored:
            self._stored[key] = quantize_weight(_weight(self.model.get_submodule(name)).detach().float(),
                                                *key[1:])
        return dequantize_weight_values(*self._stored[key])


def _fake_rows(x: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_rows(x)
    return (q.float() * scale).to(x.dtype)


def output_errors(module: nn.Module, inputs: torch.Tensor,
                  weights: QuantizedWeights | None = None, name: str = "") -> dict[str, float]:
    """Relative output error of one linear quantized as each kind that fits it, on its (flattened) calibration
    inputs; ``weights`` (with the linear's ``name`` in it) reuses quantized weights."""
    weights = weights or QuantizedWeights(module)
    x = inputs.float()
    reference = x @ _weight(module).detach().float().t()
    x_q = _fake_rows(x)
    errors = {}
    for kind in KINDS:
        if _fits(kind, module):
            y = (x_q if KINDS[kind]["act_bits"] == 8 else x) @ weights.fake(name, kind).t()
            errors[kind] = ((y - reference).norm() / reference.norm().clamp_min(1e-12)).item()
    return errors


@contextlib.contextmanager
def simulated(model: nn.Module, plan: Mapping[str, str], weights: QuantizedWeights) -> Iterator[None]:
    """The model computing as the compiled one would with ``plan`` ({module: kind}; others stay FP)."""
    saved, hooks = {}, []
    try:
        for name, kind in plan.items():
            module = model.get_submodule(name)
            saved[name] = module.weight.data
            fake = weights.fake(name, kind)
            module.weight.data = (fake.t() if is_conv1d(module) else fake).to(saved[name].dtype)
            if KINDS[kind]["act_bits"] == 8:
                hooks.append(module.register_forward_pre_hook(lambda m, args: (_fake_rows(args[0]), *args[1:])))
        yield
    finally:
        for name, weight in saved.items():
            model.get_submodule(name).weight.data = weight
        for hook in hooks:
            hook.remove()


def _record_inputs(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: inputs.__setitem__(name, args[0].detach().reshape(-1, args[0].shape[-1])))
        for name in names]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


class _Loss:
    """The calibration loss increase of a plan against the FP model (see the module docstring)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, decoder: bool, weights: QuantizedWeights):
        self.model, self.ids, self.decoder, self.weights = model, ids, decoder, weights
        self.reference = self._outputs()

    def _outputs(self) -> torch.Tensor:
        with torch.no_grad():
            output = self.model(input_ids=self.ids)
        if not self.decoder:
            return output.last_hidden_state.float()
        log_probs = torch.log_softmax(output.logits[:, :-1].float(), -1)
        return -log_probs.gather(-1, self.ids[:, 1:, None]).mean()

    def increase(self, plan: Mapping[str, str]) -> float:
        with simulated(self.model, plan, self.weights):
            outputs = self._outputs()
        if self.decoder:  # a change either way counts: quantization noise can lower the loss on few tokens
            return abs(math.expm1((outputs - self.reference).item()))
        cosine = torch.nn.functional.cosine_similarity(outputs, self.reference, dim=-1).mean()
        return 1 - cosine.item()


def _plan_at(errors: Mapping[str, Mapping[str, float]], threshold: float) -> dict[str, str]:
    """Each linear's cheapest kind within ``threshold`` (linears with none stay FP: absent)."""
    plan = {}
    for name, by_kind in errors.items():
        for kind, error in by_kind.items():
            if error <= threshold:
                plan[name] = kind
                break
    return plan


def auto_recipe(model: nn.Module, sites: Mapping[str, LinearPlan], budget: float, *, seed: int = 0) -> Recipe:
    """The auto plan for ``model``'s linears ``sites`` (the ones a default recipe quantizes), as a Recipe."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1:
        raise ZQError(f"recipe 'auto' needs budget= a number in (0, 1): the allowed relative increase of the "
                      f"loss on the model's own samples (0.01 = 1%), got {budget!r}")
    decoder = hasattr(model, "generate") and getattr(model, "can_generate", lambda: False)()
    config = LKDConfig(data="self" if decoder else "random", num_samples=CALIBRATION_SAMPLES,
                       seq_len=CALIBRATION_SEQ_LEN, seed=seed, progress=False)
    ids, source = distillation_data(model, config)
    names = [name for name, plan in sites.items() if plan.quantized]
    inputs = _record_inputs(model, names, ids)
    weights = QuantizedWeights(model)
    errors = {name: output_errors(model.get_submodule(name), inputs[name], weights, name) for name in names}
    del inputs
    loss = _Loss(model, ids, decoder, weights)
    thresholds = sorted({e for by_kind in errors.values() for e in by_kind.values()})
    low, high = -1, len(thresholds) - 1  # thresholds[low] meets the budget (-1: only all-FP does)
    measured: dict[int, float] = {}
    if (measured.setdefault(high, loss.increase(_plan_at(errors, thresholds[high])))) <= budget:
        low = high
    for _ in range(BISECTION_STEPS):
        if high - low <= 1:
            break
        middle = (low + high) // 2
        measured[middle] = loss.increase(_plan_at(errors, thresholds[middle]))
        low, high = (middle, high) if measured[middle] <= budget else (low, middle)
    if low < 0:
        least = min(errors, key=lambda n: min(errors[n].values()))
        raise ZQError(f"no quantized plan meets budget={budget:g}: even quantizing only the least sensitive linear "
                      f"({least}) costs more on the calibration set; raise the budget or use a preset (w8a16)")
    plan = _plan_at(errors, thresholds[low])
    report = {"budget": budget, "calibration": f"{ids.numel()} {source} tokens", "measured_increase":
              measured[low], "threshold": thresholds[low],
              "layers": {name: {"kind": plan.get(name, "FP"), "errors": errors[name]} for name in names}}
    overrides = [{"module": name, **KINDS[kind]} for name, kind in plan.items()]
    keep_fp = ["role:lm_head", "role:classifier", *[name for name in names if name not in plan]]
    return Recipe(name="auto", overrides=overrides, keep_fp=keep_fp, auto=report)


def describe(report: Mapping[str, Any]) -> str:
    """The auto plan for ``inspect``: the budget, what was measured, and each linear's errors per kind."""
    counts: dict[str, int] = {}
    for layer in report["layers"].values():
        counts[layer["kind"]] = counts.get(layer["kind"], 0) + 1
    lines = [f"auto plan: budget {100 * report['budget']:.2f}% on {report['calibration']}: measured "
             f"{100 * report['measured_increase']:+.3f}%, threshold {report['threshold']:.4g}; "
             + ", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items()))]
    for name, layer in report["layers"].items():
        errors = ", ".join(f"{kind} {error:.4f}" for kind, error in layer["errors"].items())
        lines.append(f"  {name}: {layer['kind']} (output error {errors})")
    return "\n".join(lines)
