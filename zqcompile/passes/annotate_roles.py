"""annotate_roles: tag every ``aten.linear`` with its module name and role.

Matches each linear node; emits ``meta['zq_module']`` (qualified name of the module that produced it, from
export's ``nn_module_stack``) and ``meta['zq_role']``: one of attn_qkv, attn_out, mlp_in, mlp_out, lm_head,
classifier (pooler and classification heads) or other. Never refuses.

The role comes from the graph's structure first, so an unseen naming scheme still gets it:

- attn_out / mlp_out: the linear's input is computed by attention (``scaled_dot_product_attention`` or the
  matmuls of an eager attention) or by an activation (GELU, ReLU, SiLU, tanh, ``act(gate) * up``), looking back
  through the ops in between;
- attn_qkv / mlp_in: its output feeds attention (queries, keys, values, relative-position projections) or an
  activation, or it is the ``up`` of a gated MLP (its output reaches an mlp_out linear without an activation of
  its own);

looking no further than :data:`MAX_HOPS` ops and never past another linear, a LayerNorm or an embedding (so a walk
stays within its block). Module-name conventions decide the heads first (an LM head's softcapping tanh or a
pooler's tanh is not an MLP) and are the fallback when the structure says nothing; what neither recognises is
``other``, which recipes can still target by module glob.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Iterable

import torch
from torch.fx import GraphModule, Node

from zqcompile.capture import module_name_of
from zqcompile.passes.infra import LINEAR, META_MODULE, META_ROLE, CompileContext, PassResult, is_op, linear_nodes

aten = torch.ops.aten

# First match wins: attention output projections also end in "output.dense", like BERT's MLP output.
ROLE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((role, re.compile(rf"(^|\.)({names})$")) for role, names in (
    ("attn_qkv", r"query|key|value|q_proj|k_proj|v_proj|qkv_proj|c_attn|Wqkv|query_key_value"),
    ("attn_out", r"attention\.output\.dense|o_proj|attn\.c_proj|out_proj|attention\.dense"),
    ("mlp_in", r"intermediate\.dense|gate_proj|up_proj|mlp\.c_fc|fc1|dense_h_to_4h|gate_up_proj"),
    ("mlp_out", r"output\.dense|down_proj|mlp\.c_proj|fc2|dense_4h_to_h"),
    ("lm_head", r"lm_head|predictions\.decoder|embed_out"),
    ("classifier", r"pooler\.dense|classifier|classifier\.\w+|score|qa_outputs|predictions\.transform\.dense"),
))
HEAD_ROLES = ("lm_head", "classifier")

ATTENTION_OPS = frozenset({
    aten.scaled_dot_product_attention.default, aten.matmul.default, aten.bmm.default, aten.baddbmm.default,
})
ACTIVATION_OPS = frozenset({
    aten.gelu.default, aten.relu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
    aten.erf.default,
})
BLOCK_BOUNDARIES = frozenset({LINEAR, aten.layer_norm.default, aten.embedding.default})
MAX_HOPS = 24  # Qwen3's q_proj reaches attention through a per-head RMSNorm and the rotary embedding in ~15


def role_of(module: str) -> str:
    """The role that module-name conventions give ``module`` (``other`` when none matches)."""
    return next((role for role, pattern in ROLE_PATTERNS if pattern.search(module)), "other")


def _first_reached(start: Iterable[Node], step: Callable[[Node], Iterable[Node]],
                   goal: Callable[[Node], str | None]) -> str | None:
    """Breadth-first from ``start`` along ``step``: the ``goal`` of the nearest node that has one; the walk does
    not pass block boundaries or placeholders / constants, nor go further than MAX_HOPS."""
    frontier, seen = list(start), set()
    for _ in range(MAX_HOPS):
        following = []
        for node in frontier:
            if node in seen:
                continue
            seen.add(node)
            found = goal(node)
            if found is not None:
                return found
            if node.op == "call_function" and node.target not in BLOCK_BOUNDARIES:
                following.extend(step(node))
        frontier = following
    return None


def _computed_by(node: Node) -> str | None:
    return "attn_out" if is_op(node, *ATTENTION_OPS) else "mlp_out" if is_op(node, *ACTIVATION_OPS) else None


def _input_role(linear: Node) -> str | None:
    """attn_out / mlp_out when the linear's input comes from attention / an activation."""
    return _first_reached([linear.args[0]], lambda n: n.all_input_nodes, _computed_by)


def _output_role(linear: Node, input_roles: dict[Node, str | None]) -> str | None:
    """attn_qkv / mlp_in when the linear's output feeds attention / an activation / an mlp_out linear."""
    def goal(node: Node) -> str | None:
        if is_op(node, *ATTENTION_OPS):
            return "attn_qkv"
        if is_op(node, *ACTIVATION_OPS) or input_roles.get(node) == "mlp_out":
            return "mlp_in"
        return None
    return _first_reached(list(linear.users), lambda n: n.users, goal)


def structural_roles(nodes: list[Node]) -> dict[Node, str | None]:
    """The role each linear's place in the graph gives it, or None where the structure says nothing."""
    input_roles = {node: _input_role(node) for node in nodes}
    return {node: input_roles[node] or _output_role(node, input_roles) for node in nodes}


def annotate_roles(gm: GraphModule, ctx: CompileContext) -> PassResult:
    nodes = linear_nodes(gm)
    structure = structural_roles(nodes)
    counters: Counter = Counter({"annotate_roles": len(nodes)})
    for index, node in enumerate(nodes):
        module = module_name_of(node) or f"linear_{index}"
        by_name = role_of(module)
        role = by_name if by_name in HEAD_ROLES else structure[node] or by_name
        node.meta[META_MODULE] = module
        node.meta[META_ROLE] = role
        counters["annotate_roles.from_structure"] += role == structure[node]
    return PassResult(gm, False, counters)
