"""fuse_sibling_linears: one integer GEMM for the linears that read the same quantized activation.

Matches two or more ``zq.int8_linear`` (or two or more ``zq.int4_linear``) nodes with the same activation
(``x_q``, ``x_scale``) and output dtype, whose weights share K, the scale layout (rows per scale group, input
groups, dtypes) and bias presence, and whose outputs are only reshaped (``view`` / ``reshape``): attention's
query / key / value projections. Emits one GEMM over the row-wise concatenated weights, scales and biases and
``split_with_sizes`` of its output. Each slice equals the original output exactly (a column's epilogue reads
only its own scale and bias), and one wide GEMM fills the GPU where three narrow ones leave SMs idle and pay
three launches. The original tensors become views of the concatenation (nothing is stored twice, also in the
compiled graph this executed copy shares its tensors with); the fused node records where its tensors came from
(``meta[META_FUSED_FROM]``).

An asymmetric INT4 GEMM's mins are concatenated like its scales. Refuses (leaves out of a group) a GEMM whose
layout (asymmetry included) differs from its siblings', whose weight/scale/bias is not
a graph constant, or whose output feeds anything but a reshape: a slice of the fused output is not contiguous,
so an elementwise kernel after it would copy it first.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
from torch.fx import GraphModule, Node

from zqcompile.ops import WEIGHT_ARGS
from zqcompile.passes.infra import CompileContext, PassResult, get_attr_tensor, is_op, is_stored, set_attr_tensor

zq = torch.ops.zq
_GEMMS = (zq.int8_linear.default, zq.int4_linear.default)
_RESHAPES = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)
META_FUSED_FROM = "zq_fused_from"
"""On a fused GEMM: {"weight" | "scale" | "bias" | "w_min": [(original attribute, first row, end row), ...]}."""


def _fused_args(node: Node) -> dict[str, int]:
    """Where each tensor the fusion concatenates is in the GEMM's arguments: weight, scale, bias and, for an
    asymmetric INT4 weight, its mins."""
    positions = WEIGHT_ARGS[node.target]
    found = {"weight": positions.weight, "scale": positions.scale, "bias": positions.bias}
    if positions.min_arg(node.args) is not None:
        found["w_min"] = positions.w_min
    return found


def _layout(gm: GraphModule, node: Node) -> tuple | None:
    """What must agree between siblings: K, rows per scale group, input groups, dtypes, asymmetry; None if not
    fusible."""
    positions = _fused_args(node)
    if not all(is_stored(node.args[p]) for p in positions.values() if node.args[p] is not None):
        return None
    if any(not is_op(user, *_RESHAPES) for user in node.users):
        return None
    w, w_s = get_attr_tensor(gm, node.args[positions["weight"]]), get_attr_tensor(gm, node.args[positions["scale"]])
    bias = node.args[positions["bias"]]
    bias_dtype = None if bias is None else get_attr_tensor(gm, bias).dtype
    return w.shape[1], w.dtype, w.shape[0] // w_s.shape[0], w_s.shape[1], w_s.dtype, bias_dtype, "w_min" in positions


def _concat(gm: GraphModule, parts: list[Node]) -> tuple[Node, list[tuple[str, int, int]]]:
    """A get_attr of the row-wise concatenation of ``parts``' tensors, and each part's row range in it.

    Each part's tensor object is then re-pointed (``Tensor.set_``) at its rows of the concatenation: any other
    graph holding it (the compiled graph this one was copied from) reads the same values from the same memory,
    so nothing is stored twice.
    """
    tensors = [get_attr_tensor(gm, p) for p in parts]
    target = f"{parts[0].target}_siblings"
    fused = torch.cat(tensors)
    set_attr_tensor(gm, target, fused)
    rows, start = [], 0
    for part, tensor in zip(parts, tensors):
        end = start + tensor.shape[0]
        rows_view = fused[start:end]
        with torch.no_grad():
            tensor.set_(rows_view.untyped_storage(), rows_view.storage_offset(), rows_view.size(), rows_view.stride())
        rows.append((part.target, start, end))
        start = end
    return gm.graph.get_attr(target), rows


def _fuse(gm: GraphModule, siblings: list[Node]) -> None:
    first = siblings[0]
    args, fused_from = list(first.args), {}
    with gm.graph.inserting_before(first):
        for kind, position in _fused_args(first).items():
            if first.args[position] is not None:  # the bias may be absent (for all siblings alike)
                args[position], fused_from[kind] = _concat(gm, [n.args[position] for n in siblings])
        fused = gm.graph.call_function(first.target, tuple(args))
        fused.meta[META_FUSED_FROM] = fused_from
        # output columns = weight rows (INT4 packs along K)
        sizes = [end - start for _, start, end in fused_from["weight"]]
        split = gm.graph.call_function(torch.ops.aten.split_with_sizes.default, (fused, sizes, -1))
        for index, node in enumerate(siblings):
            part = gm.graph.call_function(operator.getitem, (split, index))
            part.meta = dict(node.meta)
            node.replace_all_uses_with(part)
    for node in siblings:
        gm.graph.erase_node(node)


def fuse_sibling_linears(gm: GraphModule, ctx: CompileContext | None) -> PassResult:
    groups: dict[tuple, list[Node]] = {}
    for node in gm.graph.nodes:
        if is_op(node, *_GEMMS) and (layout := _layout(gm, node)) is not None:
            x_q, x_scale, _, _, _, out_dtype = node.args[:6]
            groups.setdefault((node.target, x_q, x_scale, out_dtype, layout), []).append(node)
    counts: Counter = Counter()
    for siblings in groups.values():
        if len(siblings) < 2:
            continue
        _fuse(gm, siblings)
        counts["fuse_sibling_linears.fused_gemms"] += 1
        counts["fuse_sibling_linears.linears"] += len(siblings)
    dead_removed = gm.graph.eliminate_dead_code()
    return PassResult(gm, counts["fuse_sibling_linears.fused_gemms"] > 0 or dead_removed, counts)
