"""quantize_weights: FP weights replaced by integer values + scales (buffers) and a dequantize_weight node."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from helpers import apply_pass, count_ops, export_graph, op_targets, prepare_for
from test_quant import reference_quantize_weight
from zqcompile.passes import quantize_weights
from zqcompile.passes.infra import META_WEIGHT_BYTES, linear_nodes
from zqcompile.quant import unpack_int4

DEQUANT_WEIGHT = torch.ops.zq.dequantize_weight.default


class MiniBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(64, 64)
        self.up_proj, self.down_proj = nn.Linear(64, 128), nn.Linear(128, 64, bias=False)
        self.lm_head = nn.Linear(64, 32)

    def forward(self, x):
        h = self.q_proj(x)
        return self.lm_head(self.down_proj(torch.relu(self.up_proj(h))) + h)


def _stored(gm) -> dict[str, torch.Tensor]:
    return dict(gm.named_buffers()) | dict(gm.named_parameters())


def _int_buffers(stored: dict[str, torch.Tensor], module: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer values, scale) buffers that quantize_weights stored for ``module``."""
    prefix = f"model.{module}.weight_int{bits}_"
    names = sorted(k for k in stored if k.startswith(prefix))
    assert len(names) == 2, names
    values, scale = (names[0], names[1]) if names[1].endswith("_scale") else (names[1], names[0])
    return stored[values], stored[scale]


def _quantized(recipe, model=None):
    torch.manual_seed(0)
    model = model or MiniBlock()
    gm, ctx = prepare_for(quantize_weights, export_graph(model, torch.randn(2, 64)), recipe)
    fp_graph = copy.deepcopy(gm)
    result = apply_pass(quantize_weights, gm, ctx)
    return model, fp_graph, gm, result


def test_w8a8_stores_int8_per_channel_and_drops_fp_weights():
    model, _, gm, result = _quantized("w8a8")
    assert result.modified and result.counters == {"quantize_weights": 3}
    assert count_ops(gm, DEQUANT_WEIGHT) == 3
    stored = _stored(gm)
    for name in ("q_proj", "up_proj", "down_proj"):
        assert f"model.{name}.weight" not in stored  # the FP copy is gone
        weight = getattr(model, name).weight
        q, scale = _int_buffers(stored, name, 8)
        assert q.dtype == torch.int8 and q.shape == weight.shape and scale.shape == (weight.shape[0], 1)
        q_ref, scale_ref = reference_quantize_weight(weight.detach(), 127, 1, weight.shape[1])
        np.testing.assert_allclose(scale.double().numpy(), scale_ref, rtol=1e-6)
        assert np.abs(q.long().numpy() - q_ref).max() <= 1
    assert "model.lm_head.weight" in stored  # kept FP by the preset
    assert {n.meta["zq_module"]: n.meta.get(META_WEIGHT_BYTES) for n in linear_nodes(gm)} == {
        "q_proj": 64 * 64 * 4, "up_proj": 128 * 64 * 4, "down_proj": 64 * 128 * 4, "lm_head": None}


def test_w4a8_packs_mlp_weights_with_input_dim_groups():
    model, _, gm, _ = _quantized("w4a8")
    stored = _stored(gm)
    packed, scale = _int_buffers(stored, "up_proj", 4)
    assert packed.dtype == torch.uint8 and packed.shape == (128, 32)
    assert scale.shape == (128, 1)  # 64 input columns per group: one group for K=64
    _, down_scale = _int_buffers(stored, "down_proj", 4)
    assert down_scale.shape == (64, 2)  # K=128 -> 2 groups of 64 columns
    q_ref, _ = reference_quantize_weight(model.up_proj.weight.detach(), 7, 1, 64)
    assert np.abs(unpack_int4(packed, 64).long().numpy() - q_ref).max() <= 1
    assert any(k.startswith("model.q_proj.weight_int8") for k in stored)  # attention stays INT8


def test_graph_computes_with_the_dequantized_weights():
    """Simulated quantization: the output equals the FP model run with reference-dequantized weights."""
    model, fp_graph, gm, _ = _quantized({"base": "w8a8", "group_size": 16})
    reference_model = copy.deepcopy(model)
    for name in ("q_proj", "up_proj", "down_proj"):
        weight = getattr(reference_model, name).weight
        q_ref, scale_ref = reference_quantize_weight(weight.detach(), 127, 16, weight.shape[1])
        weight.data = torch.from_numpy(q_ref * np.repeat(scale_ref, 16, axis=0)).float()
    x = torch.randn(5, 64)
    with torch.no_grad():
        out, expected, fp_out = gm(x), reference_model(x), fp_graph(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out, fp_out, rtol=1e-5, atol=1e-5)  # and it really is quantized


def test_tied_weights_are_quantized_once_and_embedding_keeps_its_copy():
    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 64)
            self.fc1, self.fc2 = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
            self.fc2.weight = self.fc1.weight
            self.lm_head = nn.Linear(64, 32, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, ids):
            return self.lm_head(self.fc2(self.fc1(self.embed(ids))))

    gm, ctx = prepare_for(quantize_weights, export_graph(TiedHead(), torch.randint(0, 32, (2, 5))),
                          {"keep_fp": []})
    result = apply_pass(quantize_weights, gm, ctx)
    assert result.counters == {"quantize_weights": 3}
    int8_buffers = [k for k, v in _stored(gm).items() if v.dtype == torch.int8]
    assert len(int8_buffers) == 2  # fc1/fc2 share one copy; lm_head has its own
    assert "model.embed.weight" in _stored(gm)  # the embedding still reads the FP matrix


def test_all_layers_kept_fp_changes_nothing():
    gm, ctx = prepare_for(quantize_weights, export_graph(MiniBlock(), torch.randn(2, 64)), {"keep_fp": ["*"]})
    before, stored_before = op_targets(gm), set(_stored(gm))
    result = apply_pass(quantize_weights, gm, ctx)
    assert not result.modified and result.counters == {}
    assert op_targets(gm) == before and set(_stored(gm)) == stored_before
