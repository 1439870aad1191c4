"""Tiny random-weight models of every Hugging Face family the coverage matrix covers (issue 17).

Each family is a real transformers architecture built from a small config (hidden 64, 2 layers, 4 heads, MLP
128, vocab 128, 32 positions) with a fixed seed, so the whole matrix compiles in well under a minute on two
CPU cores. Decoders are the ``*ForCausalLM`` classes with ``use_cache=False`` (as zqcompile captures them);
encoders are the bare ``*Model`` classes. ``tests/test_model_matrix.py`` checks every family and
``scripts/model_matrix.py`` writes the same rows into the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from helpers import TINY_HIDDEN, TINY_MAX_POSITIONS, TINY_MLP, TINY_VOCAB

LAYERS, HEADS = 2, 4
ENCODER_SIZES = dict(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=TINY_MLP, max_position_embeddings=TINY_MAX_POSITIONS)
DECODER_SIZES = dict(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=TINY_MLP,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                     max_position_embeddings=TINY_MAX_POSITIONS, use_cache=False)


@dataclass(frozen=True)
class Family:
    """One row of the matrix: its name, whether it is a decoder, and how to build its tiny model."""

    name: str
    decoder: bool
    config: Callable[[], object]
    model_class: str

    def build(self) -> torch.nn.Module:
        import transformers
        torch.manual_seed(sum(map(ord, self.name)))
        return getattr(transformers, self.model_class)(self.config()).eval()


def _config(name: str, **kwargs) -> Callable[[], object]:
    def make():
        import transformers
        return getattr(transformers, name)(**kwargs)
    return make


# RoBERTa-style encoders index positions from padding_idx + 1, so they need two more positions
ROBERTA = {**ENCODER_SIZES, "max_position_embeddings": TINY_MAX_POSITIONS + 2}

FAMILIES: tuple[Family, ...] = (
    Family("BERT", False, _config("BertConfig", **ENCODER_SIZES), "BertModel"),
    Family("RoBERTa", False, _config("RobertaConfig", **ROBERTA), "RobertaModel"),
    Family("XLM-RoBERTa", False, _config("XLMRobertaConfig", **ROBERTA), "XLMRobertaModel"),
    Family("DistilBERT", False, _config("DistilBertConfig", vocab_size=TINY_VOCAB, dim=TINY_HIDDEN, n_layers=LAYERS,
                                        n_heads=HEADS, hidden_dim=TINY_MLP, max_position_embeddings=TINY_MAX_POSITIONS),
           "DistilBertModel"),
    Family("MPNet", False, _config("MPNetConfig", **ROBERTA), "MPNetModel"),
    Family("DeBERTa-v2", False, _config("DebertaV2Config", **ENCODER_SIZES, relative_attention=True,
                                        position_buckets=16, pos_att_type=["p2c", "c2p"]), "DebertaV2Model"),
    Family("GPT-2", True, _config("GPT2Config", vocab_size=TINY_VOCAB, n_embd=TINY_HIDDEN, n_layer=LAYERS,
                                  n_head=HEADS, n_inner=TINY_MLP, n_positions=TINY_MAX_POSITIONS, use_cache=False),
           "GPT2LMHeadModel"),
    Family("GPT-J", True, _config("GPTJConfig", vocab_size=TINY_VOCAB, n_embd=TINY_HIDDEN, n_layer=LAYERS,
                                  n_head=HEADS, n_inner=TINY_MLP, rotary_dim=8, n_positions=TINY_MAX_POSITIONS,
                                  use_cache=False), "GPTJForCausalLM"),
    Family("GPT-NeoX", True, _config("GPTNeoXConfig", vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN,
                                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=TINY_MLP,
                                     max_position_embeddings=TINY_MAX_POSITIONS, use_cache=False),
           "GPTNeoXForCausalLM"),
    Family("OPT", True, _config("OPTConfig", vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, ffn_dim=TINY_MLP, word_embed_proj_dim=TINY_HIDDEN,
                                max_position_embeddings=TINY_MAX_POSITIONS, use_cache=False), "OPTForCausalLM"),
    Family("Llama", True, _config("LlamaConfig", **DECODER_SIZES), "LlamaForCausalLM"),
    Family("Mistral", True, _config("MistralConfig", **DECODER_SIZES, sliding_window=None), "MistralForCausalLM"),
    Family("Qwen2", True, _config("Qwen2Config", **DECODER_SIZES), "Qwen2ForCausalLM"),
    Family("Qwen3", True, _config("Qwen3Config", **DECODER_SIZES, head_dim=16), "Qwen3ForCausalLM"),
    Family("Gemma-2", True, _config("Gemma2Config", **DECODER_SIZES, head_dim=16), "Gemma2ForCausalLM"),
    Family("Gemma-3", True, _config("Gemma3TextConfig", **DECODER_SIZES, head_dim=16), "Gemma3ForCausalLM"),
    Family("Phi-3", True, _config("Phi3Config", **DECODER_SIZES, pad_token_id=0), "Phi3ForCausalLM"),
)
