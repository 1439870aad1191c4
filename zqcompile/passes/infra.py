"""The pass contract and the pass manager (after torch.fx.passes.infra).

A pass is ``fn(gm, ctx) -> PassResult``. The manager runs passes in order, lints and recompiles the graph
after each pass that reports it modified it, merges hit counters into the context, and re-raises a failure
as "an error occurred when running the 'X' pass after the following passes: [...]" so the error says where
it happened.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeGuard

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_map

from zqcompile.errors import ZQError
from zqcompile.recipe import LinearPlan, Recipe

# node.meta keys written by the passes
META_MODULE = "zq_module"  # qualified module name of a linear
META_ROLE = "zq_role"  # role of a linear (recipe.ROLES)
META_PLAN = "zq_plan"  # LinearPlan of a linear
META_FUSED_INTO = "zq_fused_into"  # fusion rule that produced an activation-quant node
META_WEIGHT_BYTES = "zq_weight_bytes_before"  # bytes of a quantized linear's weight as captured
META_ROUNDING = "zq_rounding"  # how a linear's weight was rounded and its error before/after (inspect)

LINEAR = torch.ops.aten.linear.default


@dataclass
class PassResult:
    """What a pass did: ``modified`` says whether the graph changed (the manager lints and recompiles only
    then); ``counters`` counts its rewrites by name (``fuse.layernorm``), and keeps only positive counts so
    a pass can count into a ``Counter`` without recording the rewrites it did not make."""

    graph_module: GraphModule
    modified: bool
    counters: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.counters = +Counter(self.counters)


@dataclass
class CompileContext:
    """State shared by the passes of one compilation."""

    recipe: Recipe
    plans: dict[str, LinearPlan] = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)
    # why an activation-quant node was not fused, keyed by the node's name
    unfused_reasons: dict[str, str] = field(default_factory=dict)
    passes_run: list[str] = field(default_factory=list)
    # graph inputs to run for activation statistics (only when the recipe smooths), and what they gave
    calibration_inputs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    calibration_outputs: list = field(default_factory=list)  # the FP graph's outputs on them
    activation_absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    # why an activation was not smoothed, keyed by the node's name
    smooth_skipped: dict[str, str] = field(default_factory=dict)
    # why a part of the graph was not rotated (the residual stream, or a projection by node name)
    rotate_skipped: dict[str, str] = field(default_factory=dict)
    # why a target pass (pipeline.TARGET_PHASES) left a node as it was, "<pass>: <reason>" keyed by the node's name
    target_skipped: dict[str, str] = field(default_factory=dict)
    # the FP model the graph was captured from (LKD distils its blocks; None when compiling a loaded graph)
    source_model: torch.nn.Module | None = None
    lkd_result: Any = None  # zqcompile.lkd.LKDResult of the distill phase
    # integers and scales chosen by GPTQ for a stored weight (by its get_attr target), which quantize_weights
    # stores instead of rounding to nearest; the graph holds their dequantized values meanwhile
    rounded_weights: dict[str, Any] = field(default_factory=dict)  # target -> zqcompile.rounding.RoundedWeight


PassFn = Callable[[GraphModule, CompileContext], PassResult]


def run_passes(gm: GraphModule, ctx: CompileContext, passes: Iterable[PassFn]) -> GraphModule:
    """Run ``passes`` in order; lint + recompile after each that modified the graph; name the failing pass
    and what ran before it."""
    for fn in passes:
        name = fn.__name__
        try:
            result = fn(gm, ctx)
            gm = result.graph_module
            if result.modified:
                gm.graph.lint()
                gm.recompile()
        except ZQError:
            raise
        except Exception as err:
            raise ZQError(f"an error occurred when running the {name!r} pass after the following passes: "
                          f"{ctx.passes_run}: {type(err).__name__}: {err}") from err
        ctx.counters.update(result.counters)
        ctx.passes_run.append(name)
    return gm


# ---- small graph helpers shared by the passes -------------------------------------------------------

def attr_owner(gm: GraphModule, target: str) -> tuple[torch.nn.Module, str]:
    """(the submodule that holds dotted ``target``, the attribute name within it)."""
    owner, _, leaf = target.rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), leaf


def attr_tensor(gm: GraphModule, target: str) -> torch.Tensor:
    return getattr(*attr_owner(gm, target))


def is_stored(arg: object) -> TypeGuard[Node]:
    """Whether a node argument is a stored constant of the graph (a ``get_attr`` of a parameter or buffer),
    which a pass may rewrite ahead of time, as opposed to a value computed at run time."""
    return isinstance(arg, Node) and arg.op == "get_attr"


def get_attr_tensor(gm: GraphModule, node: Node) -> torch.Tensor:
    return attr_tensor(gm, node.target)


def set_attr_tensor(gm: GraphModule, target: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` as a buffer at dotted ``target`` (creating nothing but the leaf).

    Stored tensors are made contiguous, as ``load`` restores them: the CPU GEMMs round differently for another
    memory layout, and a loaded model must compute bit-identically to the compiled one."""
    module, leaf = attr_owner(gm, target)
    module.register_buffer(leaf, tensor.contiguous())


def replace_attr_tensor(gm: GraphModule, target: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` (contiguous, as in set_attr_tensor) at the existing dotted ``target``; a parameter stays a
    (frozen) parameter."""
    module, leaf = attr_owner(gm, target)
    tensor = tensor.contiguous()
    if isinstance(getattr(module, leaf), torch.nn.Parameter):
        tensor = torch.nn.Parameter(tensor, requires_grad=False)
    setattr(module, leaf, tensor)


def replace_stored(gm: GraphModule, reader: Node, old: Node, tensor: torch.Tensor, suffix: str) -> Node:
    """Give ``reader`` a new buffer ``<old target>_<suffix>`` in place of the get_attr ``old`` (dropped once nothing
    reads it; an original that something else reads, a tied embedding, stays); returns the new get_attr."""
    target = f"{old.target}_{suffix}"
    set_attr_tensor(gm, target, tensor.detach())  # a constant of the graph, like the weights it replaces
    with gm.graph.inserting_before(reader):
        new = gm.graph.get_attr(target)
    new.meta = dict(old.meta)
    reader.replace_input_with(old, new)
    drop_if_unused(gm, old)
    return new


def drop_if_unused(gm: GraphModule, get_attr: Node) -> None:
    """Erase a get_attr node nobody reads, and its tensor once no other get_attr names it (frees FP weights)."""
    if get_attr.users:
        return
    gm.graph.erase_node(get_attr)
    if not any(is_stored(n) and n.target == get_attr.target for n in gm.graph.nodes):
        delete_attr(gm, get_attr.target)


def delete_attr(gm: GraphModule, target: str) -> None:
    """Remove the tensor at dotted ``target`` from the GraphModule."""
    delattr(*attr_owner(gm, target))


def linear_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is LINEAR]


def is_op(node: object, *targets: object) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def val_dtype(node: Node) -> torch.dtype:
    """dtype recorded by export (meta['val']) or by shape propagation (meta['tensor_meta'])."""
    if "val" in node.meta:
        return node.meta["val"].dtype
    return node.meta["tensor_meta"].dtype


def call_with_value(gm: GraphModule, target: Any, *args: Any, **kwargs: Any) -> Node:
    """A new call_function node with its value recorded as export records it (``meta["val"]``, computed on the
    fake values of its inputs), so the passes after it can read its shape and dtype."""
    node = gm.graph.call_function(target, args, kwargs)
    fake = tree_map(lambda a: a.meta["val"] if isinstance(a, Node) else a, (args, kwargs))
    node.meta["val"] = target(*fake[0], **fake[1])
    return node


def getitem(graph: torch.fx.Graph, node: Node, index: int) -> Node:
    return graph.call_function(operator.getitem, (node, index))


def single_user(node: Node) -> bool:
    return len(node.users) == 1


_INDEX_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def embedding_rows(gm: GraphModule) -> dict[int, int]:
    """Rows of the embedding table that each graph input indexes directly (input_ids, token_type_ids)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    rows = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.embedding.default:
            weight, indices = node.args[:2]
            while is_op(indices, *_INDEX_VIEWS):  # GPT-2 / OPT index with input_ids.view(-1, seq)
                indices = indices.args[0]
            if indices in placeholders and is_stored(weight):
                rows[placeholders.index(indices)] = get_attr_tensor(gm, weight).shape[0]
    return rows
