"""Accuracy of zqcompile's recipes on real models and real text (the issue's table; results in ACCURACY.md).

- SmolLM2-135M-Instruct (a 30-layer Llama decoder): perplexity on the first ``--tokens`` (16,384) tokens of
  every text in ``--texts`` of ``../shared/data`` (default: Jane Austen's *Persuasion* and the WSJ sample;
  ``lee_background.txt`` fits too), non-overlapping windows of ``--window`` (512) tokens; per text the change
  against FP32 with a 95% paired bootstrap interval over the windows, and the mean change over the texts
  (stratified bootstrap). No recipe constant is chosen on these texts: each row names the data its constants
  came from;
- all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder): mean cosine of the sentence embeddings against
  FP32 (on the Lee-50 documents and the probe sentences), Spearman correlation of embedding cosines with
  the Lee et al. human similarity judgments (50 documents, 1,225 pairs), and the test accuracy of a
  logistic-regression probe on frozen embeddings of movie-review sentences (``rt_polarity_4000.json``);
- for FP32 and each configuration: weight memory of the quantized linear layers in MB and as a fraction of the
  same weights in FP16.

Every perplexity is cached as JSON under ``--out``/perplexity_cache, keyed by configuration, text, tokens and
window, so configurations can run in separate processes (the FP32 reference is computed once). LKD runs with
its defaults (self-generated text for the decoder, random token ids for the encoder) unless ``--lkd-steps`` /
``--lkd-samples`` say otherwise. Usage::

    OMP_NUM_THREADS=1 python benchmarks/accuracy.py [--tokens 16384] [--window 512] [--probe-sentences 2000]
        [--models smollm2,minilm] [--configs W8A8,W8A8-rot,...] [--texts austen_persuasion.txt,...] [--out DIR]

Results go to ``--out`` (default ``$OUT``, else the git-ignored benchmarks/results/) as ``accuracy.json`` and
``accuracy.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import zqcompile
from zqcompile.evaluate import (
    EVAL_TOKENS, EVAL_WINDOW, Perplexity, bootstrap_change, load_lee50, logistic_probe_accuracy, mean_cosine,
    sentence_embeddings, similarity_spearman, text_perplexity,
)
from common import Results, default_out_dir, table
from zqcompile.pretrained import MINILM, SMOLLM2, data_dir, load_pretrained

MB = 2 ** 20
TEXTS = ("austen_persuasion.txt", "wsj_ptb_1000.txt")  # lee_background.txt (75k tokens) fits too: --texts


@dataclass
class Row:
    model: str
    config: str
    metrics: dict[str, float]
    weight_mb: float  # the quantized linear layers' weights (FP32 row: the same layers in FP32)
    ratio_fp16: float
    seconds: float  # compile (+ LKD) time
    notes: dict = field(default_factory=dict)


SELF_DATA_SHORT = "4,096 self-generated tokens"
SELF_DATA = "Hessians / activation statistics: " + SELF_DATA_SHORT + " (LKD's data='auto')"


@dataclass(frozen=True)
class Config:
    label: str
    recipe: str | dict  # a preset name or the recipe a user would type (JSON/YAML keys)
    lkd: bool
    constants: str  # which constants the recipe uses and the data they were chosen on (never an evaluation text)
    budget: float | None = None  # recipe "auto" only


CONFIG_TABLE = (
    Config("W8A8", "w8a8", False, "none (weight scales: absmax; activation scales: per token at run time)"),
    Config("W8A8-smooth", "w8a8-smooth", False,
           "alpha 0.7: chosen on Austen + WSJ perplexity (evaluation texts; see the note)"),
    Config("W8A8-rot", "w8a8-rot", False, "none (rotation: fixed seed, never tuned)"),
    Config("W8A8-smooth-rot", "w8a8-smooth-rot", False,
           "as W8A8-smooth (alpha 0.7, random-token calibration); rotation: fixed seed, never tuned"),
    Config("W4A8-PTQ", "w4a8", False, "INT4 MLP groups of 64: ZeroQuant's setting, not tuned"),
    Config("W4A8-rot", "w4a8-rot", False, "as W4A8-PTQ; rotation: fixed seed, never tuned"),
    Config("W4A8-LKD", "w4a8", True, "LKD on the model's own samples (4,096 tokens); lr/steps: LKD defaults"),
    Config("AUTO-1%", "auto", False, "per-linear kinds: chosen on 512 self-generated tokens (budget 1%)", 0.01),
    Config("W8A16", "w8a16", False, "none"),
    Config("W4A16", "w4a16", False, "groups of 64, not tuned"),
    # asymmetric INT4 (issue 18): groups of 32, the block of the Q4_1 GGUF SmolLM2's weights come from
    Config("W4A16-asym", "w4a16-asym", False, "asymmetric groups of 32 (the GGUF's Q4_1 block), not tuned"),
    Config("W4A8-asym", "w4a8-asym", False, "INT4 MLP: asymmetric groups of 32 (the GGUF's Q4_1 block), not tuned"),
    # the survey's methods (issue 18): GPTQ/AWQ/LoRC/LLM.int8() calibrate on 4,096 tokens SmolLM2 samples itself
    Config("W4A16-GPTQ", {"base": "w4a16", "weight_rounding": "gptq"}, False, SELF_DATA),
    Config("W4A16-AWQ", {"base": "w4a16", "weight_rounding": "awq"}, False, SELF_DATA + "; AWQ's alpha grid"),
    Config("W4A16-asym-GPTQ", {"base": "w4a16-asym", "weight_rounding": "gptq"}, False,
           SELF_DATA + "; asymmetric groups of 32 (the GGUF's Q4_1 block), not tuned"),
    Config("W4A16-AWQ-asym", {"base": "w4a16-asym", "weight_rounding": "awq"}, False,
           SELF_DATA + "; AWQ's alpha grid; asymmetric groups of 32 (the GGUF's Q4_1 block), not tuned"),
    Config("W4A8-GPTQ", {"base": "w4a8", "weight_rounding": "gptq"}, False, SELF_DATA),
    Config("W4A8-rot-GPTQ", {"base": "w4a8-rot", "weight_rounding": "gptq"}, False,
           SELF_DATA + "; rotation: fixed seed"),
    Config("W4A8-rot-LoRC8", {"base": "w4a8-rot", "lorc_rank": 8}, False,
           "rank 8 (ZeroQuant-V2's value, not tuned); rotation: fixed seed"),
    Config("W4A8-LoRC8", {"base": "w4a8", "lorc_rank": 8}, False, "rank 8 (ZeroQuant-V2's value, not tuned)"),
    Config("W4A8-GPTQ-smooth", {"base": "w4a8", "weight_rounding": "gptq", "smooth_alpha": 0.7}, False,
           SELF_DATA + "; smoothing alpha 0.7 (w8a8-smooth's, chosen on the older protocol's texts: in-sample)"),
    Config("W8A8-int8dec", {"base": "w8a8", "outlier_threshold": 6.0}, False,
           "threshold 6.0 (LLM.int8()'s value, not tuned); outlier columns: absmax on " + SELF_DATA_SHORT),
    Config("W4A8-rot-GPTQ-LKD", {"base": "w4a8-rot", "weight_rounding": "gptq"}, True,
           SELF_DATA + "; LKD on the same self-generated tokens (defaults), after the rotation; rotation: fixed seed"),
    Config("W4A8-rot-LKD", "w4a8-rot", True, "LKD on the model's own samples (4,096 tokens), after the rotation; "
           "lr/steps: LKD defaults; rotation: fixed seed"),
    # the rest of issue 18's ablation: each method alone, with LKD, on the asymmetric grid
    Config("W4A8-AWQ", {"base": "w4a8", "weight_rounding": "awq"}, False, SELF_DATA + "; AWQ's alpha grid"),
    Config("W4A8-GPTQ-LKD", {"base": "w4a8", "weight_rounding": "gptq"}, True,
           SELF_DATA + "; LKD on the same self-generated tokens (defaults), then GPTQ rounds the distilled weights"),
    Config("W4A8-AWQ-LKD", {"base": "w4a8", "weight_rounding": "awq"}, True,
           SELF_DATA + "; AWQ's alpha grid; LKD on the same self-generated tokens (defaults), then AWQ scales"),
    Config("W4A8-rot-AWQ", {"base": "w4a8-rot", "weight_rounding": "awq"}, False,
           SELF_DATA + "; AWQ's alpha grid, on the rotated model (rotation: fixed seed, never tuned)"),
    Config("W4A8-LoRC8-LKD", {"base": "w4a8", "lorc_rank": 8}, True,
           "rank 8 (ZeroQuant-V2's value, not tuned); LKD on 4,096 self-generated tokens (defaults)"),
    Config("W4A8-asym-GPTQ", {"base": "w4a8-asym", "weight_rounding": "gptq"}, False,
           SELF_DATA + "; asymmetric groups of 32 (the GGUF's Q4_1 block), not tuned"),
    Config("W4A8-asym-AWQ", {"base": "w4a8-asym", "weight_rounding": "awq"}, False,
           SELF_DATA + "; AWQ's alpha grid; asymmetric groups of 32 (the GGUF's Q4_1 block), not tuned"),
    # the best symmetric W4A8 combination (rotation + GPTQ) with LoRC correcting GPTQ's stored rounding
    Config("W4A8-rot-GPTQ-LoRC8", {"base": "w4a8-rot", "weight_rounding": "gptq", "lorc_rank": 8}, False,
           SELF_DATA + " (as W4A8-rot-GPTQ); LoRC rank 8 (ZeroQuant-V2's value, not tuned); rotation: fixed seed"),
)
CONFIGS = tuple(c.label for c in CONFIG_TABLE)


def configurations(wanted: str) -> list[Config]:
    """The configurations named in the comma-separated ``wanted``."""
    names = wanted.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    return [c for c in CONFIG_TABLE if c.label in names]


def compile_row(model: torch.nn.Module, config: Config, lkd: zqcompile.LKDConfig):
    started = time.perf_counter()
    # the forward graph only: perplexity needs no KV-cache graph, whose compile repeats the calibrated passes
    compiled = zqcompile.compile(model, config.recipe, lkd=lkd if config.lkd else None, budget=config.budget,
                                 generation=False)
    return compiled, time.perf_counter() - started


def lkd_notes(compiled) -> dict:
    result = compiled.lkd_result
    if result is None or not result.blocks:
        return {}
    ratios = [b.mse_lkd / b.mse_ptq for b in result.blocks]
    return {"lkd_seconds": round(result.seconds, 1), "lkd_data": result.data_source, "lkd_tokens": result.tokens,
            "lkd_peak_memory_mb": round(result.peak_memory_mb), "lkd_held_memory_mb": round(result.held_memory_mb),
            "lkd_block_mse_ratio_mean": round(sum(ratios) / len(ratios), 3),
            "lkd_block_mse_ratio_max": round(max(ratios), 3)}


def gptq_notes(compiled) -> dict:
    """How many linears GPTQ rounded and how many of them kept act-order (its per-layer choice, on calibration data)."""
    counters = compiled.context.counters
    if not counters.get("gptq.rounded"):
        return {}
    return {"gptq_layers": counters["gptq.rounded"], "gptq_act_order_layers": counters.get("gptq.act_order", 0)}


def recipe_rows(name: str, model: torch.nn.Module, reference: dict[str, float],
                metrics_of: Callable[[Any, str], dict[str, float]], args: argparse.Namespace,
                lkd: zqcompile.LKDConfig) -> list[Row]:
    """The FP32 row (``reference``) and one row per configuration, scored by ``metrics_of(compiled, label)``."""
    print(f"{name} FP32: {reference}", flush=True)
    rows, fp32_mb = [], float("nan")
    for config in configurations(args.configs):
        compiled, seconds = compile_row(model, config, lkd)
        peak_rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MB; one config per process
        if config.lkd:
            print(compiled.lkd_result, flush=True)
        metrics = metrics_of(compiled, config.label)
        memory = compiled.weight_memory()
        rows.append(Row(name, config.label, metrics, memory.quantized_after / MB, memory.ratio_vs_fp16, seconds,
                        {"constants": config.constants, "recipe": config.recipe, "peak_rss_mb": peak_rss,
                         **lkd_notes(compiled), **gptq_notes(compiled)}))
        print(f"{name} {config.label}: {metrics}, {memory} ({seconds:.0f} s) {gptq_notes(compiled)}", flush=True)
        if compiled.recipe.auto:
            print(zqcompile.inspect(compiled, code=False), flush=True)
        fp32_mb = memory.quantized_before / MB
        del compiled
    return [Row(name, "FP32", reference, fp32_mb, 2.0, 0.0)] + rows


class PerplexityCache:
    """Perplexities (with their per-window scores) as JSON files, one per (configuration, text, tokens, window)."""

    def __init__(self, folder: Path, tokens: int, window: int):
        self.folder, self.tokens, self.window = folder, tokens, window
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, config: str, text: str) -> Path:
        return self.folder / f"{SMOLLM2}.{config}.{Path(text).stem}.{self.tokens}.{self.window}.json"

    def get(self, config: str, text: str) -> Perplexity | None:
        path = self.path(config, text)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return Perplexity(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def put(self, config: str, text: str, result: Perplexity) -> None:
        self.path(config, text).write_text(json.dumps(dataclasses.asdict(result)))


def decoder_rows(args: argparse.Namespace, lkd: zqcompile.LKDConfig) -> tuple[list[Row], str]:
    model, tokenizer = load_pretrained(SMOLLM2)
    texts = {name: (data_dir() / name).read_text() for name in args.texts.split(",")}
    cache = PerplexityCache(args.out / "perplexity_cache", args.tokens, args.window)

    def scores(label: str, m) -> dict[str, Perplexity]:
        results = {}
        for name, text in texts.items():
            results[name] = cache.get(label, name)
            if results[name] is None:
                results[name] = text_perplexity(m, tokenizer, text, args.tokens, args.window)
                cache.put(label, name, results[name])
            print(f"  {label} {name}: {results[name]}", flush=True)
        return results

    fp = scores("FP32", model)

    def metrics_of(compiled, label: str) -> dict[str, float]:
        quantized = scores(label, compiled)
        metrics = {}
        for name in texts:
            change = bootstrap_change([(quantized[name], fp[name])])
            metrics.update({f"ppl:{name}": quantized[name].value, f"change:{name}": change.value,
                            f"low:{name}": change.low, f"high:{name}": change.high})
        mean = bootstrap_change([(quantized[name], fp[name]) for name in texts])
        metrics.update({"change:mean": mean.value, "low:mean": mean.low, "high:mean": mean.high})
        return metrics

    reference = {f"ppl:{name}": fp[name].value for name in texts}
    reference.update({f"{key}:{name}": 0.0 for name in [*texts, "mean"] for key in ("change", "low", "high")})
    rows = recipe_rows(SMOLLM2, model, reference, metrics_of, args, lkd)
    tokens = ", ".join(f"{name} {fp[name].tokens_scored}" for name in texts)
    return rows, (f"tokens scored per text: {tokens}; windows of {args.window} tokens, non-overlapping; 95% paired "
                  f"bootstrap intervals over windows (2,000 resamples)")


def probe_sentences(count: int) -> tuple[list[str], torch.Tensor]:
    items = json.loads((data_dir() / "rt_polarity_4000.json").read_text())
    random.Random(0).shuffle(items)
    items = items[:count]
    return [item["text"] for item in items], torch.tensor([item["label"] for item in items])


def encoder_rows(args: argparse.Namespace, lkd: zqcompile.LKDConfig) -> tuple[list[Row], str]:
    model, tokenizer = load_pretrained(MINILM)
    documents, human = load_lee50(str(data_dir() / "lee50.txt"), str(data_dir() / "lee50_similarities.tsv"))
    sentences, labels = probe_sentences(args.probe_sentences)
    half = len(sentences) // 2

    def scores(m) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
        docs = sentence_embeddings(m, tokenizer, documents, max_length=256)
        sents = sentence_embeddings(m, tokenizer, sentences)
        probe = logistic_probe_accuracy(sents[:half], labels[:half], sents[half:], labels[half:])
        return {"spearman_lee50": similarity_spearman(docs, human), "probe_accuracy": probe}, docs, sents

    reference, ref_docs, ref_sents = scores(model)
    reference.update({"cosine_vs_fp32": 1.0, "cosine_lee50": 1.0, "cosine_sentences": 1.0})

    def metrics_of(compiled, label: str) -> dict[str, float]:
        metrics, docs, sents = scores(compiled)
        metrics["cosine_vs_fp32"] = mean_cosine(torch.cat([docs, sents]), torch.cat([ref_docs, ref_sents]))
        # the target is per data set: the Lee documents and the movie-review sentences each
        metrics["cosine_lee50"] = mean_cosine(docs, ref_docs)
        metrics["cosine_sentences"] = mean_cosine(sents, ref_sents)
        return metrics

    rows = recipe_rows(MINILM, model, reference, metrics_of, args, lkd)
    setting = (f"Lee-50: {len(documents)} documents (max 256 tokens), {len(documents) * (len(documents) - 1) // 2} "
               f"pairs; probe: {half} train / {len(sentences) - half} test sentences of rt_polarity (seed 0 shuffle), "
               f"L2-regularised logistic regression (L-BFGS); cosine over {len(documents) + len(sentences)} texts")
    return rows, setting


def _change(metrics: dict[str, float], key: str) -> str:
    return (f"{100 * metrics[f'change:{key}']:+.2f}% [{100 * metrics[f'low:{key}']:+.2f}, "
            f"{100 * metrics[f'high:{key}']:+.2f}]")


def render(data: dict[str, Any]) -> str:
    lines = [f"torch threads: {data['threads']}; SmolLM2 perplexity: {data['decoder_setting']}",
             f"MiniLM: {data['encoder_setting']}", f"LKD: {data['lkd']}", ""]
    decoder = [r for r in data["rows"] if r["model"] == SMOLLM2]
    encoder = [r for r in data["rows"] if r["model"] == MINILM]
    texts = [key.split(":", 1)[1] for key in decoder[0]["metrics"] if key.startswith("ppl:")] if decoder else []
    short = [Path(name).stem.split("_")[0] for name in texts]
    lines += table([SMOLLM2, *[f"{t} {what}" for t in short for what in ("ppl", "vs FP32 [95% CI]")],
                    "mean vs FP32 [95% CI]", "quantized-linear weights MB", "x FP16", "compile s",
                    "constants chosen on"],
                   [[r["config"], *[cell for t in texts for cell in (f"{r['metrics'][f'ppl:{t}']:.3f}",
                                                                     _change(r["metrics"], t))],
                     _change(r["metrics"], "mean"), f"{r['weight_mb']:.1f}", f"{r['ratio_fp16']:.3f}",
                     f"{r['seconds']:.0f}", r["notes"].get("constants", "-")] for r in decoder])
    lines += table([MINILM, "cosine vs FP32", "cosine Lee-50 docs", "cosine sentences", "Spearman (Lee-50)",
                    "probe accuracy", "quantized-linear weights MB", "x FP16", "compile s"],
                   [[r["config"], f"{r['metrics']['cosine_vs_fp32']:.4f}", f"{r['metrics']['cosine_lee50']:.4f}",
                     f"{r['metrics']['cosine_sentences']:.4f}", f"{r['metrics']['spearman_lee50']:.4f}",
                     f"{r['metrics']['probe_accuracy']:.4f}", f"{r['weight_mb']:.1f}", f"{r['ratio_fp16']:.3f}",
                     f"{r['seconds']:.0f}"] for r in encoder])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated rows (FP32 is always run)")
    parser.add_argument("--texts", default=",".join(TEXTS), help="comma-separated files in ../shared/data")
    parser.add_argument("--tokens", type=int, default=EVAL_TOKENS, help="perplexity tokens per text (SmolLM2)")
    parser.add_argument("--window", type=int, default=EVAL_WINDOW)
    parser.add_argument("--probe-sentences", type=int, default=2000)
    parser.add_argument("--lkd-steps", type=int, default=zqcompile.LKDConfig.steps)
    parser.add_argument("--lkd-samples", type=int, default=zqcompile.LKDConfig.num_samples)
    parser.add_argument("--lkd-lr", type=float, default=zqcompile.LKDConfig.lr)
    parser.add_argument("--out", type=Path, default=default_out_dir(), help="accuracy.json and .md go here")
    args = parser.parse_args()
    lkd = zqcompile.LKDConfig(steps=args.lkd_steps, num_samples=args.lkd_samples, lr=args.lkd_lr)
    models = set(args.models.split(","))
    started = time.perf_counter()
    decoder, decoder_setting = decoder_rows(args, lkd) if "smollm2" in models else ([], "")
    encoder, encoder_setting = encoder_rows(args, lkd) if "minilm" in models else ([], "")
    res = Results(args.out, "accuracy", args, {
        "threads": torch.get_num_threads(), "decoder_setting": decoder_setting, "encoder_setting": encoder_setting,
        "lkd": str(lkd), "rows": [r.__dict__ for r in decoder + encoder]}, render)
    res.data["notes"].append(f"{time.perf_counter() - started:.0f} s in all")
    res.save()
    print(res.markdown())


if __name__ == "__main__":
    main()
