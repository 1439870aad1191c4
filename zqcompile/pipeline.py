"""The compiler, top-down: ZeroQuant's components as phases of graph passes.

capture -> canonicalize -> plan -> smooth (optional) -> quantize weights -> insert activation quant -> fuse -> lower
-> cleanup; then, for the cuda backend only, on the copy of the graph it executes: fuse sibling GEMMs, one additive
attention mask (CUDA_PHASES)

Every phase leaves a runnable graph with the same meaning; up to ``fuse`` it is simulated quantization
(integer values dequantized back to floats), ``lower`` makes the GEMMs integer. Set ``dump_dir`` (or the
environment variable ZQ_DUMP_DIR) to write ``gm.code`` after each phase.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from torch.fx import Graph, GraphModule

from zqcompile.errors import ZQError
from zqcompile.passes import (
    CompileContext, additive_attention_mask, annotate_roles, calibrate_activations, canonicalize_conv1d, cleanup,
    fuse_quant_into_elementwise, fuse_sibling_linears, insert_activation_quant,
    lower_linear_to_int8_gemm, plan_linears, quantize_weights, remove_dropout, remove_tensor_asserts, run_passes,
    smooth_activations,
)
from zqcompile.passes.fuse_sibling_linears import FUSED_ARG_POSITION, META_FUSED_FROM
from zqcompile.passes.infra import get_attr_tensor, replace_attr_tensor
from zqcompile.recipe import Recipe

PHASES = (
    # make the captured graph uniform: no eval-mode dropout or dtype asserts, GPT-2 Conv1D as linear
    ("canonicalize", (remove_dropout, remove_tensor_asserts, canonicalize_conv1d)),
    # what each linear is (role) and how the recipe says to compile it (plan)
    ("plan", (annotate_roles, plan_linears)),
    # optional (recipe smooth_alpha): fold per-channel activation outliers of norm outputs into the weights
    ("smooth", (calibrate_activations, smooth_activations)),
    # offline: group-wise symmetric INT8/INT4 weights + scales, FP weights dropped
    ("quantize_weights", (quantize_weights,)),
    # run time: token-wise dynamic INT8 activations in front of W*A8 linears
    ("insert_activation_quant", (insert_activation_quant,)),
    # ZeroQuant kernel fusion: quantization folded into LayerNorm / add+LN / RMSNorm / GELU / SwiGLU
    ("fuse", (fuse_quant_into_elementwise,)),
    # INT8 GEMM with the dequantization in its epilogue
    ("lower", (lower_linear_to_int8_gemm,)),
    ("cleanup", (cleanup,)),
)
PHASE_NAMES = tuple(name for name, _ in PHASES)

CUDA_PHASES = (
    # rewrites that pay off with the GPU kernels, applied to the graph the cuda backend runs; the compiled graph
    # that users inspect, export and save keeps one GEMM per linear layer
    ("cuda_graph_rewrites", (fuse_sibling_linears, additive_attention_mask, cleanup)),
)


def run_pipeline(gm: GraphModule, recipe: Recipe, stop_after: str | None = None,
                 dump_dir: str | os.PathLike | None = None,
                 calibration_inputs: Sequence[tuple[torch.Tensor, ...]] = ()) -> tuple[GraphModule, CompileContext]:
    """Run the phases on a captured graph (in place), optionally stopping after the phase ``stop_after``.

    ``calibration_inputs`` (graph input tuples) are only run when the recipe smooths activations.
    """
    if stop_after is not None and stop_after not in PHASE_NAMES:
        raise ZQError(f"unknown phase {stop_after!r}; phases are {list(PHASE_NAMES)}")
    dump_dir = dump_dir or os.environ.get("ZQ_DUMP_DIR")
    ctx = CompileContext(recipe, calibration_inputs=list(calibration_inputs))
    for index, (phase, passes) in enumerate(PHASES):
        gm = run_passes(gm, ctx, passes)
        if dump_dir:
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
            (Path(dump_dir) / f"{index:02d}_{phase}.py").write_text(gm.code)
        if phase == stop_after:
            break
    return gm, ctx


def optimize_for_cuda(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """The graph the cuda backend executes: a copy of ``gm`` (sharing its tensors) after ``CUDA_PHASES``.

    The weights, scales and biases that a fused GEMM concatenated are put back into ``gm`` as views of the
    concatenation, so the model holds each tensor once.
    """
    graph = Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen  # export's pytree calling convention
    executed = GraphModule(gm, graph)
    for _, passes in CUDA_PHASES:
        executed = run_passes(executed, ctx, passes)
    for node in executed.graph.nodes:
        for kind, parts in node.meta.get(META_FUSED_FROM, {}).items():
            fused = get_attr_tensor(executed, node.args[FUSED_ARG_POSITION[kind]])
            for target, start, end in parts:
                replace_attr_tensor(gm, target, fused[start:end])
    return executed
