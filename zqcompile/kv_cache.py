"""Front end for generation: a decoder LM captured over a static KV cache that the caller owns.

The captured graph is

    (input_ids [B, S], attention_mask [B, L], position_ids [B, S], cache_position [S], *kv) -> (logits [B, S, V],)

with ``kv`` = keys and values of every layer, ``[B, kv_heads, L, head_dim]`` each, in the model's dtype. It writes
the S new keys/values into ``kv`` in place at slots ``cache_position`` (``index_copy_``, as transformers'
``StaticCache`` and gpt-fast do) and attends over all L slots under a mask built from ``attention_mask`` (which
slots hold real tokens) and causality (slot <= the query's slot). Batch, S and L are dynamic, so the same graph
is the prefill step ``(B, S)`` and the one-token decode step ``(B, 1)``, and the runtime decides the cache
length and allocates (and reuses) the cache.

Why not transformers' own export path: ``TorchExportableModuleForDecoderOnlyLM`` (``integrations/executorch.py``)
registers a ``StaticCache`` of a fixed batch size as module buffers, tracks the fill level in a hidden
``cumulative_length`` tensor that the cache advances itself, and calls the model with ``attention_mask=None``:
no left padding, one batch size per export. Here the model still goes through transformers' cache interface
(its attention layers call ``cache.update(k, v, layer_idx)`` on a ``transformers.cache_utils.Cache``), but each
layer is a :class:`GraphInputCacheLayer` whose tensors are graph inputs written at explicit positions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from zqcompile.capture import _export, max_positions, model_dtype_and_device
from zqcompile.errors import ZQError

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids", "cache_position")
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face decoder with a language-model head (``...ForCausalLM``, ``GPT2LMHeadModel``)."""
    try:
        from transformers import GenerationMixin, PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel) and isinstance(model, GenerationMixin) and \
        not getattr(model.config, "is_encoder_decoder", False)


@dataclass(frozen=True)
class CacheLayout:
    """Shape of the KV cache: ``(kv_heads, key_dim, value_dim)`` per layer, in the model's dtype."""

    layers: tuple[tuple[int, int, int], ...]
    dtype: torch.dtype

    def allocate(self, batch: int, length: int, device: torch.device | str) -> list[torch.Tensor]:
        """Zeroed keys and values of every layer (the graph's ``kv`` inputs, in order)."""
        tensors = []
        for heads, key_dim, value_dim in self.layers:
            tensors.append(torch.zeros(batch, heads, length, key_dim, dtype=self.dtype, device=device))
            tensors.append(torch.zeros(batch, heads, length, value_dim, dtype=self.dtype, device=device))
        return tensors

    def bytes_per_slot(self) -> int:
        """Bytes of keys + values of one token of one sequence, all layers."""
        return sum(h * (k + v) for h, k, v in self.layers) * self.dtype.itemsize


DEFAULT_MAX_CACHE_LEN = 1024


@dataclass
class CachedCapture:
    graph_module: torch.fx.GraphModule
    layout: CacheLayout
    max_positions: int | None
    max_cache_len: int  # the slots per sequence generate will use (prompt + new tokens)
    device: torch.device


class GraphInputCacheLayer:
    """A transformers cache layer whose keys/values are given tensors ``[B, heads, L, dim]``, written in place at
    ``cache_position``; the model attends over all L slots (the mask says which are real)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache_position: torch.Tensor):
        self.keys, self.values, self.cache_position = keys, values, cache_position
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.cache_position, key_states)
        self.values.index_copy_(2, self.cache_position, value_states)
        return self.keys, self.values

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to allocate: the caller owns the tensors."""

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_seq_length(self) -> int:
        """Not tracked here (the caller passes positions and the mask); models only ask when given neither."""
        return 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]


def _cache_layer_class() -> type:
    from transformers.cache_utils import CacheLayerMixin

    # registered as a transformers cache layer (its abstract interface), implemented above
    return type("GraphInputCacheLayer", (GraphInputCacheLayer, CacheLayerMixin), {})


def cache_attention_mask(attention_mask: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, S, L]``: query i sees slot j when j holds a real token (``attention_mask[b, j]``) and
    ``j <= cache_position[i]``. Every query also sees its own slot, so a padding query still attends to something:
    a row of only masked slots gives NaN in fused attention kernels, and a NaN key in the cache would poison
    every later query through the masked scores."""
    slots = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    causal = slots[None, :] <= cache_position[:, None]
    own = slots[None, :] == cache_position[:, None]
    return (attention_mask.bool()[:, None, None, :] & causal) | own


class _CachedLMWrapper(nn.Module):
    """The model called with an explicit cache, positions and a 4-D mask (transformers uses a 4-D mask as given)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        accepted = inspect.signature(model.forward).parameters
        self.cache_keyword = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5.2x
        self.additive = model.config._attn_implementation == "eager"  # eager attention adds the mask
        self.dtype = dtype
        self.layer_class = _cache_layer_class()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache_position: torch.Tensor, *kv: torch.Tensor) -> tuple[torch.Tensor]:
        from transformers.cache_utils import Cache

        layers = [self.layer_class(kv[i], kv[i + 1], cache_position) for i in range(0, len(kv), 2)]
        mask = cache_attention_mask(attention_mask, cache_position)
        if self.additive:
            mask = torch.where(mask, 0.0, torch.finfo(self.dtype).min).to(self.dtype)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         **{self.cache_keyword: Cache(layers=layers)})
        return (out.logits,)


def cache_layout(model: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[CacheLayout, int | None]:
    """The cache each layer keeps, read from one eager step of the model on one token, and the shortest sliding
    window of its layers (Gemma-2/3, Mistral; None when every layer attends to all tokens)."""
    from transformers.cache_utils import Cache

    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=True)
    cache = next((v for v in out.values() if isinstance(v, Cache)), None)
    model_class = type(model).__name__
    if cache is None or not getattr(cache, "layers", None):
        raise ZQError(f"{model_class} returns no transformers Cache with use_cache=True; zqcompile generates with "
                      f"decoders that use one (GPT-2, Llama/SmolLM2, Qwen2): compile with generation=False")
    layers, windows = [], []
    for index, layer in enumerate(cache.layers):
        window = getattr(layer, "sliding_window", None) if getattr(layer, "is_sliding", False) else None
        if (getattr(layer, "is_sliding", False) and not isinstance(window, int)) or not hasattr(layer, "keys"):
            raise ZQError(f"{model_class} layer {index} keeps a {type(layer).__name__} cache (recurrent state or a "
                          f"window of unknown size); zqcompile's static cache covers full attention only: compile "
                          f"with generation=False")
        if window is not None:
            windows.append(window)
        layers.append((layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[-1]))
    return CacheLayout(tuple(layers), dtype), min(windows, default=None)


def example_inputs(layout: CacheLayout, device: torch.device | str, batch: int = 2, seq: int = 4,
                   length: int = 8) -> tuple[torch.Tensor, ...]:
    """Inputs to trace the cached graph with (sequence and cache lengths differ, so export keeps them apart)."""
    return (torch.zeros(batch, seq, dtype=torch.long, device=device),
            torch.ones(batch, length, dtype=torch.long, device=device),
            torch.arange(seq, device=device).expand(batch, seq).contiguous(),
            torch.arange(seq, device=device),
            *layout.allocate(batch, length, device))


def dynamic_shapes(layout: CacheLayout, max_positions: int | None) -> tuple[list[dict], list[dict]]:
    """The dynamic dims of (input_ids, attention_mask, position_ids, cache_position) and of the cache tensors:
    batch, sequence and cache length (at least 2: export specializes 0 and 1)."""
    batch = Dim("batch", min=1)
    seq, length = Dim.DYNAMIC(min=1, max=max_positions), Dim.DYNAMIC(min=2, max=max_positions)
    return ([{0: batch, 1: seq}, {0: batch, 1: length}, {0: batch, 1: seq}, {0: seq}],
            [{0: batch, 2: length} for _ in range(2 * len(layout.layers))])


def capture_static_cache(model: nn.Module, max_cache_len: int | None = None) -> CachedCapture:
    """Export ``model`` (an HF causal LM, in eval mode) as the cached step graph described in the module doc.

    ``max_cache_len``: the cache slots per sequence that generation will use; default the model's maximum positions,
    at most DEFAULT_MAX_CACHE_LEN and at most the shortest sliding window (Gemma-2/3: a cache within the window makes
    the sliding-window layers full-attention layers).
    """
    model_class = type(model).__name__
    if not is_causal_lm(model):
        raise ZQError(f"{model_class} is not a Hugging Face causal language model; generation needs a decoder with "
                      f"a language-model head (...ForCausalLM, GPT2LMHeadModel)")
    max_pos = max_positions(model.config)
    if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len < 2
                                      or (max_pos is not None and max_cache_len > max_pos)):
        raise ZQError(f"max_cache_len must be an integer from 2 to the model's {max_pos or 'maximum'} positions, got "
                      f"{max_cache_len!r}")
    implementation = model.config._attn_implementation
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ZQError(f"{model_class} uses attention implementation {implementation!r}; zqcompile captures "
                      f"{list(ATTENTION_IMPLEMENTATIONS)}: load it with attn_implementation='sdpa'")
    dtype, device = model_dtype_and_device(model)
    model.eval()
    layout, window = cache_layout(model, dtype, device)
    if max_cache_len is None:
        max_cache_len = min(max_pos or DEFAULT_MAX_CACHE_LEN, DEFAULT_MAX_CACHE_LEN, window or DEFAULT_MAX_CACHE_LEN)
    # A sliding-window layer attends to the last `window` slots; a cache no longer than the window holds no slot
    # outside it, so the full causal mask (the graph's mask) is that layer's mask too.
    if window is not None and max_cache_len > window:
        raise ZQError(f"{model_class} has sliding-window layers of {window} tokens, shorter than the KV cache of "
                      f"{max_cache_len} slots; zqcompile's static cache attends over every slot: compile with "
                      f"max_cache_len <= {window} (or generation=False)")
    args = example_inputs(layout, device)
    inputs, cache = dynamic_shapes(layout, max_pos)
    gm = _export(_CachedLMWrapper(model, dtype).eval(), args, (*inputs, tuple(cache)), model_class)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][len(INPUT_NAMES):]
    written = {n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.args and n.args[0] in placeholders
               and n.target in (torch.ops.aten.index_copy_.default, torch.ops.aten.copy_.default)}
    if len(written) != len(placeholders):
        raise ZQError(f"{model_class} did not write every layer's keys and values through its cache "
                      f"({len(written)} of {len(placeholders)} cache tensors written); compile with generation=False")
    return CachedCapture(gm, layout, max_pos, max_cache_len, device)
