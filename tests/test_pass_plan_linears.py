"""plan_linears: the recipe resolved into one LinearPlan per linear (meta + ctx.plans)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import apply_pass, export_graph, prepare_for
from zqcompile import ZQError
from zqcompile.passes import plan_linears
from zqcompile.passes.infra import META_PLAN, linear_nodes


class MiniDecoder(nn.Module):
    """Linears named like a Llama block, plus one whose weight is computed at run time."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.o_proj = nn.Linear(64, 64), nn.Linear(64, 64)
        self.up_proj, self.down_proj = nn.Linear(64, 128), nn.Linear(128, 64)
        self.lm_head = nn.Linear(64, 100)
        self.scaled = nn.Parameter(torch.randn(64, 64))

    def forward(self, x):
        h = self.o_proj(self.q_proj(x))
        h = h + torch.nn.functional.linear(h, self.scaled * 0.5)
        return self.lm_head(self.down_proj(torch.relu(self.up_proj(h))))


def _plans(recipe) -> dict[str, tuple[str, str]]:
    gm, ctx = prepare_for(plan_linears, export_graph(MiniDecoder(), torch.randn(2, 64)), recipe)
    result = apply_pass(plan_linears, gm, ctx)
    assert not result.modified
    assert result.counters == {"plan_linears.quantized": sum(p.quantized for p in ctx.plans.values())}
    for node in linear_nodes(gm):
        assert ctx.plans[node.meta["zq_module"]] is node.meta[META_PLAN]
    return {module: (plan.kind, plan.reason) for module, plan in ctx.plans.items()}


def test_w8a8_plans_keep_lm_head_and_computed_weights_fp():
    plans = _plans("w8a8")
    assert plans["q_proj"] == plans["down_proj"] == ("W8A8", "recipe w8a8")
    assert plans["lm_head"] == ("FP", "keep_fp role:lm_head")
    assert plans["linear_2"] == ("FP", "weight computed at run time (not a parameter)")


def test_w4a8_plans_mlp_int4_attention_int8():
    plans = _plans("w4a8")
    assert plans["up_proj"] == plans["down_proj"] == ("W4A8", "override role:mlp_*")
    assert plans["q_proj"] == plans["o_proj"] == ("W8A8", "recipe w4a8")


def test_module_overrides_and_keep_fp_globs():
    plans = _plans({"base": "w8a16", "keep_fp": ["o_*"], "overrides": [
        {"module": "*_proj", "weight_bits": 4, "group_size": 32},
        {"module": "up_proj", "weight_bits": 8},  # later entries win
    ]})
    assert plans["q_proj"] == ("W4A16", "override module:*_proj")
    assert plans["up_proj"] == ("W8A16", "override module:up_proj")
    assert plans["o_proj"] == ("FP", "keep_fp o_*")
    assert plans["lm_head"] == ("W8A16", "recipe w8a16+custom")  # keep_fp replaced, so the head is quantized


def test_bad_recipes_are_rejected_naming_the_layer():
    with pytest.raises(ZQError, match=r"module glob 'encoder\.\*' matches no linear layer \(linear layers are "
                                      r"named like 'q_proj', 'o_proj', 'up_proj'\)"):
        _plans({"keep_fp": ["encoder.*"]})
    with pytest.raises(ZQError, match=r"recipe 'custom' for up_proj \(128x64, recipe custom\): group_size=48 does "
                                      r"not divide out_features=128"):
        _plans({"group_size": 48, "keep_fp": ["q_proj", "o_proj", "down_proj", "lm_head"]})
