"""annotate_roles: tag every ``aten.linear`` with its module name and role.

Matches each linear node; emits ``meta['zq_module']`` (qualified name of the module that produced it,
from export's ``nn_module_stack``) and ``meta['zq_role']``: one of attn_qkv, attn_out, mlp_in, mlp_out,
lm_head, classifier (pooler and classification heads) or other, from the module-name conventions of
BERT, GPT-2, Llama/Qwen2 and friends. Never refuses; an unrecognised name is role ``other``, which recipes
can still target by module glob.
"""

from __future__ import annotations

import re
from collections import Counter

from torch.fx import GraphModule

from zqcompile.capture import module_name_of
from zqcompile.passes.infra import META_MODULE, META_ROLE, CompileContext, PassResult, linear_nodes

# First match wins: attention output projections also end in "output.dense", like BERT's MLP output.
ROLE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((role, re.compile(rf"(^|\.)({names})$")) for role, names in (
    ("attn_qkv", r"query|key|value|q_proj|k_proj|v_proj|qkv_proj|c_attn|Wqkv|query_key_value"),
    ("attn_out", r"attention\.output\.dense|o_proj|attn\.c_proj|out_proj|attention\.dense"),
    ("mlp_in", r"intermediate\.dense|gate_proj|up_proj|mlp\.c_fc|fc1|dense_h_to_4h|gate_up_proj"),
    ("mlp_out", r"output\.dense|down_proj|mlp\.c_proj|fc2|dense_4h_to_h"),
    ("lm_head", r"lm_head|predictions\.decoder|embed_out"),
    ("classifier", r"pooler\.dense|classifier|classifier\.\w+|score|qa_outputs|predictions\.transform\.dense"),
))


def role_of(module: str) -> str:
    return next((role for role, pattern in ROLE_PATTERNS if pattern.search(module)), "other")


def annotate_roles(gm: GraphModule, ctx: CompileContext) -> PassResult:
    nodes = linear_nodes(gm)
    for index, node in enumerate(nodes):
        module = module_name_of(node) or f"linear_{index}"
        node.meta[META_MODULE] = module
        node.meta[META_ROLE] = role_of(module)
    return PassResult(gm, False, Counter({"annotate_roles": len(nodes)}))
