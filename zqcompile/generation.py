"""Text generation with a compiled decoder: ``qmodel.generate(...)`` over a static KV cache.

``compile`` captures a decoder LM a second time, over an explicit KV cache (zqcompile.kv_cache), and runs the same
pipeline on that graph. The one cached graph is both the prefill step ``(B, S)`` and the one-token decode step
``(B, 1)`` (its batch, sequence and cache-length dims are dynamic), and it holds no tensor of its own: every
weight, scale and bias is the forward graph's tensor (:func:`share_tensors` checks they are bitwise equal before
pointing the cached graph at them), so the compiled model's memory stays that of one graph. On the cuda backend the
cached graph also gets ``CUDA_PHASES`` (its fused q/k/v weights become the forward graph's fused tensors) and the
decode runtime (zqcompile.runtime) replays it from CUDA graphs per batch bucket.

:meth:`Generator.generate` follows Hugging Face ``generate`` for the options it takes: prompts left-padded into one
batch (positions follow the attention mask: ``cumsum(mask) - 1``), greedy or sampled (temperature, then top-k,
then top-p), a row that emits EOS gets ``pad_token_id`` afterwards and the loop stops once every row has, the
prompt is returned in front of the new tokens, and a streamer receives ``put(prompt)``, ``put(tokens)`` per step and
``end()``, so ``transformers.TextStreamer`` prints the text as it comes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Collection, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from zqcompile.errors import ZQError
from zqcompile.kv_cache import CachedCapture, CacheLayout, example_inputs
from zqcompile.passes.infra import CompileContext, attr_tensor, replace_attr_tensor
from zqcompile.recipe import Recipe
from zqcompile.runtime import BATCH_BUCKETS, build_steps


def share_tensors(target: GraphModule, source: GraphModule) -> list[str]:
    """Point ``target``'s tensors at ``source``'s tensors of the same name when they are bitwise equal (shape,
    dtype and values); returns the names of the tensors ``target`` still holds on its own."""
    own = []
    for target_name in sorted({n.target for n in target.graph.nodes if n.op == "get_attr"}):
        mine = attr_tensor(target, target_name)
        try:
            theirs = attr_tensor(source, target_name)
        except AttributeError:
            own.append(target_name)
            continue
        if mine is theirs:
            continue
        same = isinstance(theirs, torch.Tensor) and theirs.shape == mine.shape and theirs.dtype == mine.dtype \
            and theirs.device == mine.device and torch.equal(theirs, mine)
        if same:
            replace_attr_tensor(target, target_name, theirs)
        else:
            own.append(target_name)
    return own


def cached_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: CacheLayout) -> tuple:
    """The cached graph's inputs for a whole-sequence forward (a fresh cache as long as the sequence): the same
    tokens, mask and positions ``0..S-1`` the forward graph sees."""
    batch, seq = input_ids.shape
    positions = torch.arange(seq, device=input_ids.device)
    return (input_ids, attention_mask, positions.expand(batch, seq).contiguous(), positions,
            *layout.allocate(batch, seq, input_ids.device))


def special_tokens(model: nn.Module) -> tuple[list[int] | None, int | None]:
    """The model's default (EOS ids, pad id) for generate, from its generation config as Hugging Face reads them."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    return ([eos] if isinstance(eos, int) else list(eos) if eos is not None else None), pad


class Generator:
    """A compiled decoder's generation path: the cached step graph, its decode runtime, and ``generate``."""

    def __init__(self, graph_module: GraphModule, executed_graph: GraphModule, context: CompileContext,
                 layout: CacheLayout, *, device: torch.device, max_cache_len: int, max_positions: int | None,
                 eos_token_id: list[int] | None, pad_token_id: int | None, cuda_graphs: bool,
                 own_tensors: Sequence[str] = ()):
        self.graph_module = graph_module  # the compiled cached graph: prefill (B, S) and decode (B, 1)
        self.executed_graph = executed_graph  # what runs: the graph, or its cuda rewrite
        self.context = context
        self.layout = layout
        self.device = device
        self.max_cache_len = max_cache_len
        self.max_positions = max_positions
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.own_tensors = list(own_tensors)  # tensors not shared with the forward graph (see share_tensors)
        self.steps = build_steps(executed_graph, layout, device, max_cache_len, cuda_graphs)

    # ---- saving ---------------------------------------------------------------------------------------
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """Example inputs of the cached graph (tokens, mask, positions, an empty cache): what zqcompile.serialize
        saves beside it."""
        return example_inputs(self.layout, self.device)

    def manifest(self) -> dict[str, Any]:
        """What :func:`restore` needs besides the graph and its tensors (JSON)."""
        return {"layers": [list(layer) for layer in self.layout.layers], "max_cache_len": self.max_cache_len,
                "max_positions": self.max_positions, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id}

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (0 without CUDA graphs)."""
        return self.steps.captures

    def warmup(self, batch_sizes: Sequence[int] = BATCH_BUCKETS, prompt_lens: Sequence[int] = (128,),
               max_new_tokens: int = 1) -> None:
        """Capture the decode step of each batch bucket of ``batch_sizes`` and the prefill of each (batch bucket,
        prompt-length bucket), so that generations of those sizes capture and autotune nothing (cuda backend with
        CUDA graphs; elsewhere nothing to do). ``max_new_tokens``: the fewest new tokens the prompt-length buckets
        must leave room for in the cache."""
        if not hasattr(self.steps, "warmup"):
            return
        too_long = [n for n in prompt_lens if n + max_new_tokens > self.max_cache_len]
        if too_long or not prompt_lens or not batch_sizes or min(batch_sizes) < 1:
            raise ZQError(f"warmup needs batch sizes >= 1 and prompt lengths that leave {max_new_tokens} new tokens "
                          f"in the cache of {self.max_cache_len} slots; got batch_sizes={list(batch_sizes)}, "
                          f"prompt_lens={list(prompt_lens)}")
        self.steps.warmup(batch_sizes, prompt_lens, max_new_tokens)

    # ---- generate -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, streamer: Any = None, seed: int | None = None) -> torch.Tensor:
        mask = self._check(input_ids, attention_mask, max_new_tokens)
        _check_sampling(do_sample, temperature, top_k, top_p)
        eos = self.eos_token_id if eos_token_id is None else \
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self.pad_token_id
        if pad is None and eos:
            pad = eos[0]  # what Hugging Face generate does
        eos_ids = torch.tensor(eos or [], dtype=torch.long, device=self.device)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)

        positions = mask.cumsum(-1) - 1
        positions.masked_fill_(mask == 0, 1)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits = self.steps.prefill(input_ids, mask, positions, max_new_tokens)
        next_position = positions[:, -1] + 1
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=self.device)
        new_tokens = []
        for step in range(max_new_tokens):
            tokens = _choose(logits, do_sample, temperature, top_k, top_p, generator)
            if eos:
                tokens = torch.where(unfinished, tokens, pad)
                unfinished &= ~torch.isin(tokens, eos_ids)
            new_tokens.append(tokens)
            if streamer is not None:
                streamer.put(tokens.cpu())
            if step == max_new_tokens - 1 or (eos and not bool(unfinished.any())):
                break
            logits = self.steps.decode(tokens, next_position)
            next_position = next_position + 1
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, torch.stack(new_tokens, 1)], 1)

    def _check(self, input_ids: torch.Tensor, attention_mask: Any, max_new_tokens: Any) -> torch.Tensor:
        """The attention mask (ones if not given) after checking it and max_new_tokens against the prompt;
        ``input_ids`` were checked by QuantizedModel.check_token_ids (the forward's checks). A ZQError names what
        is wrong."""
        seq = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ZQError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got "
                          f"{tuple(getattr(attention_mask, 'shape', ()))}")
        mask = attention_mask.to(device=self.device, dtype=torch.long)
        if not bool((mask[:, -1] == 1).all()):
            empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
            if empty:
                raise ZQError(f"prompt rows {empty} are empty (attention_mask all zero); give every row at least "
                              f"one token")
            raise ZQError("the prompts are right-padded (the last column of attention_mask has zeros); decoders "
                          "continue from the last position: pad on the left (tokenizer.padding_side = 'left')")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ZQError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if seq + max_new_tokens > self.max_cache_len:
            raise ZQError(f"{seq} prompt tokens + max_new_tokens={max_new_tokens} exceed the KV cache of "
                          f"{self.max_cache_len} slots; ask for at most {max(self.max_cache_len - seq, 0)} new tokens, "
                          f"or compile with a larger max_cache_len (up to the model's "
                          f"{self.max_positions or 'maximum'} positions)")
        return mask


def _check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not do_sample:
        return
    if not temperature > 0:
        raise ZQError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ZQError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ZQError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
            generator: torch.Generator | None) -> torch.Tensor:
    """The next token of every row: argmax, or a sample after temperature, top-k and top-p (Hugging Face's order)."""
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = scores.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        # drop a token when the more likely ones already reach top_p (the most likely one always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


def restore(graph_module: GraphModule, manifest: dict[str, Any], *, recipe: Recipe, dtype: torch.dtype,
            device: torch.device, backend: str, forward_executed: GraphModule) -> Generator:
    """A :class:`Generator` around a loaded cached graph (its tensors already the forward graph's)."""
    from zqcompile.pipeline import run_target_phases

    ctx = CompileContext(recipe)
    executed = run_target_phases(graph_module, ctx, backend)
    if executed is not graph_module:
        share_tensors(executed, forward_executed)
    layout = CacheLayout(tuple(tuple(layer) for layer in manifest["layers"]), dtype)
    return Generator(graph_module, executed, ctx, layout, device=device, max_cache_len=manifest["max_cache_len"],
                     max_positions=manifest["max_positions"], eos_token_id=manifest["eos_token_id"],
                     pad_token_id=manifest["pad_token_id"], cuda_graphs=backend == "cuda")


# ---- compile ------------------------------------------------------------------------------------------

def compile_generation(captured: CachedCapture, forward_graph: GraphModule, forward_executed: GraphModule,
                       recipe: Recipe, *, backend: str, cuda_graphs: bool | None, model: nn.Module,
                       calibration_inputs: Sequence[tuple[torch.Tensor, ...]] = (),
                       target_passes: Collection[str] | None = None,
                       dump_dir: str | os.PathLike | None = None, lkd_result: Any = None) -> Generator:
    """Run the pipeline on the cached graph (``captured``, LKD weights already in it), share its tensors with the
    compiled forward graph, and wrap it in a :class:`Generator`. ``target_passes`` as for the forward graph."""
    from zqcompile.pipeline import run_pipeline

    calibration = [cached_inputs(inputs[0], inputs[1], captured.layout) for inputs in calibration_inputs]
    dump = dump_dir or os.environ.get("ZQ_DUMP_DIR")
    # the same recipe and source model as the forward graph: LKD (seeded, or the forward graph's ``lkd_result``
    # where it distilled the graph) and rounding give the same tensors, which share_tensors then replaces by the
    # forward graph's
    result = run_pipeline(captured.graph_module, recipe, target=backend, target_passes=target_passes,
                          dump_dir=Path(dump) / "generation" if dump else None, calibration_inputs=calibration,
                          source_model=model, lkd_result=lkd_result)
    gm, executed, ctx = result.compiled, result.executed, result.context
    own = share_tensors(gm, forward_graph)
    if executed is not gm:  # its fused q/k/v concatenations, and the references it took from gm before sharing
        own += share_tensors(executed, forward_executed)
    eos, pad = special_tokens(model)
    return Generator(gm, executed, ctx, captured.layout, device=captured.device,
                     max_cache_len=captured.max_cache_len, max_positions=captured.max_positions,
                     eos_token_id=eos, pad_token_id=pad, cuda_graphs=backend == "cuda" and cuda_graphs is not False,
                     own_tensors=own)
