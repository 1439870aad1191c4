"""The model-coverage matrix: tiny random-weight models of the Hugging Face families users run, what zqcompile
does with each (capture, roles, fusion share, W8A8 agreement, save -> load), and the README table of it.

Each family is a real transformers architecture built from a small config (hidden 64, 2 layers, 4 heads, MLP 128,
vocab 128, 32 positions) with a fixed seed. Decoders are the ``*ForCausalLM`` classes with ``use_cache=False`` (as
zqcompile captures them), encoders the bare ``*Model`` classes. ``tests/test_model_matrix.py`` asserts every cell
and that the README's table is :func:`render` of these rows; ``scripts/model_matrix.py`` writes it there.

Each family compiles twice at most: W8A8 for the forward path (``generation=False``), and, for a decoder, every
linear kept in floating point with the generation graph, whose greedy ``generate`` on left-padded prompts of four
lengths must be token-identical to Hugging Face ``generate`` of the same FP32 model.

Fusion share: of the activation quantizations whose input an elementwise op computes (everything but the
attention output, which SDPA / the attention matmuls produce and no elementwise kernel precedes), the share folded
into that op (a norm, a residual add + norm, an activation, a per-token factor after one of these) or, for a stored
tensor's, computed once ahead of time.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import Node

import zqcompile
from helpers import TINY_HIDDEN, TINY_MAX_POSITIONS, TINY_MLP, TINY_VOCAB, cosine, token_batch
from test_generation import FP_KEPT, left_padded
from zqcompile.inspection import linear_rows
from zqcompile.ops import ACTIVATION_QUANT_OPS
from zqcompile.passes.annotate_roles import ATTENTION_OPS
from zqcompile.passes.infra import META_ROLE, is_op
from zqcompile.passes.patterns import through_layout

LAYERS, HEADS = 2, 4
ENCODER_SIZES = dict(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=TINY_MLP, max_position_embeddings=TINY_MAX_POSITIONS)
DECODER_SIZES = dict(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=TINY_MLP,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                     max_position_embeddings=TINY_MAX_POSITIONS, use_cache=False)


@dataclass(frozen=True)
class Family:
    """One row of the matrix: its name, its kind (encoder, decoder, encoder-decoder), how to build its tiny model."""

    name: str
    kind: str
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
    Family("BERT", "encoder", _config("BertConfig", **ENCODER_SIZES), "BertModel"),
    Family("RoBERTa", "encoder", _config("RobertaConfig", **ROBERTA), "RobertaModel"),
    Family("XLM-RoBERTa", "encoder", _config("XLMRobertaConfig", **ROBERTA), "XLMRobertaModel"),
    Family("DistilBERT", "encoder", _config("DistilBertConfig", vocab_size=TINY_VOCAB, dim=TINY_HIDDEN, n_layers=LAYERS,
                                        n_heads=HEADS, hidden_dim=TINY_MLP, max_position_embeddings=TINY_MAX_POSITIONS),
           "DistilBertModel"),
    Family("MPNet", "encoder", _config("MPNetConfig", **ROBERTA), "MPNetModel"),
    Family("DeBERTa-v2", "encoder", _config("DebertaV2Config", **ENCODER_SIZES, relative_attention=True,
                                        position_buckets=16, pos_att_type=["p2c", "c2p"]), "DebertaV2Model"),
    Family("GPT-2", "decoder", _config("GPT2Config", vocab_size=TINY_VOCAB, n_embd=TINY_HIDDEN, n_layer=LAYERS,
                                  n_head=HEADS, n_inner=TINY_MLP, n_positions=TINY_MAX_POSITIONS, use_cache=False),
           "GPT2LMHeadModel"),
    Family("GPT-J", "decoder", _config("GPTJConfig", vocab_size=TINY_VOCAB, n_embd=TINY_HIDDEN, n_layer=LAYERS,
                                  n_head=HEADS, n_inner=TINY_MLP, rotary_dim=8, n_positions=TINY_MAX_POSITIONS,
                                  use_cache=False), "GPTJForCausalLM"),
    Family("GPT-NeoX", "decoder", _config("GPTNeoXConfig", vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN,
                                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=TINY_MLP,
                                     max_position_embeddings=TINY_MAX_POSITIONS, use_cache=False),
           "GPTNeoXForCausalLM"),
    Family("OPT", "decoder", _config("OPTConfig", vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, ffn_dim=TINY_MLP, word_embed_proj_dim=TINY_HIDDEN,
                                max_position_embeddings=TINY_MAX_POSITIONS, use_cache=False), "OPTForCausalLM"),
    Family("Llama", "decoder", _config("LlamaConfig", **DECODER_SIZES), "LlamaForCausalLM"),
    Family("Mistral", "decoder", _config("MistralConfig", **DECODER_SIZES, sliding_window=None), "MistralForCausalLM"),
    Family("Qwen2", "decoder", _config("Qwen2Config", **DECODER_SIZES), "Qwen2ForCausalLM"),
    Family("Qwen3", "decoder", _config("Qwen3Config", **DECODER_SIZES, head_dim=16), "Qwen3ForCausalLM"),
    Family("Gemma-2", "decoder", _config("Gemma2Config", **DECODER_SIZES, head_dim=16), "Gemma2ForCausalLM"),
    Family("Gemma-3", "decoder", _config("Gemma3TextConfig", **DECODER_SIZES, head_dim=16), "Gemma3ForCausalLM"),
    Family("Phi-3", "decoder", _config("Phi3Config", **DECODER_SIZES, pad_token_id=0), "Phi3ForCausalLM"),
)

UNSUPPORTED: tuple[Family, ...] = (
    Family("T5", "encoder-decoder", _config("T5Config", vocab_size=TINY_VOCAB, d_model=TINY_HIDDEN, d_kv=16,
                                                 d_ff=TINY_MLP, num_layers=LAYERS, num_heads=HEADS),
           "T5ForConditionalGeneration"),
)

# the families whose fusion share is below 100%, and why (the pass's own reasons are listed under the table too)
EXPLAINED_UNFUSED: dict[str, str] = {}
MIN_COSINE = 0.999  # W8A8 vs FP over all logits / hidden states; every family measures >= 0.9996
PROMPT_LENGTHS, NEW_TOKENS = [5, 9, 2, 7], 16  # 9 + 16 tokens fit the tiny models' 32 positions


@dataclass(frozen=True)
class Row:
    """What the matrix found for one family; ``error`` is the ZQError of a family zqcompile refuses."""

    family: str
    kind: str
    error: str | None = None
    other_roles: tuple[str, ...] = ()  # attention / MLP linears no role fits
    roles: tuple[tuple[str, int], ...] = ()  # role: number of linears
    fused: int = 0
    unfused: tuple[str, ...] = ()  # why each quantization an elementwise op computes was not fused
    attention_outputs: int = 0  # quantizations of the attention output (nothing to fuse into)
    cosine: float = math.nan
    round_trip: bool = False
    # decoders: greedy generate equals HF's ("✓"), or why not (a ZQError's message, or the first differing token)
    generate: str | None = None
    fused_into: tuple[str, ...] = ()  # what `inspect` says each quantized linear's input quantization is fused into

    @property
    def fusion_share(self) -> float:
        return self.fused / (self.fused + len(self.unfused)) if self.fused + len(self.unfused) else 1.0


def _quant_points(gm: torch.fx.GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ACTIVATION_QUANT_OPS]


def generate_like_hf(model: torch.nn.Module) -> str:
    """Compile ``model`` with every linear in floating point and its generation graph; "✓" when its greedy
    ``generate`` is token-identical to Hugging Face's, else the reason (the ZQError, or where the tokens part)."""
    try:
        qmodel = zqcompile.compile(model, FP_KEPT, generation=True)
    except zqcompile.ZQError as err:
        return f"`ZQError`: {str(err).split(';')[0]}"
    ids, mask = left_padded(PROMPT_LENGTHS)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    got = qmodel.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    if got.shape == expected.shape and torch.equal(got, expected) and got.shape[1] > ids.shape[1]:
        return "✓"
    if got.shape != expected.shape:
        return f"{got.shape[1]} tokens, HF {expected.shape[1]}"
    row, column = (got != expected).nonzero()[0].tolist()
    return f"tokens differ from HF at row {row}, position {column}"


def measure(family: Family) -> Row:
    """Compile the family's tiny model to W8A8 and fill its row (the ZQError's message when it is refused)."""
    model = family.build()
    try:
        qmodel = zqcompile.compile(model, "w8a8", generation=False)
    except zqcompile.ZQError as err:
        return Row(family.name, family.kind, error=str(err).split(";")[0])
    gm, quant = qmodel.graph_module, torch.ops.zq.quantize_per_token.default
    roles = Counter(n.meta[META_ROLE] for n in gm.graph.nodes if META_ROLE in n.meta)
    other = tuple(n.meta["zq_module"] for n in gm.graph.nodes if n.meta.get(META_ROLE) == "other")
    standalone = [n for n in _quant_points(gm) if n.target is quant]
    attention = [n for n in standalone if is_op(through_layout(n.args[0]), *ATTENTION_OPS)]
    unfused = tuple(qmodel.context.unfused_reasons.get(n.name, "?") for n in standalone if n not in attention)
    ids = token_batch(2, 11, seed=len(family.name))
    with torch.no_grad():
        expected, out = model(input_ids=ids)[0], qmodel(input_ids=ids)[0]
        with tempfile.TemporaryDirectory() as directory:
            qmodel.save(directory)
            loaded = zqcompile.load(directory)(input_ids=ids)[0]
    precomputed = qmodel.context.counters.get("fuse.stored", 0)  # a constant's quantization, now stored tensors
    return Row(family.name, family.kind, None, other, tuple(sorted(roles.items())),
               len(_quant_points(gm)) - len(standalone) + precomputed, unfused, len(attention), cosine(out, expected),
               torch.equal(loaded, out), generate_like_hf(model) if family.kind == "decoder" else None,
               tuple(row.fused_into for row in linear_rows(gm, qmodel.context.unfused_reasons)))


def _cells(row: Row) -> list[str]:
    if row.error is not None:
        return [row.family, row.kind, f"✗ `ZQError`: {row.error}", "", "", "", "", ""]
    roles = "✓" if not row.other_roles else f"✗ `other`: {', '.join(row.other_roles)}"
    share = f"{math.floor(row.fusion_share * 100):d}% ({row.fused} of {row.fused + len(row.unfused)})"
    fusion = ("✓ " if not row.unfused else "✗ ") + share
    agreement = ("✓" if row.cosine >= MIN_COSINE else "✗") + f" cos {math.floor(row.cosine * 1000) / 1000:.3f}"
    generate = "n/a" if row.generate is None else row.generate if row.generate == "✓" else f"✗ {row.generate}"
    return [row.family, row.kind, "✓", roles, fusion, agreement, "✓" if row.round_trip else "✗", generate]


HEADER = ["family", "kind", "capture", "roles", "fusion share", f"W8A8 vs FP (cos ≥ {MIN_COSINE})",
          "save → load", "greedy generate = HF (linears kept FP)"]


def render(rows: list[Row]) -> str:
    """The README's markdown table (one line per family), and under it the reasons of every ✗."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    notes = [f"- {row.family}: {EXPLAINED_UNFUSED.get(row.family, '(not explained)')} ("
             + "; ".join(sorted(set(row.unfused))) + ")" for row in rows if row.unfused]
    return "\n".join(lines + (["", "Not fused:", *notes] if notes else []))


def all_families() -> tuple[Family, ...]:
    return FAMILIES + UNSUPPORTED


README_START, README_END = "<!-- model-matrix:start (scripts/model_matrix.py) -->", "<!-- model-matrix:end -->"


def readme_section(readme: str) -> str:
    """The text between the matrix markers of the README."""
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    return readme[start:end].strip("\n")
