"""The rule layer (patterns.apply_rules) and the shared matchers, on tiny graphs built by hand.

One made-up rule, ``double_neg`` (``neg(neg(x))`` -> ``x``), shows the three outcomes: a match is emitted and
counted, a miss leaves the graph as it was and says why, a node no rule knows gets the pass's own reason.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx import Graph, GraphModule, Node

from zqcompile.passes.infra import CompileContext, is_stored
from zqcompile.passes.patterns import (
    GatedActivation, LayerNorm, Miss, Rule, apply_rules, match_gated_activation, match_layer_norm,
)
from zqcompile.recipe import load_recipe

aten = torch.ops.aten


def _double_neg(node: Node) -> Node | Miss | None:
    inner = node.args[0] if node.target is aten.neg.default else None
    if not (isinstance(inner, Node) and inner.target is aten.neg.default):
        return None
    if len(inner.users) != 1:
        return Miss("the inner neg is read elsewhere")
    return inner.args[0]


def _replace(gm: GraphModule, ctx: CompileContext, node: Node, source: Node) -> None:
    node.replace_all_uses_with(source)


DOUBLE_NEG = Rule("double_neg", _double_neg, _replace)
NEVER = Rule("never", lambda node: Miss("it never matches") if node.target is aten.neg.default else None, _replace)


def _graph(build) -> GraphModule:
    """A GraphModule whose graph ``build(graph, x)`` writes; returns its output node's value."""
    graph = Graph()
    x = graph.placeholder("x")
    graph.output(build(graph, x))
    return GraphModule(torch.nn.Module(), graph)


def _apply(gm: GraphModule, rules) -> tuple:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not aten.add.Tensor]
    applied = apply_rules(gm, CompileContext(load_recipe("w8a8")), nodes, rules, "demo",
                          lambda node: f"no rule covers {node.target}")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return applied, [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_a_match_is_emitted_and_counted_per_rule():
    gm = _graph(lambda g, x: g.call_function(aten.neg.default, (g.call_function(aten.neg.default, (x,)),)))
    applied, ops = _apply(gm, [NEVER, DOUBLE_NEG])
    assert applied.counters == {"demo.double_neg": 1}
    assert [str(m) for m in applied.matches] == ["x"]
    assert applied.misses == {"neg_default": "never: it never matches"}  # the inner neg: no rule takes it
    assert ops == []  # the outer neg matched; the inner one, now unread, is gone
    x = torch.randn(5)
    torch.testing.assert_close(gm(x), x)


def test_a_miss_leaves_the_graph_unchanged_and_gives_every_rule_s_reason():
    def neg_read_twice(g: Graph, x: Node) -> Node:
        inner = g.call_function(aten.neg.default, (x,))
        return g.call_function(aten.add.Tensor, (g.call_function(aten.neg.default, (inner,)), inner))

    gm = _graph(neg_read_twice)
    before = gm.code
    applied, _ = _apply(gm, [NEVER, DOUBLE_NEG])
    assert applied.counters == {} and applied.matches == []
    assert gm.code == before
    assert applied.misses == {"neg_default": "never: it never matches",
                              "neg_default_1": "never: it never matches; double_neg: the inner neg is read elsewhere"}


def test_a_node_no_rule_recognises_gets_the_pass_s_reason():
    gm = _graph(lambda g, x: g.call_function(aten.relu.default, (x,)))
    before = gm.code
    applied, _ = _apply(gm, [DOUBLE_NEG])
    assert applied.misses == {"relu_default": "no rule covers aten.relu.default"} and applied.counters == {}
    assert gm.code == before


def test_first_matching_rule_wins():
    second = Rule("second", _double_neg, _replace)
    gm = _graph(lambda g, x: g.call_function(aten.neg.default, (g.call_function(aten.neg.default, (x,)),)))
    applied, _ = _apply(gm, [DOUBLE_NEG, second])
    assert applied.counters == {"demo.double_neg": 1}


def test_is_stored_is_true_for_get_attr_only():
    graph = Graph()
    x, w = graph.placeholder("x"), graph.get_attr("w")
    assert is_stored(w) and not is_stored(x) and not is_stored(None) and not is_stored(1.0)


def test_layer_norm_matcher_parts_defaults_and_refusal():
    def layer_norm(*args):
        return lambda g, x: g.call_function(aten.layer_norm.default, (x, *args))

    for args, eps in (([[8]], 1e-5), ([[8], None, None], 1e-5), ([[8], None, None, 1e-6], 1e-6)):
        gm = _graph(layer_norm(*args))
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        assert match_layer_norm(node) == LayerNorm(node.args[0], None, None, eps)
    gm = _graph(layer_norm([4, 8]))
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert match_layer_norm(node) == Miss("LayerNorm over 2 dims (only the last dim is supported)")
    relu = next(n for n in _graph(lambda g, x: g.call_function(aten.relu.default, (x,))).graph.nodes
                if n.op == "call_function")
    assert match_layer_norm(relu) is None


@pytest.mark.parametrize("activation, kwargs, approximate", [
    ("silu", {}, None), ("gelu", {}, "none"), ("gelu", {"approximate": "tanh"}, "tanh")])
def test_gated_activation_matcher_takes_its_kind_and_refuses_a_broadcast(activation, kwargs, approximate):
    op = {"silu": aten.silu.default, "gelu": aten.gelu.default}[activation]

    def gated(up_shape):
        def build(g: Graph, x: Node) -> Node:
            x.meta["val"] = torch.empty(2, 8)
            up = g.placeholder("up")
            up.meta["val"] = torch.empty(up_shape)
            act = g.call_function(op, (x,), kwargs)
            act.meta["val"] = torch.empty(2, 8)
            return g.call_function(aten.mul.Tensor, (act, up))
        gm = _graph(build)
        return next(n for n in gm.graph.nodes if n.target is aten.mul.Tensor)

    same = gated((2, 8))
    assert match_gated_activation(same, activation) == GatedActivation(same.args[0].args[0], same.args[1],
                                                                       approximate)
    other = "gelu" if activation == "silu" else "silu"
    assert match_gated_activation(same, other) is None  # the other kind's rule leaves it alone
    assert match_gated_activation(gated((8,)), activation) == Miss(
        f"{activation}(gate) is read elsewhere or broadcasts against up")
