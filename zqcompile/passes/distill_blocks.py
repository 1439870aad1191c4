"""distill_blocks: ZeroQuant's layer-by-layer knowledge distillation (LKD) as a phase of the pipeline.

Runs only when the recipe has an ``lkd`` config and the context holds the source model (``ctx.source_model``);
otherwise it changes nothing. Distils the source model's blocks with zqcompile.lkd, simulating the plans the
``plan`` phase resolved (``ctx.plans``), then writes each distilled tensor into the graph as a new tensor (the
user's model is untouched): a linear's weight and bias are found through the linear node whose ``zq_module``
is that module (a GPT-2 Conv1D weight, stored ``[in, out]`` in the module and ``[out, in]`` in the canonical
graph, is transposed), any other parameter (a norm's, with ``train_norms``) at its captured attribute.
Emits no nodes; ``ctx.lkd_result`` gets the per-block log. Refuses with a ZQError when a distilled tensor has
no place or another shape in the graph.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from zqcompile.capture import WRAPPER_PREFIX
from zqcompile.errors import ZQError
from zqcompile.lkd import distill, is_conv1d
from zqcompile.passes.infra import (
    META_MODULE, CompileContext, PassResult, attr_tensor, is_stored, linear_nodes, replace_attr_tensor,
)

LINEAR_PARAMS = {"weight": 1, "bias": 2}  # aten.linear(x, weight, bias)


def _graph_target(linears: dict[str, Node], name: str) -> str:
    """The graph attribute that holds the model parameter ``name``."""
    module, _, param = name.rpartition(".")
    linear = linears.get(module)
    if linear is not None and param in LINEAR_PARAMS:
        stored = linear.args[LINEAR_PARAMS[param]] if len(linear.args) > LINEAR_PARAMS[param] else None
        if is_stored(stored):
            return stored.target
    return WRAPPER_PREFIX + name


def distill_blocks(gm: GraphModule, ctx: CompileContext) -> PassResult:
    config = ctx.recipe.lkd
    if config is None or ctx.source_model is None:
        return PassResult(gm, False)
    result = distill(ctx.source_model, ctx.plans, config, recipe_name=ctx.recipe.name)
    linears = {node.meta[META_MODULE]: node for node in linear_nodes(gm)}
    for name, tensor in result.weights.items():
        target = _graph_target(linears, name)
        try:
            old = attr_tensor(gm, target)
        except AttributeError:
            raise ZQError(f"LKD distilled {name!r} but the captured graph has no attribute {target!r}; was the "
                          f"model changed between capture and distillation?") from None
        module, _, param = name.rpartition(".")
        if param == "weight" and module in linears and is_conv1d(ctx.source_model.get_submodule(module)):
            tensor = tensor.t().contiguous()  # the graph holds a Conv1D weight as a canonical linear weight
        if old.shape != tensor.shape:
            raise ZQError(f"LKD tensor for {name!r} has shape {tuple(tensor.shape)}, the graph's has "
                          f"{tuple(old.shape)}")
        replace_attr_tensor(gm, target, tensor)
    ctx.lkd_result = result
    return PassResult(gm, bool(result.weights), {"distill_blocks.tensors": len(result.weights)})
