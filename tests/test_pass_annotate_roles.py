"""annotate_roles: every aten.linear gets its module name and a role from the naming conventions."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx import Graph, GraphModule

from helpers import apply_pass, export_graph, make_tiny_bert, make_tiny_gpt2, make_tiny_llama, prepare_for
from zqcompile.capture import capture
from zqcompile.passes import annotate_roles
from zqcompile.passes.annotate_roles import role_of
from zqcompile.passes.infra import LINEAR, META_MODULE, META_ROLE, linear_nodes


@pytest.mark.parametrize("module, role", [
    ("encoder.layer.0.attention.self.query", "attn_qkv"),
    ("encoder.layer.3.attention.self.value", "attn_qkv"),
    ("encoder.layer.0.attention.output.dense", "attn_out"),  # before the mlp_out rule's "output.dense"
    ("encoder.layer.0.intermediate.dense", "mlp_in"),
    ("encoder.layer.0.output.dense", "mlp_out"),
    ("pooler.dense", "classifier"),
    ("classifier", "classifier"),
    ("transformer.h.1.attn.c_attn", "attn_qkv"),
    ("transformer.h.1.attn.c_proj", "attn_out"),
    ("transformer.h.1.mlp.c_fc", "mlp_in"),
    ("transformer.h.1.mlp.c_proj", "mlp_out"),
    ("model.layers.0.self_attn.k_proj", "attn_qkv"),
    ("model.layers.0.self_attn.o_proj", "attn_out"),
    ("model.layers.0.mlp.gate_proj", "mlp_in"),
    ("model.layers.0.mlp.up_proj", "mlp_in"),
    ("model.layers.0.mlp.down_proj", "mlp_out"),
    ("lm_head", "lm_head"),
    ("cls.predictions.decoder", "lm_head"),
    ("score", "classifier"),
    ("encoder.my_custom_projection", "other"),
    ("queryish", "other"),  # names match whole dotted components, not prefixes
])
def test_role_of_module_names(module, role):
    assert role_of(module) == role


def _roles(model) -> dict[str, str]:
    gm, ctx = prepare_for(annotate_roles, capture(model).graph_module)
    result = apply_pass(annotate_roles, gm, ctx)
    assert not result.modified  # metadata only
    assert result.counters == {"annotate_roles": len(linear_nodes(gm))}
    return {n.meta[META_MODULE]: n.meta[META_ROLE] for n in linear_nodes(gm)}


def test_tiny_bert_roles_cover_every_linear_module():
    model = make_tiny_bert()
    roles = _roles(model)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(roles) == linears
    assert roles["encoder.layer.1.attention.self.key"] == "attn_qkv"
    assert roles["encoder.layer.1.attention.output.dense"] == "attn_out"
    assert roles["encoder.layer.1.intermediate.dense"] == "mlp_in"
    assert roles["encoder.layer.1.output.dense"] == "mlp_out"
    assert roles["pooler.dense"] == "classifier"
    assert sorted(roles.values()).count("attn_qkv") == 6


def test_tiny_gpt2_and_llama_roles():
    gpt2 = _roles(make_tiny_gpt2())
    assert gpt2["transformer.h.0.attn.c_attn"] == "attn_qkv" and gpt2["transformer.h.0.mlp.c_proj"] == "mlp_out"
    assert gpt2["lm_head"] == "lm_head"
    llama = _roles(make_tiny_llama())
    assert [llama[f"model.layers.1.{m}"] for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj",
                                                   "mlp.down_proj")] == ["attn_qkv", "attn_out", "mlp_in", "mlp_out"]
    assert llama["lm_head"] == "lm_head" and len(llama) == 15


def test_plain_module_names_and_fallback_without_module_stack():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc2(self.fc1(x))

    gm, ctx = prepare_for(annotate_roles, export_graph(Plain(), torch.randn(2, 8)))
    apply_pass(annotate_roles, gm, ctx)
    assert [(n.meta[META_MODULE], n.meta[META_ROLE]) for n in linear_nodes(gm)] == [("fc1", "mlp_in"),
                                                                                    ("fc2", "mlp_out")]
    # a hand-built graph has no nn_module_stack: linears are named by position
    graph = Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    graph.output(graph.call_function(LINEAR, (graph.call_function(LINEAR, (x, w)), w)))
    hand = GraphModule(nn.Module(), graph)
    apply_pass(annotate_roles, hand, None)
    assert [(n.meta[META_MODULE], n.meta[META_ROLE]) for n in linear_nodes(hand)] == [("linear_0", "other"),
                                                                                      ("linear_1", "other")]
