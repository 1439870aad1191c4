"""Looking at a compiled model: the per-layer table, the graph as networkx, per-layer error vs FP."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch.fx import GraphModule, Interpreter, Node

from zqcompile.auto_recipe import describe
from zqcompile.ops import ACTIVATION_QUANT_OPS, QUANTIZED_LINEAR_OPS, WEIGHT_ARGS
from zqcompile.passes.infra import (
    LINEAR, META_FUSED_INTO, META_MODULE, META_PLAN, META_ROLE, META_ROUNDING, META_WEIGHT_BYTES, get_attr_tensor,
    is_stored,
)

if TYPE_CHECKING:
    from zqcompile.model import QuantizedModel


@dataclass(frozen=True)
class LinearRow:
    module: str
    role: str
    kind: str  # W8A8 / W4A8 / W8A16 / W4A16 / FP
    weight: str  # bits and groups
    activation: str
    fused_into: str
    bytes_before: int
    bytes_after: int
    plan_reason: str
    rounding: str = "-"  # how the weight's integers were chosen, with the error before/after (GPTQ, AWQ, LoRC)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class StoredTensors:
    """The bytes a module's tensors occupy, each storage byte counted once, and the names that share one tensor."""

    bytes: int
    shared: tuple[tuple[str, ...], ...]  # names of one tensor (tied embedding / LM head), each group sorted


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def stored_tensors(module: torch.nn.Module, *also: torch.nn.Module) -> StoredTensors:
    """Parameters and buffers of ``module`` (and of ``also``: graphs that share its tensors) by storage: a tensor
    under several names (tied weights) and views into one storage (the cuda target's concatenated q/k/v weights)
    count the bytes they cover once. ``shared`` names the tensors ``module`` itself holds under several names."""
    spans: dict[tuple[torch.device, int], list[tuple[int, int]]] = {}
    names: dict[tuple, list[str]] = {}
    own = len(_named_tensors(module))
    tensors = [*_named_tensors(module), *(named for other in also for named in _named_tensors(other))]
    for index, (name, t) in enumerate(tensors):
        if t.numel() == 0:
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        start = t.storage_offset() * t.element_size()
        extent = (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()
        spans.setdefault(storage, []).append((start, start + extent))
        if index < own:
            names.setdefault((*storage, start, extent, t.dtype, tuple(t.shape)), []).append(name)
    total = 0
    for intervals in spans.values():
        end = -1
        for lo, hi in sorted(intervals):  # the union of the byte ranges of one storage
            total += max(0, hi - max(lo, end))
            end = max(end, hi)
    shared = tuple(sorted(tuple(sorted(group)) for group in names.values() if len(group) > 1))
    return StoredTensors(total, shared)


def _activation_source(gm: GraphModule, node: Node, unfused: Mapping[str, str]) -> tuple[str, str]:
    """(activation description, fused-into description) of a lowered linear."""
    if node.target is torch.ops.zq.outlier_int8_linear.default:
        return "INT8 per-token + FP16 outlier columns", "-"
    if node.target not in (torch.ops.zq.int8_linear.default, torch.ops.zq.int4_linear.default):
        return "FP (weight-only)" if node.target in QUANTIZED_LINEAR_OPS else "FP", "-"
    if node.args[0].op == "get_attr":  # a stored tensor's quantization, computed ahead of time
        return "INT8 per-token", f"quantized ahead of time ({node.args[0].meta.get(META_FUSED_INTO, 'constant')})"
    source = node.args[0].args[0]  # getitem(quant-producing op, i)
    if source.target in ACTIVATION_QUANT_OPS and META_FUSED_INTO in source.meta:
        return "INT8 per-token", f"{source.target.__name__.split('.')[0]} ({source.meta[META_FUSED_INTO]})"
    reason = unfused.get(source.name, "")
    return "INT8 per-token", f"standalone quantize_per_token{': ' + reason if reason else ''}"


def linear_rows(gm: GraphModule, unfused: Mapping[str, str] | None = None) -> list[LinearRow]:
    """One row per linear layer of the compiled graph (quantized or kept FP)."""
    rows = []
    for node in gm.graph.nodes:
        if META_MODULE not in node.meta or node.op != "call_function":
            continue
        plan = node.meta[META_PLAN]
        if node.target is LINEAR:
            weight = node.args[1]
            size = _tensor_bytes(get_attr_tensor(gm, weight)) if is_stored(weight) else 0
            rows.append(LinearRow(node.meta[META_MODULE], node.meta[META_ROLE], "FP", "FP", "FP", "-", size, size,
                                  plan.reason))
            continue
        positions = WEIGHT_ARGS[node.target]
        q, scale = get_attr_tensor(gm, node.args[positions.weight]), get_attr_tensor(gm, node.args[positions.scale])
        w_min = positions.min_arg(node.args)
        n = q.shape[0]
        groups = "per-channel" if scale.shape[0] == n else f"{n // scale.shape[0]} rows/group"
        if w_min is not None:  # asymmetric INT4: a min per group beside the scale
            groups = f"asym, {groups}"
        if scale.shape[1] > 1:
            groups += f", {q.shape[1] * (2 if q.dtype == torch.uint8 else 1) // scale.shape[1]} cols/group"
        activation, fused = _activation_source(gm, node, unfused or {})
        before = node.meta[META_WEIGHT_BYTES]
        extra = sum(_tensor_bytes(get_attr_tensor(gm, f)) for u in node.users  # LoRC's factors
                    if u.target is torch.ops.zq.low_rank_correction.default for f in u.args[2:])
        if w_min is not None:
            extra += _tensor_bytes(get_attr_tensor(gm, w_min))
        if node.target is torch.ops.zq.outlier_int8_linear.default:  # LLM.int8()'s FP16 columns
            extra += sum(_tensor_bytes(get_attr_tensor(gm, f)) for f in node.args[3:5])
        rows.append(LinearRow(node.meta[META_MODULE], node.meta[META_ROLE], plan.kind,
                              f"INT{plan.weight_bits} {groups}", activation, fused, before,
                              _tensor_bytes(q) + _tensor_bytes(scale) + extra, plan.reason,
                              node.meta.get(META_ROUNDING, "rtn")))
    return rows


def _table(rows: list[LinearRow]) -> str:
    header = ("module", "role", "kind", "weight", "activation", "fused into", "KB before", "KB after", "why",
              "rounding")
    body = [(r.module, r.role, r.kind, r.weight, r.activation, r.fused_into, f"{r.bytes_before / 1024:.1f}",
             f"{r.bytes_after / 1024:.1f}", r.plan_reason, r.rounding) for r in rows]
    widths = [min(60, max(len(str(x)) for x in col)) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line("-" * w for w in widths), *map(line, body)])


def inspect(qmodel: "QuantizedModel", code: bool = True) -> str:
    """The per-linear table, the pass counters, the weight memory and (optionally) the FX code."""
    ctx = qmodel.context
    counters = ", ".join(f"{k}={v}" for k, v in sorted(ctx.counters.items()))
    parts = [
        f"zqcompile: {qmodel.model_class}, recipe {qmodel.recipe.name}, backend {qmodel.backend}, "
        f"{qmodel.dtype} on {qmodel.device}",
        _table(linear_rows(qmodel.graph_module, ctx.unfused_reasons)),
        f"pass counters: {counters}",
        f"weights: {qmodel.weight_memory()}",
    ]
    if ctx.smooth_skipped:  # only when the recipe smooths: which activations kept their outliers, and why
        parts.append("not smoothed:\n" + "\n".join(f"  {name}: {why}" for name, why in ctx.smooth_skipped.items()))
    if qmodel.recipe.auto:  # recipe="auto": the budget, what was measured, every linear's errors
        parts.append(describe(qmodel.recipe.auto))
    if ctx.rotate_skipped:  # only when the recipe rotates: what kept its outlier channels, and why
        parts.append("not rotated:\n" + "\n".join(f"  {name}: {why}" for name, why in ctx.rotate_skipped.items()))
    if ctx.target_skipped:  # what the target's rewrites (cuda) recognised but left as it was, and why
        parts.append("not rewritten for the target:\n" + "\n".join(f"  {name}: {why}" for name, why in
                                                                    ctx.target_skipped.items()))
    if code:
        parts += ["graph:", qmodel.graph_module.code]
    return "\n\n".join(parts)


def _node_dtype_shape(node: Node) -> tuple[str, str]:
    # ShapeProp's concrete shapes (of the example inputs) first; export's symbolic ones only where it found none
    meta = node.meta.get("tensor_meta", node.meta.get("val"))
    if isinstance(meta, torch.Tensor) or hasattr(meta, "dtype"):
        return str(meta.dtype), str(tuple(meta.shape))
    return "", ""


def to_networkx(qmodel: "QuantizedModel", dot_path: str | None = None):
    """The rewritten graph as a ``networkx.DiGraph``; nodes carry op, role, dtype and shape.

    Shapes and dtypes are those of the model's example inputs (propagated through the final graph).
    With ``dot_path`` the graph is also written as Graphviz DOT.
    """
    import networkx as nx
    from torch.fx.passes.shape_prop import ShapeProp

    gm = qmodel.graph_module
    ShapeProp(gm).propagate(*qmodel.example_inputs)
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        dtype, shape = _node_dtype_shape(node)
        op = str(node.target) if node.op in ("call_function", "get_attr") else node.op
        graph.add_node(node.name, op=op, kind=node.op, role=node.meta.get(META_ROLE, ""),
                       module=node.meta.get(META_MODULE, ""), dtype=dtype, shape=shape)
        for arg in node.all_input_nodes:
            graph.add_edge(arg.name, node.name)
    if dot_path is not None:
        with open(dot_path, "w") as f:
            f.write("digraph zqcompile {\n  node [shape=box, fontsize=10];\n")
            for name, data in graph.nodes(data=True):
                label = f"{name}\\n{data['op']}\\n{data['dtype']} {data['shape']}".replace('"', "'")
                f.write(f'  "{name}" [label="{label}"];\n')
            for a, b in graph.edges:
                f.write(f'  "{a}" -> "{b}";\n')
            f.write("}\n")
    return graph


@dataclass(frozen=True)
class LayerError:
    module: str
    role: str
    kind: str
    sqnr_db: float
    cosine: float


class _LinearOutputs(Interpreter):
    """Runs the compiled graph and keeps the output of every node that carries a module name."""

    def __init__(self, gm: GraphModule):
        super().__init__(gm)
        self.outputs: dict[str, torch.Tensor] = {}

    def run_node(self, node: Node) -> Any:
        result = super().run_node(node)
        if META_MODULE in node.meta and node.op == "call_function":
            self.outputs[node.meta[META_MODULE]] = result
        return result


def _sqnr_and_cosine(reference: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    ref, out = reference.double().flatten(), test.double().flatten()
    noise = (ref - out).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal else -math.inf
    cosine = torch.nn.functional.cosine_similarity(ref, out, dim=0).item()
    return sqnr, cosine


def report_error(model: torch.nn.Module, qmodel: "QuantizedModel", inputs: Mapping[str, Any] | tuple) -> list[LayerError]:
    """Per-linear output error of ``qmodel`` against ``model`` on ``inputs``: SQNR (dB) and cosine.

    Each layer sees its own model's input (the errors accumulate along the depth, as in deployment).
    """
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else (tuple(inputs), {})
    reference: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    rows = linear_rows(qmodel.graph_module)
    hooks = [modules[r.module].register_forward_hook(
        lambda _m, _i, out, name=r.module: reference.__setitem__(name, out)) for r in rows if r.module in modules]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    interpreter = _LinearOutputs(qmodel.graph_module)
    with torch.no_grad():
        interpreter.run(*qmodel.graph_inputs(*args, **kwargs))
    report = []
    for row in rows:
        if row.module in reference and row.module in interpreter.outputs:
            sqnr, cosine = _sqnr_and_cosine(reference[row.module], interpreter.outputs[row.module])
            report.append(LayerError(row.module, row.role, row.kind, sqnr, cosine))
    return report


def format_error_report(report: list[LayerError]) -> str:
    lines = [f"{'module':60s} {'role':10s} {'kind':6s} {'SQNR dB':>8s} {'cosine':>8s}"]
    lines += [f"{r.module[:60]:60s} {r.role:10s} {r.kind:6s} {r.sqnr_db:8.2f} {r.cosine:8.5f}" for r in report]
    return "\n".join(lines)
