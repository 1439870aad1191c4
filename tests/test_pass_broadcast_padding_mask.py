"""broadcast_padding_mask: SDPA gets the [B,1,1,S] key-padding mask when the query part is proven all True."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import zqcompile
from helpers import TINY_MODELS, apply_pass, key_padding_attention_inputs, op_targets, two_layer_attention_reference
from zqcompile.passes import CompileContext, broadcast_padding_mask
from zqcompile.pipeline import run_target_phases
from zqcompile.recipe import load_recipe

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class HFMask(nn.Module):
    """The mask Hugging Face's encoders build: (arange(S) + 0 >= 0)[query] & keep[key], expanded, used twice."""

    def __init__(self, threshold: int = 0):
        super().__init__()
        self.threshold = threshold

    def forward(self, q, k, v, keep):
        seq = q.shape[2]
        query_ok = (torch.arange(seq) + 0 >= self.threshold)[None, None, :, None]
        mask = (torch.ones((), dtype=torch.bool) & query_ok & keep[:, None, None, :]).expand(q.shape[0], -1, seq, seq)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(h, k, v, attn_mask=mask)


def _masks(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None) for n in gm.graph.nodes
            if n.target is SDPA]


def test_proven_query_part_is_dropped_and_attention_unchanged():
    args = key_padding_attention_inputs()
    gm = torch.export.export(HFMask(), args).module()
    with torch.no_grad():
        expected = gm(*args)
        result = apply_pass(broadcast_padding_mask, gm, CompileContext(load_recipe("w8a8")))
        got = gm(*args)
    assert result.counters == {"broadcast_padding_mask.sdpa": 2}
    assert all(tuple(m.meta["val"].shape) == (2, 1, 1, 5) for m in _masks(gm))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # independent reference: the two attentions in float64
    ref = two_layer_attention_reference(*args)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_unproven_query_part_is_left_alone_with_a_reason():
    args = key_padding_attention_inputs()
    gm = torch.export.export(HFMask(threshold=1), args).module()  # arange >= 1 is False at position 0
    before, ctx = op_targets(gm), CompileContext(load_recipe("w8a8"))
    result = apply_pass(broadcast_padding_mask, gm, ctx)
    assert not result.modified and op_targets(gm) == before
    assert all(tuple(m.meta["val"].shape) == (2, 1, 5, 5) for m in _masks(gm))
    assert any("neither operand of the mask's `and` is proven all True" in why for why in ctx.target_skipped.values())


def test_tiny_bert_cuda_target_uses_the_broadcast_mask_with_padding():
    # the cuda target's phases are graph work: run them on the CPU graph and compare with the compiled graph
    model = TINY_MODELS["bert"]()
    qmodel = zqcompile.compile(model, "w8a8")
    ids = torch.randint(0, 100, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    inputs = qmodel.graph_inputs(ids, mask)
    with torch.no_grad():
        expected = qmodel.graph_module(*inputs)
        executed = run_target_phases(qmodel.graph_module, qmodel.context, "cuda")
        got = executed(*inputs)
    assert qmodel.context.counters["broadcast_padding_mask.sdpa"] == model.config.num_hidden_layers
    # additive_attention_mask made each SDPA mask to(where(bool mask, 0, -inf)): the bool mask is the [B,1,1,S] one
    assert all(m.args[0].args[0].meta["val"].shape[1:3] == (1, 1) for m in _masks(executed))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
