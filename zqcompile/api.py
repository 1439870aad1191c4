"""zqcompile.compile: capture -> pipeline -> backend."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Collection, Mapping

import torch
from torch import nn

from zqcompile.auto_recipe import auto_recipe
from zqcompile.backends import build_runner, resolve_backend
from zqcompile.buckets import Buckets, resolve_buckets
from zqcompile.capture import Captured, capture
from zqcompile.distillation_data import distillation_data
from zqcompile.errors import ZQError
from zqcompile.generation import compile_generation
from zqcompile.generation import restore as restore_generation
from zqcompile.kv_cache import capture_static_cache, is_causal_lm
from zqcompile.model import QuantizedModel
from zqcompile.passes.infra import embedding_rows
from zqcompile.pipeline import run_pipeline, run_target_phases
from zqcompile.recipe import LKDConfig, Recipe, load_recipe
from zqcompile.serialize import GENERATION, read_saved
from zqcompile.sentence_transformer import compile_sentence_transformer, is_sentence_transformer


@torch.inference_mode(False)  # tensors made inside inference mode could not be used outside it
def compile(model: nn.Module, recipe: Recipe | str | os.PathLike | Mapping[str, Any] = "w8a8", *,
            example_inputs: tuple | None = None, backend: str = "auto", cuda_graphs: bool | None = None,
            dump_dir: str | os.PathLike | None = None,
            lkd: LKDConfig | Mapping[str, Any] | bool | None = None,
            calibration_data: torch.Tensor | tuple | None = None,
            buckets: Buckets | Mapping[str, Any] | bool | None = None,
            target_passes: Collection[str] | None = None, generation: bool | None = None,
            max_cache_len: int | None = None, budget: float | None = None) -> QuantizedModel:
    """Compile ``model`` with ZeroQuant quantization and return a model with the same call signature.

    Args:
        model: a Hugging Face text model (BERT, GPT-2, Llama, Qwen2, ...) or a plain ``nn.Module``; it is
            compiled on its own device and dtype (use an fp16 CUDA model for ``backend='cuda'``).
        recipe: a preset name (``w8a8``, ``w4a8``, ``w8a16``, ``w4a16``, ...), a :class:`Recipe`, a dict, a
            path to a YAML/JSON recipe, or ``"auto"`` with ``budget=`` (zqcompile/auto_recipe.py: the cheapest
            per-linear plan whose loss on the model's own samples rises by at most ``budget``, e.g. 0.01).
        example_inputs: positional example inputs; needed for plain modules whose first layer is not a Linear.
        backend: ``auto``, ``cpu`` (reference kernels) or ``cuda`` (fused GPU kernels).
        cuda_graphs: run the forward under CUDA graphs (default: on for the cuda backend).
        dump_dir: write the graph's code after each compiler phase there.
        lkd: run layer-by-layer knowledge distillation first (an :class:`LKDConfig`, a dict of its fields, or
            ``True`` for the defaults); overrides the recipe's ``lkd`` section. The distilled weights go into
            the captured graph (the model itself is not modified); the log is ``result.lkd_result``.
        calibration_data: only for recipes with ``smooth_alpha``, ``weight_rounding`` gptq/awq or
            ``outlier_threshold``: token ids ``[batch, seq]`` of real text for the activation statistics, or a
            tuple of positional inputs for a plain module (default: ``example_inputs``). Default for token
            models: what LKD's ``data="auto"`` makes (text sampled from a decoder itself, random token ids for an
            encoder; the recipe's ``lkd`` data settings if it has them), or random token ids for smoothing alone.
        target_passes: keep only these passes of the backend's target phases (``pipeline.TARGET_PHASES``;
            default: all), e.g. to measure what each CUDA graph rewrite buys.
        generation: also compile the prefill / decode step over a static KV cache, for ``qmodel.generate``
            (default: for Hugging Face causal LMs; ``False`` halves a decoder's compile time when only the
            forward is needed).
        max_cache_len: KV-cache slots per sequence for ``generate`` (prompt + new tokens); default the model's
            maximum positions, at most 1024.
        buckets: shape buckets (zqcompile/buckets.py): requests are padded up to them so that a stream of
            shapes reuses a few CUDA graphs; ``None`` = on with the model's defaults for the cuda backend, off
            for cpu; ``True`` (defaults), ``False``, a :class:`Buckets` or a dict with ``batch_sizes`` / ``seq_lens``.

    A ``sentence_transformers.SentenceTransformer`` compiles to a copy whose ``encode()`` runs the quantized
    transformer (zqcompile/sentence_transformer.py). Compiling works inside ``torch.inference_mode()`` and
    ``torch.no_grad()``: the compiler makes normal tensors, and LKD turns gradients on for itself.
    """
    if is_sentence_transformer(model):
        return compile_sentence_transformer(model, compile, recipe, example_inputs=example_inputs, backend=backend,
                                            cuda_graphs=cuda_graphs, dump_dir=dump_dir, lkd=lkd,
                                            calibration_data=calibration_data, buckets=buckets,
                                            target_passes=target_passes)
    auto = isinstance(recipe, str) and recipe == AUTO
    if budget is not None and not auto:
        raise ZQError(f"budget= is for recipe='auto' only (got recipe {recipe!r}); drop budget or use 'auto'")
    if auto and budget is None:
        raise ZQError("recipe 'auto' needs budget=, the allowed relative loss increase (0.01 = 1%)")
    recipe = Recipe(name=AUTO) if auto else load_recipe(recipe)  # the auto plan needs the captured graph
    if lkd is not None:
        recipe = dataclasses.replace(recipe, lkd=LKDConfig.from_value(lkd))
    if generation and not is_causal_lm(model):
        raise ZQError(f"generation=True needs a Hugging Face causal language model (...ForCausalLM, GPT2LMHeadModel); "
                      f"{type(model).__name__} is not one")
    was_training = model.training if isinstance(model, nn.Module) else False
    try:  # capture and LKD run the model in eval mode; the user's model gets its own mode back
        cached, no_generation = None, None
        if generation is not False and is_causal_lm(model):
            try:
                cached = capture_static_cache(model, max_cache_len)
            except ZQError as err:  # by default a decoder whose cache cannot be captured still compiles its forward
                if generation or max_cache_len is not None:  # asked for generation (a cache length implies it)
                    raise
                no_generation = f"generate is not available: {err}"
        captured = capture(model, example_inputs)
        if auto:
            recipe = _auto(model, captured, recipe, budget)
        backend = resolve_backend(backend, captured.device)
        calibration = _calibration_inputs(model, captured, calibration_data, recipe) if _calibrates(recipe) else ()
        result = run_pipeline(captured.graph_module, recipe, target=backend, target_passes=target_passes,
                              dump_dir=dump_dir, calibration_inputs=calibration, source_model=model)
        generator = None if cached is None else compile_generation(
            cached, result.compiled, result.executed, recipe, backend=backend, cuda_graphs=cuda_graphs, model=model,
            calibration_inputs=calibration, target_passes=target_passes, dump_dir=dump_dir,
            lkd_result=result.context.lkd_result)
    finally:
        if isinstance(model, nn.Module):
            model.train(was_training)
    shape_buckets = resolve_buckets(buckets, backend=backend, input_names=captured.input_names,
                                    max_seq_len=captured.max_seq_len, graph_module=result.compiled)
    runner = build_runner(result.executed, backend, cuda_graphs, embedding_rows(result.compiled))
    quantized = QuantizedModel(result.compiled, captured, recipe, result.context, backend, runner=runner,
                               buckets=shape_buckets)
    quantized.lkd_result = result.context.lkd_result
    if generator is not None:
        quantized.generation = generator
    elif no_generation is not None:
        quantized.no_generation_reason = no_generation
    elif not is_causal_lm(model):
        quantized.no_generation_reason = (f"{captured.model_class} is not a decoder language model; generate needs "
                                          f"a Hugging Face causal LM (...ForCausalLM, GPT2LMHeadModel)")
    return quantized


AUTO = "auto"


def _auto(model: nn.Module, captured: Captured, base: Recipe, budget: float) -> Recipe:
    """The auto plan for the linears that ``base`` quantizes (its roles and keep_fp), with ``base``'s LKD."""
    if captured.input_names is None or "input_ids" not in captured.input_names:
        raise ZQError("recipe 'auto' calibrates on token ids: it needs a Hugging Face text model")
    probe = run_pipeline(captured.graph_module, dataclasses.replace(base, lkd=None), stop_after="plan")
    return dataclasses.replace(auto_recipe(model, probe.context.plans, budget), lkd=base.lkd)


def load(directory: str | os.PathLike, *, device: str | torch.device | None = None) -> QuantizedModel:
    """Load a model written by ``qmodel.save(directory)``; it runs without the original FP model and without
    running any code from the directory (zqcompile/serialize.py checks every file first).

    ``device`` defaults to the device it was compiled on (a CUDA model needs a GPU to load); the graph the backend
    executes is made again by the pipeline's target phases.
    """
    saved = read_saved(directory, device=device)
    compiled = saved.captured.graph_module
    executed = run_target_phases(compiled, saved.context, saved.backend)
    qmodel = QuantizedModel(compiled, saved.captured, saved.recipe, saved.context, saved.backend,
                            runner=build_runner(executed, saved.backend, None, embedding_rows(compiled)))
    qmodel.source_model = saved.source_model
    graphs = dict(saved.extra_graphs)
    if saved.generation is not None:
        qmodel.generation = restore_generation(
            graphs.pop(GENERATION)[0], saved.generation, recipe=saved.recipe, dtype=saved.captured.dtype,
            device=saved.captured.device, backend=saved.backend, forward_executed=executed)
    if graphs:
        qmodel.extra_graphs = graphs
    return qmodel


CALIBRATION_SHAPE = (4, 128)  # random token ids for smoothing alone: batch, sequence length
CALIBRATION_BATCH = 4  # sequences per calibration run of the graph
# the rounding methods' default data: LKD's data="auto" (self-generated text for decoders, random ids for encoders)
ROUNDING_DATA = LKDConfig(progress=False)


def _calibrates(recipe: Recipe) -> bool:
    return recipe.smooth_alpha is not None or recipe.weight_rounding != "rtn" or recipe.outlier_threshold is not None \
        or (recipe.lkd is not None and recipe.rotate)  # LKD after rotation distils the graph on these inputs


def _calibration_inputs(model: nn.Module, captured: Captured, data: torch.Tensor | tuple | None, recipe: Recipe
                        ) -> list[tuple[torch.Tensor, ...]]:
    """Graph input tuples for activation statistics: the user's token ids (or inputs), else the rounding
    methods' self-made data, else (smoothing alone) random tokens."""
    if captured.input_names is None:  # a plain module: positional inputs
        return [tuple(data) if data is not None else captured.example_inputs]
    if data is None and (recipe.weight_rounding != "rtn" or recipe.outlier_threshold is not None
                         or recipe.lkd is not None):
        data, _ = distillation_data(model, recipe.lkd or ROUNDING_DATA)
    if data is None:
        generator = torch.Generator().manual_seed(0)
        batch, seq = CALIBRATION_SHAPE
        seq = min(seq, captured.max_seq_len or seq)
        data = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.is_floating_point():
        raise ZQError("calibration_data must be an integer tensor of token ids [batch, seq], got "
                      f"{type(data).__name__} {getattr(data, 'shape', '')}")
    inputs = []
    for ids in data.to(captured.device).split(recipe.lkd.batch_size if recipe.lkd else CALIBRATION_BATCH):
        defaults = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        inputs.append(tuple(defaults[name] for name in captured.input_names))
    return inputs
