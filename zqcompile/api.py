"""zqcompile.compile: capture -> pipeline -> backend."""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from zqcompile.backends import build_runner, resolve_backend
from zqcompile.capture import Captured, capture
from zqcompile.errors import ZQError
from zqcompile.generation import compile_generation
from zqcompile.kv_cache import capture_static_cache, is_causal_lm
from zqcompile.lkd import LKDConfig, apply_to_graph_module, distill
from zqcompile.model import QuantizedModel
from zqcompile.pipeline import run_pipeline
from zqcompile.recipe import Recipe, load_recipe


def compile(model: nn.Module, recipe: Recipe | str | os.PathLike | Mapping[str, Any] = "w8a8", *,
            example_inputs: tuple | None = None, backend: str = "auto", cuda_graphs: bool | None = None,
            dump_dir: str | os.PathLike | None = None,
            lkd: LKDConfig | Mapping[str, Any] | bool | None = None,
            calibration_data: torch.Tensor | tuple | None = None, generation: bool | None = None,
            max_cache_len: int | None = None) -> QuantizedModel:
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
        lkd: run layer-by-layer knowledge distillation first (an :class:`LKDConfig`, a dict of its fields, or
            ``True`` for the defaults); overrides the recipe's ``lkd`` section. The distilled weights go into
            the captured graph (the model itself is not modified); the log is ``result.lkd_result``.
        calibration_data: only for recipes with ``smooth_alpha``: token ids ``[batch, seq]`` of real text
            for the activation statistics (default: random token ids), or a tuple of positional inputs for a
            plain module (default: ``example_inputs``).
        generation: also compile the prefill / decode step over a static KV cache, for ``qmodel.generate``
            (default: for Hugging Face causal LMs; ``False`` halves a decoder's compile time when only the
            forward is needed).
        max_cache_len: KV-cache slots per sequence for ``generate`` (prompt + new tokens); default the model's
            maximum positions, at most 1024.
    """
    recipe = load_recipe(recipe)
    lkd_config = LKDConfig.from_value(lkd) if lkd is not None else recipe.lkd
    if lkd_config is not None and recipe.smooth_alpha is not None:
        raise ZQError(f"recipe {recipe.name!r} sets both smooth_alpha and LKD; LKD distils the unsmoothed weights, "
                      f"so use one of them (smooth_alpha: null, or no lkd)")
    if generation and not is_causal_lm(model):
        raise ZQError(f"generation=True needs a Hugging Face causal language model (...ForCausalLM, GPT2LMHeadModel); "
                      f"{type(model).__name__} is not one")
    was_training = model.training if isinstance(model, nn.Module) else False
    try:  # capture and LKD run the model in eval mode; the user's model gets its own mode back
        cached = capture_static_cache(model, max_cache_len) if generation is not False and is_causal_lm(model) else None
        captured = capture(model, example_inputs)
        lkd_result = distill(model, recipe, lkd_config) if lkd_config is not None else None
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    if lkd_result is not None:
        apply_to_graph_module(captured.graph_module, lkd_result.weights)
        if cached is not None:
            apply_to_graph_module(cached.graph_module, lkd_result.weights)
    backend = resolve_backend(backend, captured.device)
    calibration = _calibration_inputs(model, captured, calibration_data) if recipe.smooth_alpha is not None else ()
    gm, ctx = run_pipeline(captured.graph_module, recipe, dump_dir=dump_dir, calibration_inputs=calibration)
    quantized = QuantizedModel(gm, captured, recipe, ctx, backend, runner=build_runner(gm, backend, cuda_graphs, ctx))
    quantized.lkd_result = lkd_result
    if cached is not None:
        quantized.generation = compile_generation(
            cached, gm, quantized.executed_graph, recipe, backend=backend, cuda_graphs=cuda_graphs, model=model,
            calibration_inputs=calibration, dump_dir=dump_dir)
    elif not is_causal_lm(model):
        quantized.no_generation_reason = (f"{captured.model_class} is not a decoder language model; generate needs "
                                          f"a Hugging Face causal LM (...ForCausalLM, GPT2LMHeadModel)")
    return quantized


CALIBRATION_SHAPE = (4, 128)  # random token ids: batch, sequence length


def _calibration_inputs(model: nn.Module, captured: Captured, data: torch.Tensor | tuple | None
                        ) -> list[tuple[torch.Tensor, ...]]:
    """Graph input tuples for activation statistics: the user's token ids (or inputs), else random tokens."""
    if captured.input_names is None:  # a plain module: positional inputs
        return [tuple(data) if data is not None else captured.example_inputs]
    if data is None:
        generator = torch.Generator().manual_seed(0)
        batch, seq = CALIBRATION_SHAPE
        seq = min(seq, captured.max_seq_len or seq)
        data = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.is_floating_point():
        raise ZQError("calibration_data must be an integer tensor of token ids [batch, seq], got "
                      f"{type(data).__name__} {getattr(data, 'shape', '')}")
    data = data.to(captured.device)
    defaults = {"input_ids": data, "attention_mask": torch.ones_like(data), "token_type_ids": torch.zeros_like(data)}
    return [tuple(defaults[name] for name in captured.input_names)]
