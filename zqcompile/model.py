"""QuantizedModel: the compiled graph behind the original model's call signature and output types."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from zqcompile.backends.cuda_graphs import GraphMemory
from zqcompile.buckets import ShapeBuckets, warmup_inputs, warmup_shapes
from zqcompile.capture import Captured
from zqcompile.errors import ZQError
from zqcompile.guards import GUARDS_META, check_guards
from zqcompile.passes.infra import CompileContext, embedding_rows
from zqcompile.recipe import Recipe
from zqcompile.runtime import BATCH_BUCKETS


@dataclass(frozen=True)
class WeightMemory:
    """Bytes of the model's weights after compilation, and what the quantized ones took before."""

    quantized_before: int  # the quantized layers' weights as captured (FP32/FP16/BF16)
    quantized_fp16: int  # the same weights stored in FP16 (the paper's baseline)
    quantized_after: int  # their integer values + scales
    kept_fp: int  # linear weights the recipe keeps in floating point
    total: int  # every tensor of the compiled graphs (embeddings, norms, FP layers, integer weights), stored once
    shared: tuple[tuple[str, ...], ...] = ()  # names of one stored tensor (a tied embedding and LM head)

    @property
    def ratio_vs_fp16(self) -> float:
        return self.quantized_after / self.quantized_fp16 if self.quantized_fp16 else 1.0

    def __str__(self) -> str:
        mb = 1 / 2 ** 20
        text = (f"quantized linears {self.quantized_before * mb:.2f} MB -> {self.quantized_after * mb:.2f} MB "
                f"({self.ratio_vs_fp16:.3f}x of FP16); FP linears {self.kept_fp * mb:.2f} MB; "
                f"all tensors of the compiled model {self.total * mb:.2f} MB")
        if self.shared:
            text += "; stored once, shared by " + ", ".join(" = ".join(group) for group in self.shared)
        return text


class QuantizedModel(nn.Module):
    """A compiled model: call it like the original (same inputs, same HF output type)."""

    def __init__(self, graph_module: GraphModule, captured: Captured, recipe: Recipe, ctx: CompileContext,
                 backend: str, runner: Callable[..., Any] | None = None, buckets: ShapeBuckets | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.model_class = captured.model_class
        self.input_names = captured.input_names
        self.output_type = captured.output_type
        self.output_keys = captured.output_keys
        self.max_seq_len = captured.max_seq_len
        self.example_inputs = captured.example_inputs
        self.dtype = captured.dtype
        self.device = captured.device
        self.recipe = recipe
        self.context = ctx
        self.backend = backend
        self.buckets = buckets  # shape buckets (zqcompile/buckets.py): requests padded to them; None = exact shapes
        # what calls the executed graph (backends.build_runner): the compiled graph itself, the cuda target's rewrite
        # of it, or a CUDA-graph runner replaying that. Kept out of the submodules: its tensors are graph_module's (or
        # views of them), which .to() / state_dict cover already
        object.__setattr__(self, "runner", runner if runner is not None else graph_module)
        self._embedding_rows = embedding_rows(graph_module)
        # the prefill / decode step over a static KV cache (zqcompile.generation.Generator) of a decoder LM; its
        # graph's tensors are graph_module's, so it is kept out of the submodules as well
        object.__setattr__(self, "generation", None)
        self.no_generation_reason = (f"this compiled {self.model_class} has no generation graph (compiled with "
                                     f"generation=False, or saved by a zqcompile without it): compile it again with "
                                     f"zqcompile.compile(model, recipe)")

    @property
    def executed_graph(self) -> GraphModule:
        """The graph the backend runs: the compiled graph, or the cuda target's rewrite of it
        (pipeline.TARGET_PHASES), which the CUDA-graph runner replays."""
        for candidate in (self.runner, getattr(self.runner, "forward", None)):
            if isinstance(candidate, GraphModule):
                return candidate
        return self.graph_module

    # ---- calling ------------------------------------------------------------------------------------
    def graph_inputs(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        """The flat tensors the graph takes, from the user's arguments (HF keyword/positional style), after
        checking them: a call the graph cannot run correctly is a ZQError, never a wrong or raw failure."""
        tensors, indices = self._checked_inputs(args, kwargs)
        self._check_indices(indices)
        return tensors

    def _checked_inputs(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, list[tuple[str, torch.Tensor, int]]]:
        """``graph_inputs`` but for the values of the index inputs: the tensors, and (name, value, embedding rows) of
        each index input the caller gave, for ``_check_indices``."""
        if self.input_names is None:
            tensors = self._plain_inputs(args, kwargs)
            indices = [(f"input {index}", tensors[index], rows) for index, rows in self._embedding_rows.items()]
        else:
            tensors, indices = self._hf_inputs(args, kwargs)
        check_guards(self.graph_module.meta.get(GUARDS_META, ()), tensors, self.model_class)
        return tensors, indices

    def _plain_inputs(self, args: tuple, kwargs: dict[str, Any]) -> tuple:
        if kwargs:
            raise ZQError(f"compiled {self.model_class} takes positional inputs only, got {sorted(kwargs)}")
        if len(args) != len(self.example_inputs):
            raise ZQError(f"compiled {self.model_class} takes {len(self.example_inputs)} input(s), got {len(args)}")
        for index, (arg, example) in enumerate(zip(args, self.example_inputs)):
            if not isinstance(example, torch.Tensor):
                continue
            if not isinstance(arg, torch.Tensor):
                raise ZQError(f"input {index} must be a tensor like the example it was captured with, got "
                              f"{type(arg).__name__}")
            if arg.dtype != example.dtype or arg.dim() != example.dim() or arg.shape[1:] != example.shape[1:]:
                raise ZQError(f"input {index} is {arg.dtype} of shape {tuple(arg.shape)}, but {self.model_class} "
                              f"was captured with {example.dtype} of shape {tuple(example.shape)} and only dim 0 "
                              f"(batch) may change; compile it with example_inputs of the dtype and shape you need")
            if arg.dim() and arg.shape[0] == 0:
                raise ZQError(f"input {index} has an empty batch (shape {tuple(arg.shape)}); pass at least one row")
            self._check_device(arg, f"input {index}")
        return args

    def _hf_inputs(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple[torch.Tensor, ...], list]:
        if len(args) > len(self.input_names):
            raise ZQError(f"compiled {self.model_class} takes at most {len(self.input_names)} positional inputs "
                          f"{list(self.input_names)}, got {len(args)}")
        named = dict(zip(self.input_names, args))
        overlap = set(named) & set(kwargs)
        if overlap:
            raise ZQError(f"got {sorted(overlap)} both positionally and by keyword")
        named.update(kwargs)
        unknown = sorted(k for k, v in named.items() if k not in self.input_names and v is not None)
        if unknown:
            raise ZQError(f"compiled {self.model_class} accepts {list(self.input_names)}; it was captured without "
                          f"{unknown} (KV caches, labels and embeddings inputs are not supported)")
        input_ids = named.get("input_ids")
        self.check_token_ids(input_ids)
        tensors, indices = [], []
        for index, name in enumerate(self.input_names):
            value = given = named.get(name)
            if value is None:  # made only when missing: each is a kernel launch on the GPU
                value = torch.ones_like(input_ids) if name == "attention_mask" else torch.zeros_like(input_ids)
            if not isinstance(value, torch.Tensor):
                raise ZQError(f"{name} must be a tensor, got {type(value).__name__}")
            if value.shape != input_ids.shape:
                raise ZQError(f"{name} has shape {tuple(value.shape)}, input_ids has {tuple(input_ids.shape)}")
            self._check_device(value, name)
            _check_integer(value, name)
            if index in self._embedding_rows and given is not None:  # the zeros made here are valid indices
                indices.append((name, value, self._embedding_rows[index]))
            dtype = self.example_inputs[index].dtype
            tensors.append(value if value.dtype == dtype else value.to(dtype))  # a no-op .to() still costs a dispatch
        return tuple(tensors), indices

    def _check_indices(self, indices: list[tuple[str, torch.Tensor, int]]) -> None:
        """ZQError when an input that indexes an embedding holds a value outside its rows: a CUDA index error would
        kill the process's CUDA context. One reduction per such input and one read back to the host for all of them
        (on the GPU a synchronisation: the forward leaves the check to its CUDA graphs' IndexGuard where they
        have one, and calls this only when that flagged a value)."""
        if not indices:
            return
        bounds = torch.stack([bound for _, value, _ in indices for bound in torch.aminmax(value)]).tolist()
        for (name, _, rows), low, high in zip(indices, bounds[0::2], bounds[1::2]):
            if low < 0 or high >= rows:
                raise ZQError(f"{name} holds values in [{low}, {high}], but {self.model_class}'s embedding "
                              f"has {rows} rows (valid values 0..{rows - 1}); use the model's own tokenizer")

    def check_token_ids(self, input_ids: Any) -> None:
        """The checks of input_ids that the forward and ``generate`` share: an integer [batch, seq] tensor on the
        model's device, neither dim empty, no longer than the model's positions."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ZQError(f"input_ids must be a [batch, seq] tensor of token ids, got {type(input_ids).__name__} "
                          f"{tuple(getattr(input_ids, 'shape', ()))}; for one prompt use "
                          f"tokenizer(text, return_tensors='pt').input_ids")
        _check_integer(input_ids, "input_ids")
        self._check_device(input_ids, "input_ids")
        batch, seq = input_ids.shape
        if batch == 0 or seq == 0:
            raise ZQError(f"input_ids has shape {tuple(input_ids.shape)}, the prompt is empty: batch and sequence "
                          f"length must be at least 1; give every row at least one token, e.g. the tokenizer's BOS "
                          f"token")
        if self.max_seq_len is not None and seq > self.max_seq_len:
            raise ZQError(f"sequence length {seq} exceeds {self.model_class}'s maximum of {self.max_seq_len} "
                          f"positions; split the input into chunks of at most {self.max_seq_len} tokens (nothing "
                          f"is truncated silently)")

    def _check_device(self, value: torch.Tensor, name: str) -> None:
        if value.device != self.device:
            raise ZQError(f"inputs are on {value.device} but the model was compiled for {self.device}; move them "
                          f"with .to({str(self.device)!r}) ({name})")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        run, (inputs, indices) = self.runner, self._checked_inputs(args, kwargs)
        guard = getattr(run, "index_guard", None)  # checks the index values inside the graph (cuda_graphs.py)
        if guard is None:
            self._check_indices(indices)
        outputs = run(*inputs) if self.buckets is None else self.buckets(run, inputs)
        if self.output_type is not None:
            outputs = self.output_type(**dict(zip(self.output_keys, outputs)))
        # After the replay and the host's work on the outputs: the read-back waits for the GPU here, not before the
        # launch. Outputs computed from clamped ids are never returned; the host check names the values.
        if guard is not None and guard.tripped():
            self._check_indices(indices)
        return outputs

    def train(self, mode: bool = True) -> QuantizedModel:
        """``eval()`` is a no-op (the compiled graph is inference-only: dropout was removed, and torch.export's
        graph module refuses mode changes); ``train()`` is refused."""
        if mode:
            raise ZQError("a compiled model runs inference only; train the FP model and compile it again")
        return self

    def warmup(self, batch_sizes: Sequence[int] | None = None, seq_lens: Sequence[int] | None = None, *,
               prompt_lens: Sequence[int] | None = None, max_new_tokens: int = 1, progress: bool = True) -> int:
        """Run every shape that requests of these sizes will run at once, before traffic: the cuda backend captures
        their CUDA graphs (and tunes their GEMMs) now, with a progress bar. ``seq_lens`` warms the forward (default:
        every bucket); ``prompt_lens`` warms ``generate``'s prefill and decode steps (a decoder compiled for
        generation warms those, for prompts of 128 tokens, when neither is given). Returns the number of forward
        graphs captured (0 without CUDA graphs)."""
        if self.generation is not None and (prompt_lens is not None or seq_lens is None):
            self.generation.warmup(batch_sizes or BATCH_BUCKETS, prompt_lens or (128,), max_new_tokens)
            if seq_lens is None:
                return 0
        shapes = warmup_shapes(self.buckets, batch_sizes, seq_lens, text_model=self.input_names is not None)
        inputs = [warmup_inputs(b, s, self.input_names, self.example_inputs, self.device) for b, s in shapes]
        if hasattr(self.runner, "warmup"):
            return self.runner.warmup(inputs, progress=progress)
        from tqdm.auto import tqdm
        with torch.no_grad():
            for example in tqdm(inputs, desc="warm-up", unit="shape", disable=not progress):
                self.runner(*example)
        return 0

    def memory_report(self) -> GraphMemory:
        """GPU memory held by the CUDA graphs (their shared pool and input buffers); zeros without graphs."""
        report = getattr(self.runner, "memory_report", None)
        return report() if report is not None else GraphMemory(0, 0, 0, 0)

    # ---- dtype and device are fixed by compilation -----------------------------------------------------
    def to(self, *args: Any, **kwargs: Any) -> "QuantizedModel":
        """A no-op for this model's own device and dtype; anything else is a ZQError (recompile instead)."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        self._refuse_cast(dtype, device)
        return self

    def half(self) -> "QuantizedModel":
        return self.to(torch.float16)

    def float(self) -> "QuantizedModel":
        return self.to(torch.float32)

    def bfloat16(self) -> "QuantizedModel":
        return self.to(torch.bfloat16)

    def double(self) -> "QuantizedModel":
        return self.to(torch.float64)

    def cuda(self, device: Any = None) -> "QuantizedModel":
        return self.to("cuda" if device is None else device)

    def cpu(self) -> "QuantizedModel":
        return self.to("cpu")

    def _apply(self, fn: Any, recurse: bool = True) -> "QuantizedModel":
        """What a parent module's ``to`` / ``half`` / ``cuda`` does to its children: a no-op where ``fn`` returns a
        tensor like this model's own floating-point ones unchanged (a move to where it already is), else a
        ZQError (a cast, a move, ``to_empty``)."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        if fn(probe) is not probe:
            self._refuse_cast(None, None, everything=True)
        return self

    def _refuse_cast(self, dtype: torch.dtype | None, device: Any, everything: bool = False) -> None:
        device = torch.device(device) if device is not None else None
        same_device = device is None or (device.type == self.device.type
                                         and (device.index is None or device == self.device))
        if everything or (dtype is not None and dtype != self.dtype) or not same_device:
            raise ZQError(f"a compiled model keeps the dtype and device it was compiled for ({self.dtype} on "
                          f"{self.device}): its integer weights, scales and graph were made for them. Compile "
                          f"the FP model again after moving it (model.to(device, dtype)), or load a saved one "
                          f"with zqcompile.load(dir, device=...)")

    # ---- generation ---------------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
                 **options: Any) -> torch.Tensor:
        """Token ids [batch, prompt + new] like Hugging Face ``generate`` (zqcompile.generation.Generator.generate:
        do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id, streamer, seed)."""
        generator = self._generator()
        self.check_token_ids(input_ids)
        return generator.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens, **options)

    def _generator(self):
        if self.generation is None:
            raise ZQError(self.no_generation_reason)
        return self.generation

    # ---- saving -------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, source_model: str | None = None) -> Path:
        """Write the compiled model to ``directory``; ``zqcompile.load(directory)`` reads it back (see
        zqcompile.serialize). ``source_model`` records where the FP model came from (for ``zqcompile bench``)."""
        from zqcompile.serialize import save
        return save(self, directory, source_model=source_model)

    # ---- facts --------------------------------------------------------------------------------------
    def weight_memory(self) -> WeightMemory:
        from zqcompile.inspection import linear_rows, stored_tensors
        rows = linear_rows(self.graph_module)
        before = sum(r.bytes_before for r in rows if r.kind != "FP")
        also = [self.generation.graph_module] if self.generation is not None else []
        # tied weights, and the tensors the generation graph shares with the forward graph, count once
        stored = stored_tensors(self.graph_module, *also)
        return WeightMemory(
            quantized_before=before,
            quantized_fp16=before * 2 // self.dtype.itemsize,
            quantized_after=sum(r.bytes_after for r in rows if r.kind != "FP"),
            kept_fp=sum(r.bytes_after for r in rows if r.kind == "FP"),
            total=stored.bytes,
            shared=stored.shared,
        )

    def extra_repr(self) -> str:
        return (f"model={self.model_class}, recipe={self.recipe.name}, backend={self.backend}, "
                f"dtype={self.dtype}, device={self.device}\nweights: {self.weight_memory()}")


def _check_integer(value: torch.Tensor, name: str) -> None:
    boolean_ids = value.dtype == torch.bool and name != "attention_mask"  # a bool mask is an integer mask
    if value.is_floating_point() or value.is_complex() or boolean_ids:
        raise ZQError(f"{name} must be an integer tensor, got {value.dtype}; token ids are indices "
                      f"(tokenizer(..., return_tensors='pt') gives int64)")
