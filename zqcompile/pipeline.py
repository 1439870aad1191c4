"""The compiler, top-down: ZeroQuant's components as phases of graph passes.

capture -> canonicalize -> plan -> smooth (optional) -> quantize weights -> insert activation quant -> fuse -> lower -> cleanup

Every phase leaves a runnable graph with the same meaning; up to ``fuse`` it is simulated quantization
(integer values dequantized back to floats), ``lower`` makes the GEMMs integer. Set ``dump_dir`` (or the
environment variable ZQ_DUMP_DIR) to write ``gm.code`` after each phase.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from torch.fx import GraphModule

from zqcompile.errors import ZQError
from zqcompile.passes import (
    CompileContext, annotate_roles, calibrate_activations, canonicalize_conv1d, cleanup, fuse_quant_into_elementwise,
    insert_activation_quant, lower_linear_to_int8_gemm, plan_linears, quantize_weights, remove_dropout,
    remove_tensor_asserts, run_passes, smooth_activations,
)
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
