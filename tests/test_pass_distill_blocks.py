"""distill_blocks: LKD's distilled tensors land on the graph attributes the compiler quantizes next."""

from __future__ import annotations

import dataclasses

import torch

from helpers import TINY_MODELS, apply_pass, op_targets, prepare_for
from zqcompile.capture import capture
from zqcompile.lkd import distill
from zqcompile.passes import distill_blocks
from zqcompile.passes.infra import META_MODULE, get_attr_tensor, linear_nodes
from zqcompile.recipe import LKDConfig, load_recipe

FAST = LKDConfig(data="random", num_samples=4, seq_len=8, batch_size=4, steps=2, progress=False)


def test_without_lkd_the_graph_is_left_unchanged():
    model = TINY_MODELS["gpt2"]()
    gm, ctx = prepare_for(distill_blocks, capture(model).graph_module, "w4a8")
    ctx.source_model = model  # even with the model at hand: the recipe asks for no LKD
    before = (op_targets(gm), {k: v.clone() for k, v in gm.state_dict().items()})
    result = apply_pass(distill_blocks, gm, ctx)
    assert not result.modified and ctx.lkd_result is None
    assert op_targets(gm) == before[0]
    assert all(torch.equal(v, before[1][k]) for k, v in gm.state_dict().items())


def test_distilled_conv1d_weights_land_transposed_on_the_canonical_linears():
    model = TINY_MODELS["gpt2"]()  # Conv1D weights are [in, out]; attn.c_proj is square, so shapes cannot tell
    recipe = dataclasses.replace(load_recipe("w4a8"), lkd=FAST)
    gm, ctx = prepare_for(distill_blocks, capture(model).graph_module, recipe)
    ctx.source_model = model
    result = apply_pass(distill_blocks, gm, ctx)
    # the same distillation run by hand with the compiler's plans gives the tensors the pass put in the graph
    expected = distill(model, ctx.plans, FAST)
    assert result.modified and result.counters["distill_blocks.tensors"] == len(expected.weights) > 0
    checked = 0
    for node in linear_nodes(gm):
        name = f"{node.meta[META_MODULE]}.weight"
        if name in expected.weights:
            torch.testing.assert_close(get_attr_tensor(gm, node.args[1]), expected.weights[name].t(), rtol=0, atol=0)
            checked += 1
    assert checked == 4 * model.config.n_layer  # c_attn, attn.c_proj, c_fc, mlp.c_proj of every block
    square = model.transformer.h[0].attn.c_proj.weight
    assert square.shape[0] == square.shape[1]
    assert not torch.equal(expected.weights["transformer.h.0.attn.c_proj.weight"], square)  # it was trained
