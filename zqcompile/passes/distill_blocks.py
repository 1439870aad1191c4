"""distill_blocks: ZeroQuant's layer-by-layer knowledge distillation (LKD) as a phase of the pipeline.

Runs only when the recipe has an ``lkd`` config and the context holds the source model (``ctx.source_model``);
otherwise it changes nothing. Two ways, by recipe:

- **Plain recipes** (no rotation, no smoothing): distils the source model's blocks with zqcompile.lkd,
  simulating the plans the ``plan`` phase resolved (``ctx.plans``), then writes each distilled tensor into the
  graph as a new tensor (the user's model is untouched): a linear's weight and bias are found through the linear
  node whose ``zq_module`` is that module (a GPT-2 Conv1D weight, stored ``[in, out]`` in the module and
  ``[out, in]`` in the canonical graph, is transposed), any other parameter (a norm's, with ``train_norms``) at
  its captured attribute.
- **After rotation or smoothing** (``rotate`` / ``smooth_alpha``; this phase runs after theirs): the weights to
  distil exist only in the graph (rotated, norm weights moved into the linears, smoothing factors folded), so
  the graph itself is distilled, block by block. A block is the run of nodes between the first and the last
  node whose ``nn_module_stack`` names ``<blocks>.<k>`` (the source model's block list, lkd.find_blocks), so
  the online Hadamards and smoothing multiplies inside it belong to it. The teacher is that segment in floating
  point (rotation and smoothing are exact, so it computes the FP block, in the rotated basis); the student the
  same segment with every quantized linear's weight fake-quantized to its plan and the inputs of W*A8 linears
  token-wise INT8 (straight-through estimators, as lkd.make_student). Both read the student chain's values
  (``inputs_from="student"``) or the FP chain's (``"teacher"``); Adam minimises the MSE of the segment's
  outputs (the values later nodes read: the residual stream) on ``ctx.calibration_inputs`` (LKD's data,
  which zqcompile.compile makes), and the trained weights and biases replace the graph's. ``train_norms``
  (rotation has moved the norm weights into the linears) and ``logits_kl`` (not done on the graph) are refused.

Emits no nodes; ``ctx.lkd_result`` gets the per-block log and the distilled tensors (graph way: by graph
attribute; a ``ctx.lkd_result`` given in advance, the forward graph's for the generation graph, is applied by
those names instead of distilling again). Refuses with a ZQError when a distilled tensor has
no place or another shape in the graph, or (graph way) without calibration inputs or block nodes.
"""

from __future__ import annotations

import re
import time
from typing import Any, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node

from zqcompile.capture import WRAPPER_PREFIX
from zqcompile.errors import ZQError
from zqcompile.lkd import (
    BlockReport, FakeQuantWeight, LKDResult, _PeakMemory, distill, fake_quant_rows, find_blocks, is_conv1d,
    needs_distillation, optimize,
)
from zqcompile.passes.gptq_round_weights import shared_weight
from zqcompile.passes.infra import (
    LINEAR, META_MODULE, META_PLAN, CompileContext, PassResult, attr_tensor, get_attr_tensor, is_op, is_stored,
    linear_nodes, replace_attr_tensor,
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
    if ctx.recipe.rotate or ctx.recipe.smooth_alpha is not None:
        if ctx.lkd_result is None:
            ctx.lkd_result = distill_graph(gm, ctx)
        else:  # another graph of the same model was distilled (the forward graph, for the generation graph)
            _put(gm, ctx.lkd_result.weights, "the distilled graph")
        return PassResult(gm, bool(ctx.lkd_result.weights), {"distill_blocks.tensors": len(ctx.lkd_result.weights)})
    result = distill(ctx.source_model, ctx.plans, config, recipe_name=ctx.recipe.name)
    linears = {node.meta[META_MODULE]: node for node in linear_nodes(gm)}
    targets = {}
    for name, tensor in result.weights.items():
        module, _, param = name.rpartition(".")
        if param == "weight" and module in linears and is_conv1d(ctx.source_model.get_submodule(module)):
            tensor = tensor.t().contiguous()  # the graph holds a Conv1D weight as a canonical linear weight
        targets[_graph_target(linears, name)] = (name, tensor)
    _put(gm, targets, "the model")
    ctx.lkd_result = result
    return PassResult(gm, bool(result.weights), {"distill_blocks.tensors": len(result.weights)})


def _put(gm: GraphModule, tensors: dict[str, Any], source: str) -> None:
    """Replace the graph attributes named by ``tensors`` (target -> tensor, or -> (parameter name, tensor))."""
    for target, value in tensors.items():
        name, tensor = value if isinstance(value, tuple) else (target, value)
        try:
            old = attr_tensor(gm, target)
        except AttributeError:
            raise ZQError(f"LKD distilled {name!r} of {source} but the graph has no attribute {target!r}; was the "
                          f"model changed between capture and distillation?") from None
        if old.shape != tensor.shape:
            raise ZQError(f"LKD tensor for {name!r} has shape {tuple(tensor.shape)}, the graph's has "
                          f"{tuple(old.shape)}")
        replace_attr_tensor(gm, target, tensor)


# ---- the graph way: after rotation / smoothing ----------------------------------------------------------------

def block_segments(gm: GraphModule, blocks_name: str) -> list[tuple[int, int]]:
    """Per block k, the (first, last) positions in ``gm.graph.nodes`` of the nodes its modules ran."""
    pattern = re.compile(rf"(?:^|\.){re.escape(blocks_name)}\.(\d+)(?:\.|$)")
    spans: dict[int, list[int]] = {}
    for position, node in enumerate(gm.graph.nodes):
        stack = node.meta.get("nn_module_stack") or {}
        for path, _ in stack.values():
            found = pattern.search(path)
            if found:
                spans.setdefault(int(found.group(1)), []).append(position)
                break
    segments = [(min(p), max(p)) for _, p in sorted(spans.items())]
    if not segments or any(a[1] >= b[0] for a, b in zip(segments, segments[1:])):
        raise ZQError(f"LKD after rotation/smoothing found no separate runs of nodes for the blocks of "
                      f"{blocks_name!r} in the graph (nn_module_stack metadata); compile without lkd, or without "
                      f"rotate/smooth_alpha")
    return segments


class _Trained:
    """A quantized linear of the student: its weight (and bias) as trainable copies, fake-quantized on use."""

    def __init__(self, gm: GraphModule, linear: Node, train: bool):
        self.linear = linear
        self.plan = linear.meta[META_PLAN]
        self.weight = nn.Parameter(get_attr_tensor(gm, linear.args[1]).detach().float().clone(), requires_grad=train)
        bias = linear.args[2] if len(linear.args) > 2 else None
        self.bias = nn.Parameter(get_attr_tensor(gm, bias).detach().float().clone(), requires_grad=train) \
            if is_stored(bias) and len(bias.users) == 1 else None
        self.quantize = FakeQuantWeight(self.plan, stored_transposed=False)

    def params(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None and p.requires_grad]


class _Student(Interpreter):
    """Runs graph nodes as the compiled graph will: quantized linears with fake-quantized weights / activations."""

    def __init__(self, gm: GraphModule, linears: dict[Node, _Trained]):
        super().__init__(gm)
        self.linears = linears

    def run_node(self, node: Node) -> Any:
        trained = self.linears.get(node)
        if trained is None:
            return super().run_node(node)
        args, _ = self.fetch_args_kwargs_from_env(node)
        x = fake_quant_rows(args[0]) if trained.plan.act_bits == 8 else args[0]
        bias = trained.bias if trained.bias is not None else (args[2] if len(args) > 2 else None)
        return LINEAR(x, trained.quantize(trained.weight).to(x.dtype), bias)


def _run(interpreter: Interpreter, nodes: Sequence[Node], env: dict[Node, Any], outputs: Sequence[Node],
         last_use: dict[Node, int], position: dict[Node, int]) -> list[torch.Tensor]:
    """Evaluate ``nodes`` over a copy of ``env`` (values freed after their last reader); the ``outputs``' values."""
    interpreter.env = dict(env)
    keep = set(outputs)
    for node in nodes:
        interpreter.env[node] = interpreter.run_node(node)
        for arg in node.all_input_nodes:
            if last_use.get(arg) == position[node] and arg not in keep:
                interpreter.env.pop(arg, None)
    return [interpreter.env[o] for o in outputs]


def _squared_error(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int]:
    total = sum(torch.sum((s.float() - t.float()) ** 2) for s, t in zip(student, teacher))
    return total, sum(t.numel() for t in teacher)


def distill_graph(gm: GraphModule, ctx: CompileContext) -> LKDResult:
    """LKD of the graph's blocks in place (see the module docstring); returns the per-block log."""
    config = ctx.recipe.lkd
    started = time.perf_counter()
    if config.train_norms:
        raise ZQError(f"recipe {ctx.recipe.name!r}: LKD's train_norms with rotate/smooth_alpha: the folds moved the "
                      f"norm weights into the linears; set train_norms: false")
    if config.logits_kl:
        raise ZQError(f"recipe {ctx.recipe.name!r}: LKD's logits_kl is not implemented after rotation/smoothing (the "
                      f"graph's LM head is not distilled against); set logits_kl: 0")
    if not ctx.calibration_inputs:
        raise ZQError(f"recipe {ctx.recipe.name!r} distils after rotation/smoothing, which needs calibration "
                      f"inputs (LKD's data); zqcompile.compile makes them (or pass calibration_data=)")
    blocks_name, _ = find_blocks(ctx.source_model)
    segments = block_segments(gm, blocks_name)
    nodes = list(gm.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    last_use = {arg: position[node] for node in nodes for arg in node.all_input_nodes}
    envs: list[dict[Node, Any]] = [{} for _ in ctx.calibration_inputs]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    for env, inputs in zip(envs, ctx.calibration_inputs):
        env.update(zip(placeholders, inputs))
    teacher = Interpreter(gm)
    memory = _PeakMemory(next(iter(ctx.calibration_inputs[0])).device)
    first = ctx.calibration_inputs[0][0]
    result = LKDResult(data_source="the compiler's calibration", inputs_from=config.inputs_from,
                       tokens=sum(int(inputs[0].numel()) for inputs in ctx.calibration_inputs)
                       if not first.is_floating_point() else 0)
    done = 0

    def advance(upto: int) -> None:  # nodes outside blocks, in floating point, on every environment
        nonlocal done
        outside = [n for n in nodes[done:upto] if n.op != "placeholder"]
        with torch.no_grad():
            for env in envs:
                env.update(zip(outside, _run(teacher, outside, env, outside, last_use, position)))
        for env in envs:
            for node in [n for n in env if last_use.get(n, -1) < upto]:
                del env[node]
        done = upto

    for index, (start, end) in enumerate(segments):
        advance(start)
        block_started = time.perf_counter()
        segment = nodes[start:end + 1]
        outputs = [n for n in segment if any(position[u] > end for u in n.users)]
        quantized = [n for n in segment if is_op(n, LINEAR) and n.meta[META_PLAN].quantized and is_stored(n.args[1])
                     and not shared_weight(gm, n.args[1])]
        train = any(needs_distillation(n.meta[META_PLAN]) for n in quantized)
        linears = {n: _Trained(gm, n, train) for n in quantized}
        student = _Student(gm, linears)
        with torch.no_grad():
            targets = [_run(teacher, segment, env, outputs, last_use, position) for env in envs]

        def error() -> tuple[float, list[list[torch.Tensor]]]:
            with torch.no_grad():
                values = [_run(student, segment, env, outputs, last_use, position) for env in envs]
            total, count = map(sum, zip(*(_squared_error(v, t) for v, t in zip(values, targets))))
            return float(total) / count, values

        params = [p for t in linears.values() for p in t.params()]
        mse_ptq = None
        if params:
            mse_ptq, _ = error()

            def loss_of(step: int) -> torch.Tensor:
                batch = step % len(envs)
                total, count = _squared_error(_run(student, segment, envs[batch], outputs, last_use, position),
                                              targets[batch])
                return total / count

            with torch.enable_grad():
                optimize(params, loss_of, config, f"LKD {blocks_name}.{index}", memory)
        mse_lkd, values = error()
        trained_names = []
        for linear, trained in linears.items():
            if not train:
                break
            for slot, param in ((1, trained.weight), (2, trained.bias)):
                if param is not None:
                    stored = linear.args[slot]
                    tensor = param.detach().to(get_attr_tensor(gm, stored).dtype)
                    replace_attr_tensor(gm, stored.target, tensor)
                    result.weights[stored.target] = tensor
                    trained_names.append(stored.target)
        if train:
            result.blocks.append(BlockReport(index, f"{blocks_name}.{index}", mse_ptq, mse_lkd, config.steps,
                                             time.perf_counter() - block_started, tuple(trained_names)))
        chain = values if config.inputs_from == "student" else targets
        for env, outs in zip(envs, chain):
            env.update(zip(outputs, (o.detach() for o in outs)))
            for node in [n for n in env if last_use.get(n, -1) <= end]:
                del env[node]
        done = end + 1
        memory.sample()
    result.seconds = time.perf_counter() - started
    result.peak_memory_mb = memory.growth_mb
    return result
