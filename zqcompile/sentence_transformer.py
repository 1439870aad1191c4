"""sentence-transformers: ``zqcompile.compile(st_model, recipe)`` for a ``SentenceTransformer``.

Its first module (``Transformer``) wraps a Hugging Face model; the rest (pooling, normalisation, dense layers)
work on that model's token embeddings. The compiled result is a copy of the ``SentenceTransformer`` whose
``Transformer`` module holds the quantized model in place of the HF one, so ``encode()`` is sentence-transformers'
own: same arguments, same tokenisation, same pooling and normalisation modules, same outputs. The user's model is
not modified (the copy shares its other modules). The QuantizedModel is ``result.quantized_model`` (for
``warmup()``, ``memory_report()``, ``inspect``).

sentence-transformers is not a dependency of zqcompile: nothing here imports it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from zqcompile.errors import ZQError

if TYPE_CHECKING:
    from zqcompile.model import QuantizedModel


def is_sentence_transformer(model: Any) -> bool:
    return any(cls.__name__ == "SentenceTransformer" and cls.__module__.startswith("sentence_transformers")
               for cls in type(model).__mro__)


class QuantizedBackbone(nn.Module):
    """Takes the HF model's place inside sentence-transformers' ``Transformer`` module: HF keyword inputs in,
    the HF output (or its tuple, for ``return_dict=False``) out, with the HF model's ``config``."""

    def __init__(self, quantized: nn.Module, config: Any):
        super().__init__()
        self.quantized = quantized
        self.config = config
        self.device, self.dtype = quantized.device, quantized.dtype
        # sentence-transformers versions that read the model's device from its first parameter or buffer (and
        # then move the whole model there in encode) find the compiled device here
        self.register_buffer("device_marker", torch.empty(0, dtype=quantized.dtype, device=quantized.device),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, return_dict: bool = True, **others: Any) -> Any:
        extra = sorted(name for name, value in others.items() if value is not None and value is not False)
        if extra:
            raise ZQError(f"the quantized sentence-transformers model takes input_ids, attention_mask and "
                          f"token_type_ids; it cannot honour {extra}")
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        output = self.quantized(**{name: given[name] for name in self.quantized.input_names})
        return output if return_dict else output.to_tuple()


def compile_sentence_transformer(model: nn.Module, compile: Callable[..., QuantizedModel], recipe: Any,
                                 **options: Any) -> nn.Module:
    """A copy of the SentenceTransformer ``model`` whose transformer is ``compile(transformer, recipe, **options)``
    (zqcompile.compile passes itself, so this module does not import the API back)."""
    from transformers import PreTrainedModel

    first_name, first = next(iter(model._modules.items()), (None, None))
    children = first._modules.items() if first is not None else ()
    hf_name, hf_model = next(((n, m) for n, m in children if isinstance(m, PreTrainedModel)), (None, None))
    if hf_model is None:
        raise ZQError(f"the SentenceTransformer's first module ({type(first).__name__}) holds no Hugging Face "
                      "model; zqcompile compiles SentenceTransformers built on a transformers model")
    quantized = compile(hf_model, recipe, **options)
    transformer = copy.copy(first)
    transformer._modules = {**first._modules, hf_name: QuantizedBackbone(quantized, hf_model.config)}
    result = copy.copy(model)
    result._modules = {**model._modules, first_name: transformer}
    object.__setattr__(result, "quantized_model", quantized)  # not a submodule: Sequential would run it as a layer
    return result
