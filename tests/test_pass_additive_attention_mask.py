"""additive_attention_mask: one where(mask, 0, -inf) per boolean mask, the same attention outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from helpers import apply_pass, count_ops, key_padding_attention_inputs, op_targets, two_layer_attention_reference
from zqcompile.passes import additive_attention_mask

SDPA = torch.ops.aten.scaled_dot_product_attention.default
WHERE = torch.ops.aten.where.Scalar


class TwoLayers(nn.Module):
    """Two attention calls that share one boolean key-padding mask (as HF's layers do)."""

    def forward(self, q, k, v, keep):
        mask = keep[:, None, None, :].expand(-1, 1, q.shape[2], -1)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(h, k, v, attn_mask=mask)


def _export(module: nn.Module, *args: torch.Tensor) -> torch.fx.GraphModule:
    return torch.export.export(module, args).module()


def test_boolean_mask_becomes_one_additive_mask():
    args = key_padding_attention_inputs()
    gm = _export(TwoLayers(), *args)
    with torch.no_grad():
        expected = gm(*args)
        result = apply_pass(additive_attention_mask, gm, None)
        got = gm(*args)
    assert result.counters == {"additive_attention_mask.masks": 1, "additive_attention_mask.sdpa": 2}
    assert count_ops(gm, WHERE) == 1
    masks = [n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None) for n in gm.graph.nodes
             if n.target is SDPA]
    assert all(m.target is torch.ops.aten.to.dtype for m in masks)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # independent reference: the two attentions in float64
    ref = two_layer_attention_reference(*args)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_unmasked_and_float_masked_attention_are_unchanged():
    class Plain(nn.Module):
        def forward(self, q, k, v, bias):
            return F.scaled_dot_product_attention(q, k, v) + F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    q, k, v, _ = key_padding_attention_inputs()
    gm = _export(Plain(), q, k, v, torch.zeros(2, 1, 5, 5))
    before = op_targets(gm)
    result = apply_pass(additive_attention_mask, gm, None)
    assert not result.modified and op_targets(gm) == before
