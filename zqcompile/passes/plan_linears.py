"""plan_linears: resolve the recipe into a LinearPlan for every linear layer.

Matches each role-annotated ``aten.linear``; emits ``meta['zq_plan']`` and fills ``ctx.plans`` (which
``inspect`` prints). A linear whose weight is not a stored parameter (computed at run time) is planned as
floating point with that reason. Refuses the whole recipe with a ZQError when a module glob matches no
linear layer or a group size does not divide a layer's dims.
"""

from __future__ import annotations

from collections import Counter

from torch.fx import GraphModule

from zqcompile.passes.infra import (
    META_MODULE, META_PLAN, META_ROLE, CompileContext, PassResult, get_attr_tensor, is_stored, linear_nodes,
)
from zqcompile.recipe import LinearPlan, LinearSite

COMPUTED_WEIGHT = LinearPlan(None, None, None, None, "weight computed at run time (not a parameter)")


def plan_linears(gm: GraphModule, ctx: CompileContext) -> PassResult:
    sites: dict[str, LinearSite] = {}
    for node in linear_nodes(gm):
        if is_stored(node.args[1]):
            n, k = get_attr_tensor(gm, node.args[1]).shape
            sites[node.meta[META_MODULE]] = LinearSite(node.meta[META_MODULE], node.meta[META_ROLE], n, k)
    plans = ctx.recipe.resolve(sites.values())
    for node in linear_nodes(gm):
        plan = plans.get(node.meta[META_MODULE], COMPUTED_WEIGHT) if is_stored(node.args[1]) else COMPUTED_WEIGHT
        node.meta[META_PLAN] = plan
        ctx.plans[node.meta[META_MODULE]] = plan
    return PassResult(gm, False, Counter({"plan_linears.quantized": sum(p.quantized for p in ctx.plans.values())}))
