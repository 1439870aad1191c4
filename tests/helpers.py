"""What the tests import: tiny random-weight models of each supported family, small numeric helpers, the
real-data directory, a runner for Triton kernels under Triton's interpreter, and the pieces the pass tests use to
build and run hand-made graphs.

The tiny models are real transformers architectures built from small configs (hidden 64, 2 layers, vocab
128) with fixed seeds, so they compile in about a second and their numbers are reproducible. Decoders have
``use_cache=False``, as zqcompile captures them, so the FP model returns the same output fields. Hidden 64 and
MLP width 128 are the smallest sizes the ``w4a8`` preset's input-dim groups of 64 divide.

Fixtures (``compiled_tiny``, ``data_dir``) live in conftest.py; everything a test module imports lives here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

TINY_VOCAB = 128
TINY_HIDDEN = 64
TINY_MLP = 128
TINY_MAX_POSITIONS = 32


def _seeded(build, seed: int = 0):
    torch.manual_seed(seed)
    return build().eval()


def tiny_bert_config():
    from transformers import BertConfig
    return BertConfig(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=TINY_MLP, max_position_embeddings=TINY_MAX_POSITIONS, num_labels=3)


def make_tiny_bert():
    from transformers import BertModel
    return _seeded(lambda: BertModel(tiny_bert_config()))


def make_tiny_bert_classifier():
    from transformers import BertForSequenceClassification
    return _seeded(lambda: BertForSequenceClassification(tiny_bert_config()), seed=1)


# The tiny decoders take keyword overrides of their config (more positions, special tokens, use_cache=True for
# generation tests); the weights depend only on the seed and the shapes.

def make_tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(**{**dict(vocab_size=TINY_VOCAB, n_embd=TINY_HIDDEN, n_layer=2, n_head=4, n_inner=TINY_MLP,
                                  n_positions=TINY_MAX_POSITIONS, bos_token_id=0, eos_token_id=0, use_cache=False),
                           **overrides})
    return _seeded(lambda: GPT2LMHeadModel(config), seed=2)


def _tiny_gqa_config(config_class, overrides: dict):
    """4 heads over 2 KV heads (grouped-query attention), rotary positions."""
    return config_class(**{**dict(vocab_size=TINY_VOCAB, hidden_size=TINY_HIDDEN, intermediate_size=TINY_MLP,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=TINY_MAX_POSITIONS, use_cache=False), **overrides})


def make_tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = _tiny_gqa_config(LlamaConfig, overrides)
    return _seeded(lambda: LlamaForCausalLM(config), seed=3)


def make_tiny_qwen2(**overrides):
    """Qwen2: biased q/k/v projections."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = _tiny_gqa_config(Qwen2Config, overrides)
    return _seeded(lambda: Qwen2ForCausalLM(config), seed=4)


class TinyMLP(torch.nn.Module):
    """A plain module: Linear -> GELU -> Linear -> LayerNorm -> Linear."""

    def __init__(self, width: int = TINY_HIDDEN):
        super().__init__()
        self.fc1 = torch.nn.Linear(width, 2 * width)
        self.fc2 = torch.nn.Linear(2 * width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.fc2(torch.nn.functional.gelu(self.fc1(x)))))


def make_tiny_mlp():
    return _seeded(TinyMLP, seed=5)


TINY_MODELS = {
    "bert": make_tiny_bert,
    "bert_classifier": make_tiny_bert_classifier,
    "gpt2": make_tiny_gpt2,
    "llama": make_tiny_llama,
    "qwen2": make_tiny_qwen2,
}


def token_batch(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_VOCAB, (batch, seq), generator=generator)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


# ---- hand-built graphs for the pass tests -------------------------------------------------------------------

def export_graph(module: torch.nn.Module, *example_inputs: torch.Tensor) -> torch.fx.GraphModule:
    """The captured (torch.export) graph of a small module, as the pipeline's first pass receives it."""
    from zqcompile.capture import capture
    return capture(module.eval(), example_inputs).graph_module


def pipeline_passes() -> list:
    from zqcompile.pipeline import PHASES
    return [fn for _, passes in PHASES for fn in passes]


def prepare_for(pass_fn, gm: torch.fx.GraphModule, recipe="w8a8"):
    """Run every pipeline pass that comes before ``pass_fn`` on ``gm``; returns (gm, context)."""
    from zqcompile.passes import CompileContext, run_passes
    from zqcompile.recipe import load_recipe
    passes = pipeline_passes()
    ctx = CompileContext(load_recipe(recipe))
    gm = run_passes(gm, ctx, passes[:passes.index(pass_fn)])
    return gm, ctx


def apply_pass(pass_fn, gm: torch.fx.GraphModule, ctx):
    """Run one pass the way the pass manager does (lint + recompile after it); returns its PassResult."""
    result = pass_fn(gm, ctx)
    result.graph_module.graph.lint()
    result.graph_module.recompile()
    return result


def count_ops(gm: torch.fx.GraphModule, *targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def op_targets(gm: torch.fx.GraphModule) -> list[str]:
    """The graph's call_function targets in order: equal lists mean an unchanged computation."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def key_padding_attention_inputs() -> tuple[torch.Tensor, ...]:
    """q, k, v [2, 3 heads, 5, 8] and a key-padding mask [2, 5] (the second row's last two keys masked)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]])
    return q, k, v, keep


def two_layer_attention_reference(q, k, v, keep) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + (0 | -inf) over the masked keys) v, then the same with its output as the query,
    in float64: what two SDPA calls sharing the key-padding mask ``keep`` compute."""
    q, k, v = q.double(), k.double(), v.double()
    bias = torch.zeros(keep.shape[0], 1, 1, keep.shape[1], dtype=torch.float64)
    bias = bias.masked_fill(~keep[:, None, None, :], float("-inf"))
    scale = q.shape[-1] ** 0.5
    h = torch.softmax(q @ k.transpose(-1, -2) / scale + bias, -1) @ v
    return torch.softmax(h @ k.transpose(-1, -2) / scale + bias, -1) @ v


def run_in_triton_interpreter(module: str, function: str, result: Path) -> dict:
    """``tests/<module>.py``'s ``function()`` run in a child process under Triton's interpreter (TRITON_INTERPRET=1
    must be set before Triton is first imported, so a test process cannot switch it on), its result through
    ``result`` (a torch.save file)."""
    tests = Path(__file__).resolve().parent
    code = f"import torch, {module} as t; torch.save(t.{function}(), {str(result)!r})"
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result)


def cuda_target_runs(qmodel, ctx_factory, batch: int = 2, seq: int = 8, cache_len: int = 16):
    """The cuda target phases of a compiled decoder's forward and generation graphs, run on the CPU (they are graph
    work): for each graph, ``(executed graph, its context, outputs of the compiled graph, outputs of the executed
    one, caches written by each)`` on the same tokens (a prefill of ``seq`` over a ``cache_len`` cache)."""
    from zqcompile.pipeline import run_target_phases
    ids = token_batch(batch, seq)
    generation = qmodel.generation
    cache_inputs = (ids, torch.ones(batch, cache_len, dtype=torch.long), torch.arange(seq).expand(batch, seq),
                    torch.arange(seq))
    runs = []
    for gm, inputs in ((qmodel.graph_module, qmodel.graph_inputs(ids, torch.ones_like(ids))),
                       (generation.graph_module, cache_inputs)):
        ctx = ctx_factory()
        executed = run_target_phases(gm, ctx, "cuda")
        caches = [() if gm is qmodel.graph_module else tuple(generation.layout.allocate(batch, cache_len, "cpu"))
                  for _ in range(2)]
        with torch.no_grad():
            expected, got = gm(*inputs, *caches[0]), executed(*inputs, *caches[1])
        runs.append((executed, ctx, expected, got, caches))
    return runs
