"""Front end: capture a model as an FX GraphModule of aten ops with ``torch.export`` (non-strict).

Hugging Face models are called through a thin wrapper with an explicit ``(input_ids, attention_mask[,
token_type_ids])`` signature, with dynamic batch and sequence dims, ``use_cache`` off and under
``torch.no_grad()`` (otherwise Llama's rotary embedding becomes a nested sub-graph). Plain ``nn.Module``s
are exported with their example inputs and a dynamic leading (batch) dim.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from zqcompile.errors import ZQError
from zqcompile.guards import unlift_with_guards

WRAPPER_PREFIX = "model."
HF_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_FAMILIES = ("encoder-only and decoder-only text models (the README's model matrix: BERT, RoBERTa, DistilBERT, "
                      "MPNet, DeBERTa-v2, GPT-2, GPT-J, GPT-NeoX, OPT, Llama, Mistral, Qwen2/3, Gemma-2/3, Phi-3) and "
                      "plain nn.Modules")


@dataclass
class Captured:
    """What the front end hands to the pipeline and to the compiled model wrapper."""

    graph_module: torch.fx.GraphModule
    model_class: str
    input_names: tuple[str, ...] | None  # HF: the keyword inputs, in graph order; plain modules: None
    output_type: type | None  # HF ModelOutput class to rebuild, or None (outputs returned as captured)
    output_keys: tuple[str, ...]
    max_seq_len: int | None
    example_inputs: tuple[torch.Tensor, ...]
    dtype: torch.dtype
    device: torch.device


class _HFTextWrapper(nn.Module):
    """Gives an HF model an explicit positional signature and a tuple output, which export needs."""

    def __init__(self, model: nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.model(**dict(zip(self.input_names, inputs))).values())


class _PlainWrapper(nn.Module):
    """Puts a plain module under the same ``model.`` prefix as HF models, so module names read the same."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: Any) -> Any:
        return self.model(*inputs)


def model_dtype_and_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    params = [p for p in model.parameters() if p.is_floating_point()]
    if not params:
        raise ZQError(f"{type(model).__name__} has no floating-point parameters: nothing to quantize")
    dtypes = {p.dtype for p in params}
    devices = {p.device for p in params}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ZQError(f"{type(model).__name__} mixes dtypes {sorted(map(str, dtypes))} / devices "
                      f"{sorted(map(str, devices))}; move it to one with model.to(device, dtype) first")
    dtype, device = dtypes.pop(), devices.pop()
    if device.type == "meta":
        raise ZQError(f"{type(model).__name__} is on the meta device (its weights were never loaded); load it "
                      f"with real weights (from_pretrained without device_map='meta', or model.to_empty() and "
                      f"load_state_dict) before compiling")
    if dtype not in SUPPORTED_DTYPES:
        raise ZQError(f"{type(model).__name__} is in {dtype}; zqcompile compiles float32, float16 or bfloat16 "
                      f"models: call model.float() first")
    return dtype, device


def is_hf_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def max_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module):
    config = model.config
    saved = getattr(config, "use_cache", None)
    if saved is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if saved is not None:
            config.use_cache = saved


def _export(wrapper: nn.Module, args: tuple, dynamic_shapes: Any, model_class: str) -> torch.fx.GraphModule:
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:  # export raises many types; all mean "this model could not be captured"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ZQError(f"torch.export could not capture {model_class}: {first_line}\n"
                      f"zqcompile supports {SUPPORTED_FAMILIES}; for a plain nn.Module pass example_inputs= "
                      f"that match its forward(), and make its control flow independent of tensor values") from err
    return unlift_with_guards(program)


def capture_hf(model: nn.Module, batch: int = 2, seq: int = 8) -> Captured:
    model_class = type(model).__name__
    dtype, device = model_dtype_and_device(model)
    accepted = inspect.signature(model.forward).parameters
    if getattr(model.config, "is_encoder_decoder", False):
        raise ZQError(f"{model_class} is an encoder-decoder model, which zqcompile does not capture; it "
                      f"supports {SUPPORTED_FAMILIES}")
    if "input_ids" not in accepted:
        raise ZQError(f"{model_class} does not take input_ids; zqcompile captures text models "
                      f"({SUPPORTED_FAMILIES})")
    # token_type_ids only where zeros mean "not given" (BERT's segment embeddings); GPT-2 accepts them too, but
    # there None skips the embedding while zeros would add the embedding of token 0.
    wanted = HF_TEXT_INPUTS if hasattr(model.config, "type_vocab_size") else HF_TEXT_INPUTS[:2]
    input_names = tuple(name for name in wanted if name in accepted)
    max_seq = max_positions(model.config)
    vocab = getattr(model.config, "vocab_size", 100)
    example = {
        "input_ids": torch.randint(0, vocab, (batch, seq), device=device),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.long, device=device),
    }
    args = tuple(example[name] for name in input_names)
    # seq is a hint, not a named Dim: export may then keep guards that hold for every length (fp16 Llama on CUDA
    # guards min(16*seq, 32*seq) == 16*seq, which a named Dim rejects as "Constraints violated (seq)")
    batch_dim, seq_dim = Dim("batch", min=1), Dim.DYNAMIC(min=1, max=max_seq)
    dynamic = ({0: batch_dim, 1: seq_dim},) * len(args)
    wrapper = _HFTextWrapper(model, input_names).eval()
    with _no_kv_cache(model):
        try:
            with torch.no_grad():
                reference = model(**dict(zip(input_names, args)))
        except Exception as err:  # any failure here means "not a model zqcompile can call like this"
            raise ZQError(f"{model_class} failed when called with {list(input_names)} only: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}; zqcompile supports "
                          f"{SUPPORTED_FAMILIES}") from err
        gm = _export(wrapper, args, {"inputs": dynamic}, model_class)
    if not hasattr(reference, "keys"):
        raise ZQError(f"{model_class} returned {type(reference).__name__}, not a transformers ModelOutput; "
                      f"load it with return_dict=True")
    return Captured(gm, model_class, input_names, type(reference), tuple(reference.keys()), max_seq, args,
                    dtype, device)


def _synthesize_example(model: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    first = next((m for m in model.modules() if not list(m.children())), None)
    if isinstance(first, nn.Linear):
        return (torch.randn(2, first.in_features, dtype=dtype, device=device),)
    raise ZQError(f"cannot guess example inputs for {type(model).__name__}; pass "
                  f"example_inputs=(tensor, ...) matching its forward()")


def capture_module(model: nn.Module, example_inputs: tuple | None) -> Captured:
    model_class = type(model).__name__
    dtype, device = model_dtype_and_device(model)
    args = tuple(example_inputs) if example_inputs is not None else _synthesize_example(model, dtype, device)
    dynamic = tuple({0: Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)
    gm = _export(_PlainWrapper(model).eval(), args, {"inputs": dynamic}, model_class)
    return Captured(gm, model_class, None, None, (), None, args, dtype, device)


def capture(model: nn.Module, example_inputs: tuple | None = None) -> Captured:
    """Export ``model`` (put in eval mode) to a GraphModule; raises ZQError naming the model when it cannot."""
    if not isinstance(model, nn.Module):
        raise ZQError(f"zqcompile.compile expects a torch.nn.Module, got {type(model).__name__}")
    model.eval()
    if is_hf_model(model) and example_inputs is None:
        return capture_hf(model)
    return capture_module(model, example_inputs)


def module_name_of(node: torch.fx.Node) -> str | None:
    """Qualified name (without the wrapper prefix) of the innermost module that produced ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    name = list(stack.values())[-1][0]
    if name == WRAPPER_PREFIX.rstrip("."):
        return None  # an op of the user's root module itself (a functional linear): it has no qualified name
    return name[len(WRAPPER_PREFIX):] if name.startswith(WRAPPER_PREFIX) else name

