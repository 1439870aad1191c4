"""annotate_roles: every aten.linear gets its module name and a role, from the graph's structure first and the
naming conventions second."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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
    assert result.counters["annotate_roles"] == len(linear_nodes(gm))
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


class UnseenNames(nn.Module):
    """A pre-LN block whose linears follow no known naming scheme: attention through SDPA, a GeGLU MLP, a
    softcapped head (its tanh is not an MLP)."""

    def __init__(self, k: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(k), nn.LayerNorm(k)
        self.a, self.b, self.c, self.d = (nn.Linear(k, k) for _ in range(4))
        self.e, self.f, self.g = nn.Linear(k, 32), nn.Linear(k, 32), nn.Linear(32, k)
        self.lm_head = nn.Linear(k, 8)

    def split(self, t):
        return t.view(*t.shape[:2], self.heads, -1).transpose(1, 2)

    def forward(self, x):
        h = self.norm1(x)
        ctx = F.scaled_dot_product_attention(self.split(self.a(h)), self.split(self.b(h)) * 0.5, self.split(self.c(h)))
        x = x + self.d(ctx.transpose(1, 2).reshape(x.shape))
        h = self.norm2(x)
        x = x + self.g(F.gelu(self.e(h), approximate="tanh") * self.f(h))
        return torch.tanh(self.lm_head(x) / 30.0) * 30.0


def test_roles_come_from_the_graph_structure_for_unseen_names():
    gm, ctx = prepare_for(annotate_roles, export_graph(UnseenNames(), torch.randn(2, 5, 16)))
    result = apply_pass(annotate_roles, gm, ctx)
    roles = {n.meta[META_MODULE]: n.meta[META_ROLE] for n in linear_nodes(gm)}
    assert roles == {"a": "attn_qkv", "b": "attn_qkv", "c": "attn_qkv", "d": "attn_out", "e": "mlp_in",
                     "f": "mlp_in", "g": "mlp_out", "lm_head": "lm_head"}
    assert role_of("e") == "other"  # the names alone say nothing
    assert result.counters["annotate_roles.from_structure"] == 7  # all but the head


def test_structure_outranks_a_misleading_name():
    """A linear called ``fc1`` (an MLP input by name) that projects attention's output is attn_out."""
    class Misnamed(UnseenNames):
        def __init__(self):
            super().__init__()
            self.fc1 = self.d

        def forward(self, x):
            h = self.norm1(x)
            ctx = F.scaled_dot_product_attention(self.split(self.a(h)), self.split(self.b(h)), self.split(self.c(h)))
            return self.fc1(ctx.transpose(1, 2).reshape(x.shape))

    gm, ctx = prepare_for(annotate_roles, export_graph(Misnamed(), torch.randn(2, 5, 16)))
    apply_pass(annotate_roles, gm, ctx)
    roles = {n.meta[META_MODULE]: n.meta[META_ROLE] for n in linear_nodes(gm)}
    assert roles["fc1"] == "attn_out" and role_of("fc1") == "mlp_in"
