"""The compiler, top-down: ZeroQuant's components as phases of graph passes.

capture -> canonicalize -> plan -> rotate (optional) -> smooth (optional) -> distill (LKD, optional) -> round
weights (GPTQ / AWQ, optional) -> low-rank correction (LoRC, optional) -> quantize weights -> insert
activation quant -> fuse -> lower -> cleanup: the compiled graph (inspect, export, save). Then the phases of the
target (``TARGET_PHASES``), on a copy of the compiled graph that shares its tensors: the graph the backend
executes. For ``target="cpu"`` there are none and the executed graph is the compiled one.

Every phase leaves a runnable graph with the same meaning; up to ``fuse`` it is simulated quantization
(integer values dequantized back to floats), ``lower`` makes the GEMMs integer. Set ``dump_dir`` (or the
environment variable ZQ_DUMP_DIR) to write ``gm.code`` after each phase.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import torch
from torch import nn
from torch.fx import Graph, GraphModule

from zqcompile.errors import ZQError
from zqcompile.lkd import LKDResult
from zqcompile.passes import (
    CompileContext, additive_attention_mask, annotate_roles, awq_scale_weights, broadcast_padding_mask,
    calibrate_activations, canonicalize_conv1d, cleanup, decompose_outliers, distill_blocks, fuse_kv_cache_write,
    fuse_quant_into_elementwise, fuse_residual_rmsnorm, fuse_rotary_embedding, fuse_sibling_linears, gptq_round_weights,
    grouped_query_attention, insert_activation_quant, low_rank_correction, lower_linear_to_int8_gemm, plan_linears,
    quantize_weights, remove_dropout, remove_tensor_asserts, rotate_hadamard, run_passes, smooth_activations,
)
from zqcompile.passes.infra import PassFn, delete_attr, replace_attr_tensor
from zqcompile.recipe import Recipe

PHASES = (
    # make the captured graph uniform: no eval-mode dropout or dtype asserts, GPT-2 Conv1D as linear
    ("canonicalize", (remove_dropout, remove_tensor_asserts, canonicalize_conv1d)),
    # what each linear is (role) and how the recipe says to compile it (plan)
    ("plan", (annotate_roles, plan_linears)),
    # optional (recipe rotate): Hadamard rotation of the residual stream and the output projections' inputs (QuaRot)
    ("rotate", (rotate_hadamard,)),
    # optional (recipe smooth_alpha): fold per-channel activation outliers of norm outputs into the weights
    ("smooth", (calibrate_activations, smooth_activations)),
    # optional (recipe lkd): layer-by-layer knowledge distillation for those plans; after rotation / smoothing, so
    # that it distils the weights they fold (the graph's blocks then), else the source model's blocks
    ("distill", (distill_blocks,)),
    # optional (recipe outlier_threshold): LLM.int8(), calibrated outlier input columns stay FP16, the rest INT8
    ("decompose_outliers", (decompose_outliers,)),
    # optional (recipe weight_rounding): AWQ scales weight channels (folded like smoothing), or GPTQ chooses the
    # integers quantize_weights stores
    ("round_weights", (awq_scale_weights, gptq_round_weights)),
    # optional (recipe lorc_rank): LoRC, a rank-r FP16 correction of each quantized weight's rounding error
    ("low_rank_correction", (low_rank_correction,)),
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

TARGET_PHASES: dict[str, tuple[tuple[str, tuple[PassFn, ...]], ...]] = {
    "cpu": (),
    # rewrites that pay off with the GPU kernels; the compiled graph keeps one GEMM per linear layer, the plain
    # rotary embedding, residual adds and cache writes, and the repeat_kv attention (what ONNX export and the CPU
    # reference run)
    "cuda": (("cuda_graph_rewrites", (fuse_sibling_linears, fuse_rotary_embedding, grouped_query_attention,
                                      fuse_kv_cache_write, fuse_residual_rmsnorm, broadcast_padding_mask,
                                      additive_attention_mask, cleanup)),),
}
ALWAYS_RUN = (cleanup,)  # target passes that a selection (``target_passes``) cannot leave out


@dataclass
class PipelineResult:
    """The compiled graph (inspect, ONNX export, save), the graph the backend executes, and their context."""

    compiled: GraphModule
    executed: GraphModule
    context: CompileContext


def run_pipeline(gm: GraphModule, recipe: Recipe, *, target: str = "cpu", target_passes: Collection[str] | None = None,
                 stop_after: str | None = None, dump_dir: str | os.PathLike | None = None,
                 calibration_inputs: Sequence[tuple[torch.Tensor, ...]] = (),
                 source_model: nn.Module | None = None, lkd_result: LKDResult | None = None) -> PipelineResult:
    """Run the phases on a captured graph (in place), then the target's phases on a copy.

    ``stop_after`` stops after that phase (the target's phases are then skipped: ``executed`` is ``compiled``).
    ``target_passes`` keeps only the named passes of the target's phases (``None``: all), to measure what each
    buys. ``calibration_inputs`` (graph input tuples) are only run when the recipe calibrates (smoothing, GPTQ, AWQ,
    LLM.int8(), LKD after rotation/smoothing);
    ``source_model`` (the FP model) is only needed when the recipe distils (``lkd``); ``lkd_result``, the
    distillation of another graph of the same model (the forward graph's, for the generation graph), is applied
    instead of distilling again where the graph is distilled (after rotation / smoothing).
    """
    if stop_after is not None and stop_after not in PHASE_NAMES:
        raise ZQError(f"unknown phase {stop_after!r}; phases are {list(PHASE_NAMES)}")
    dump_dir = dump_dir or os.environ.get("ZQ_DUMP_DIR")
    ctx = CompileContext(recipe, calibration_inputs=list(calibration_inputs), source_model=source_model,
                         lkd_result=lkd_result)
    if recipe.lkd is not None and source_model is None:
        raise ZQError(f"recipe {recipe.name!r} asks for LKD, which distils the floating-point model's blocks: pass "
                      f"the model (zqcompile.compile does)")
    for index, (phase, passes) in enumerate(PHASES):
        gm = run_passes(gm, ctx, passes)
        _dump(dump_dir, index, phase, gm)
        if phase == stop_after:
            return PipelineResult(gm, gm, ctx)
    if source_model is not None:  # bytes of FP tensors (embeddings, norms, FP layers) copied away from the model
        ctx.counters["take_ownership.bytes_copied"] += take_ownership([gm], source_model)
    ctx.source_model = None  # the compiled model must not keep the FP model alive
    executed = run_target_phases(gm, ctx, target, target_passes, dump_dir=dump_dir)
    return PipelineResult(gm, executed, ctx)


def run_target_phases(compiled: GraphModule, ctx: CompileContext, target: str,
                      target_passes: Collection[str] | None = None,
                      dump_dir: str | os.PathLike | None = None) -> GraphModule:
    """The graph ``target`` executes: ``compiled`` itself when the target has no phases, else a copy of it (sharing
    its tensors) after the target's phases. Also used on a loaded compiled graph."""
    if target not in TARGET_PHASES:
        raise ZQError(f"unknown target {target!r}; targets are {sorted(TARGET_PHASES)}")
    available = {fn.__name__ for _, passes in TARGET_PHASES[target] for fn in passes}
    unknown = sorted(set(target_passes or ()) - available)
    if unknown:
        raise ZQError(f"unknown pass(es) {unknown} for target {target!r}; its passes are {sorted(available)}")
    if not TARGET_PHASES[target]:
        return compiled
    phases = [(name, tuple(fn for fn in passes if target_passes is None or fn.__name__ in target_passes
                           or fn in ALWAYS_RUN)) for name, passes in TARGET_PHASES[target]]
    graph = Graph()
    graph.output(graph.graph_copy(compiled.graph, {}))
    graph._codegen = compiled.graph._codegen  # export's pytree calling convention
    executed = GraphModule(compiled, graph)
    for index, (phase, passes) in enumerate(phases, start=len(PHASES)):
        executed = run_passes(executed, ctx, passes)
        _dump(dump_dir, index, f"{target}_{phase}", executed)
    return executed


def take_ownership(graphs: Sequence[torch.fx.GraphModule], model: nn.Module) -> int:
    """Give ``graphs`` their own copy of every tensor they still share with ``model``; returns the bytes copied.

    Export's graph holds the user's Parameter objects. Run by the pipeline once it has replaced the quantized
    weights (so only the floating-point tensors the recipe keeps are copied: embeddings, norms, FP layers), it
    makes the compiled model independent of the user's: ``model.half()`` or an in-place edit of one no longer
    changes the other. A tensor that several names or graphs read (tied embeddings) is copied once; tensors no
    node reads (export registers every parameter, so GPT-2's tied ``wte.weight`` beside the ``lm_head.weight``
    the graph reads) are dropped, not copied.
    """
    def key(t: torch.Tensor) -> tuple:
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype

    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    copies: dict[tuple, torch.Tensor] = {}
    copied = 0
    for gm in graphs:
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
            if name not in read:
                delete_attr(gm, name)
                continue
            if tensor.untyped_storage().data_ptr() not in owned:
                continue
            if key(tensor) not in copies:
                copies[key(tensor)] = tensor.detach().clone()
                copied += tensor.numel() * tensor.element_size()
            replace_attr_tensor(gm, name, copies[key(tensor)])
    return copied


def _dump(dump_dir: str | os.PathLike | None, index: int, phase: str, gm: GraphModule) -> None:
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        (Path(dump_dir) / f"{index:02d}_{phase}.py").write_text(gm.code)
