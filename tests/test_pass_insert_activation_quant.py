"""insert_activation_quant: one token-wise quantize/dequantize pair per input tensor of the W*A8 linears."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from helpers import apply_pass, count_ops, export_graph, op_targets, prepare_for
from test_quant import reference_quantize_rows, reference_quantize_weight
from zqcompile.passes import insert_activation_quant
from zqcompile.passes.infra import linear_nodes

QUANT = torch.ops.zq.quantize_per_token.default
DEQUANT = torch.ops.zq.dequantize_per_token.default


class Attention(nn.Module):
    """q/k/v read one normalised tensor; lm_head (kept FP) reads it too."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.o_proj, self.lm_head = nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = self.norm(x)
        mixed = self.q_proj(h) * torch.sigmoid(self.k_proj(h)) + self.v_proj(h)
        return self.o_proj(mixed) + self.lm_head(h).sum(-1, keepdim=True)


def _prepared(recipe, model=None, example=None):
    model = model or Attention()
    return prepare_for(insert_activation_quant, export_graph(model, example if example is not None
                                                             else torch.randn(2, 32)), recipe)


def test_qkv_share_one_quant_and_fp_linears_read_the_fp_tensor():
    gm, ctx = _prepared("w8a8")
    result = apply_pass(insert_activation_quant, gm, ctx)
    assert result.modified and result.counters == {"insert_activation_quant": 2}  # h (q/k/v) and mixed (o_proj)
    assert count_ops(gm, QUANT) == 2 and count_ops(gm, DEQUANT) == 2
    inputs = {n.meta["zq_module"]: n.args[0] for n in linear_nodes(gm)}
    assert inputs["q_proj"] is inputs["k_proj"] is inputs["v_proj"]
    assert inputs["q_proj"].target is DEQUANT and inputs["o_proj"].target is DEQUANT
    assert inputs["lm_head"].target is torch.ops.aten.layer_norm.default  # FP layer untouched
    assert inputs["q_proj"].args[0].args[0].args[0] is inputs["lm_head"]  # dequant(getitem(quant(h)))


def test_weight_only_recipe_inserts_nothing():
    gm, ctx = _prepared("w8a16")
    before = op_targets(gm)
    result = apply_pass(insert_activation_quant, gm, ctx)
    assert not result.modified and result.counters == {} and op_targets(gm) == before


def test_simulated_quantization_matches_float64_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 24))
    gm, ctx = _prepared("w8a8", model, torch.randn(2, 4, 48))
    apply_pass(insert_activation_quant, gm, ctx)
    x = torch.randn(3, 4, 48) * torch.logspace(-1, 1, 4)[:, None]
    with torch.no_grad():
        out = gm(x)
    q_x, s_x = reference_quantize_rows(x)
    q_w, s_w = reference_quantize_weight(model[0].weight.detach(), 127, 1, 48)
    expected = (q_x * s_x) @ (q_w * s_w).T + model[0].bias.detach().double().numpy()
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
