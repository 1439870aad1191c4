"""zqcompile.compile: capture -> pipeline -> backend."""

from __future__ import annotations

import os
from typing import Any, Mapping

from torch import nn

from zqcompile.backends import resolve_backend
from zqcompile.capture import capture
from zqcompile.model import QuantizedModel
from zqcompile.pipeline import run_pipeline
from zqcompile.recipe import Recipe, load_recipe


def compile(model: nn.Module, recipe: Recipe | str | os.PathLike | Mapping[str, Any] = "w8a8", *,
            example_inputs: tuple | None = None, backend: str = "auto", cuda_graphs: bool | None = None,
            dump_dir: str | os.PathLike | None = None) -> QuantizedModel:
    """Compile ``model`` with ZeroQuant quantization and return a model with the same call signature.

    Args:
        model: a Hugging Face text model (BERT, GPT-2, Llama, Qwen2, ...) or a plain ``nn.Module``; it is
            compiled on its own device and dtype (use an fp16 CUDA model for ``backend='cuda'``).
        recipe: a preset name (``w8a8``, ``w4a8``, ``w8a16``, ``w4a16``), a :class:`Recipe`, a dict, or a
            path to a YAML/JSON recipe.
        example_inputs: positional example inputs; needed for plain modules whose first layer is not a Linear.
        backend: ``auto``, ``cpu`` (reference kernels) or ``cuda`` (fused GPU kernels).
        cuda_graphs: run the forward under CUDA graphs (default: on for the cuda backend).
        dump_dir: write the graph's code after each compiler phase there.
    """
    recipe = load_recipe(recipe)
    captured = capture(model, example_inputs)
    backend = resolve_backend(backend, captured.device)
    gm, ctx = run_pipeline(captured.graph_module, recipe, dump_dir=dump_dir)
    return QuantizedModel(gm, captured, recipe, ctx, backend)
