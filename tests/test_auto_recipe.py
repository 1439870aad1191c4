"""recipe="auto": a tiny Llama with one planted sensitive layer; the plan respects its budget (checked with the
compiled model itself), keeps the sensitive layer at higher precision, saves with the model, and an impossible
budget is refused."""

from __future__ import annotations

import math

import pytest
import torch

import zqcompile
from helpers import TINY_MODELS
from zqcompile.auto_recipe import CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN, KINDS, output_errors
from zqcompile.distillation_data import distillation_data
from zqcompile.recipe import LKDConfig

SENSITIVE = "model.layers.1.mlp.down_proj"
ORDER = [*KINDS, "FP"]  # cheapest first


def confident_llama_with_a_sensitive_layer():
    """Sharp next-token distributions (so the loss reacts to errors) and one outlier channel into SENSITIVE's
    input, which token-wise INT8 activations cannot represent."""
    model = TINY_MODELS["llama"]()
    with torch.no_grad():
        model.lm_head.weight *= 8.0
        model.model.layers[1].mlp.down_proj.weight *= 6.0  # the layer matters for the logits
        model.model.layers[1].mlp.up_proj.weight[7] *= 1000.0
        model.model.layers[1].mlp.down_proj.weight[:, 7] /= 1000.0  # same channel contribution, huge activation
    return model


def calibration_loss_increase(model, compiled) -> float:
    """exp(mean NLL of the compiled model - the FP model's) on the same self-generated tokens the plan used."""
    config = LKDConfig(data="self", num_samples=CALIBRATION_SAMPLES, seq_len=CALIBRATION_SEQ_LEN, seed=0,
                       progress=False)
    ids, _ = distillation_data(model, config)

    def nll(m) -> float:
        with torch.no_grad():
            log_probs = torch.log_softmax(m(input_ids=ids).logits[:, :-1].double(), -1)
        return -log_probs.gather(-1, ids[:, 1:, None]).mean().item()

    return math.expm1(nll(compiled) - nll(model))


@pytest.fixture(scope="module")
def planned():
    model = confident_llama_with_a_sensitive_layer()
    return model, zqcompile.compile(model, "auto", budget=0.03, generation=False)  # the plan and the forward only


def test_auto_respects_its_budget_and_protects_the_sensitive_layer(planned):
    model, compiled = planned
    report = compiled.recipe.auto
    assert report["measured_increase"] <= 0.03
    assert abs(calibration_loss_increase(model, compiled)) <= 0.03 * 1.1 + 1e-4  # the compiled model, not the simulation
    kinds = {name: layer["kind"] for name, layer in report["layers"].items()}
    assert len(kinds) == 14  # every linear but the LM head
    rank = {kind: ORDER.index(kind) for kind in ORDER}
    others = [rank[kind] for name, kind in kinds.items() if name != SENSITIVE]
    assert rank[kinds[SENSITIVE]] >= max(others)  # no layer gets a more precise kind than the planted one
    assert others.count(0) >= len(others) // 2  # and most layers stay at the cheapest kind
    assert kinds[SENSITIVE] in ("W8A16", "FP")
    assert report["layers"][SENSITIVE]["errors"]["W8A8"] > 5 * max(
        layer["errors"]["W8A8"] for name, layer in report["layers"].items() if name != SENSITIVE)
    plans = {name: plan.kind for name, plan in compiled.context.plans.items()}
    assert all(plans[name] == kind for name, kind in kinds.items())  # the compiler compiled the plan


def test_output_error_against_a_float64_reference():
    linear = torch.nn.Linear(64, 8)
    x = torch.randn(10, 64)
    x[:, 3] *= 100.0
    w = linear.weight.detach().double()
    scale = w.abs().amax(1, keepdim=True) / 127  # INT8 per output row, symmetric
    w_q = torch.round(w / scale).clamp(-127, 127) * scale
    x_scale = x.double().abs().amax(1, keepdim=True) / 127  # INT8 per token
    x_q = torch.round(x.double() / x_scale) * x_scale
    reference = x.double() @ w.T
    expected = ((x_q @ w_q.T - reference).norm() / reference.norm()).item()
    errors = output_errors(linear, x)
    assert "W4A8" in errors  # in_features 64: one group of 64
    assert errors["W8A8"] == pytest.approx(expected, rel=1e-3)
    weight_only = ((x.double() @ w_q.T - reference).norm() / reference.norm()).item()
    assert errors["W8A16"] == pytest.approx(weight_only, rel=1e-3)
    assert "W4A8" not in output_errors(torch.nn.Linear(96, 8), torch.randn(4, 96))  # 96 is no multiple of 64


def test_auto_plan_is_saved_and_shown(planned, tmp_path):
    _, compiled = planned
    text = zqcompile.inspect(compiled, code=False)
    assert "auto plan: budget 3.00%" in text and f"{SENSITIVE}: " in text
    compiled.save(tmp_path / "auto")
    assert zqcompile.load(tmp_path / "auto").recipe.auto == compiled.recipe.auto


def test_impossible_budgets_are_refused():
    model = confident_llama_with_a_sensitive_layer()
    with pytest.raises(zqcompile.ZQError, match="no quantized plan meets budget"):
        zqcompile.compile(model, "auto", budget=1e-9, generation=False)  # (refused before any generation graph)
    with pytest.raises(zqcompile.ZQError, match=r"number in \(0, 1\)"):
        zqcompile.compile(model, "auto", budget=0)
    with pytest.raises(zqcompile.ZQError, match="needs budget"):
        zqcompile.compile(model, "auto")
    with pytest.raises(zqcompile.ZQError, match="for recipe='auto' only"):
        zqcompile.compile(model, "w8a8", budget=0.01)
