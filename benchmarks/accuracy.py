"""Accuracy of zqcompile's recipes on real models and real text (the issue's table; results in ACCURACY.md).

- SmolLM2-135M-Instruct (a 30-layer Llama decoder): perplexity on the first ``--tokens`` tokens of Jane
  Austen's *Persuasion* (``../shared/data/austen_persuasion.txt``), sliding windows of ``--window`` tokens
  every ``--stride`` tokens (both printed with the table);
- all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder): mean cosine of the sentence embeddings against
  FP32 (on the Lee-50 documents and the probe sentences), Spearman correlation of embedding cosines with
  the Lee et al. human similarity judgments (50 documents, 1,225 pairs), and the test accuracy of a
  logistic-regression probe on frozen embeddings of movie-review sentences (``rt_polarity_4000.json``);
- for FP32, W8A8, W4A8 (PTQ), W4A8 + LKD, W8A16, W4A16 (and W8A8-smooth where that preset exists): weight
  memory of the quantized linear layers in MB and as a fraction of the same weights in FP16.

LKD runs with its defaults (self-generated text for the decoder, random token ids for the encoder) unless
``--lkd-steps`` / ``--lkd-samples`` say otherwise. Usage::

    python benchmarks/accuracy.py [--tokens 1024] [--window 256] [--stride 256] [--probe-sentences 2000]
                                  [--models smollm2,minilm] [--configs W8A8,W8A8-smooth,...]
                                  [--text austen_persuasion.txt] [--out DIR]

Results go to ``--out`` (default ``$OUT``, else the git-ignored benchmarks/results/) as ``accuracy.json`` and
``accuracy.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import zqcompile
from zqcompile.evaluate import (
    load_lee50, logistic_probe_accuracy, mean_cosine, sentence_embeddings, similarity_spearman, text_perplexity,
)
from common import Results, default_out_dir, table
from zqcompile.pretrained import MINILM, SMOLLM2, data_dir, load_pretrained

MB = 2 ** 20


@dataclass
class Row:
    model: str
    config: str
    metrics: dict[str, float]
    weight_mb: float  # the quantized linear layers' weights (FP32 row: the same layers in FP32)
    ratio_fp16: float
    seconds: float  # compile (+ LKD) time
    notes: dict = field(default_factory=dict)


CONFIGS = ("W8A8", "W8A8-smooth", "W4A8-PTQ", "W4A8-LKD", "W8A16", "W4A16")


def configurations(lkd: zqcompile.LKDConfig, wanted: str) -> list[tuple[str, str, zqcompile.LKDConfig | None]]:
    """The (label, preset, LKD config) rows named in the comma-separated ``wanted``."""
    every = [("W8A8", "w8a8", None), ("W8A8-smooth", "w8a8-smooth", None), ("W4A8-PTQ", "w4a8", None),
             ("W4A8-LKD", "w4a8", lkd), ("W8A16", "w8a16", None), ("W4A16", "w4a16", None)]
    names = wanted.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    return [row for row in every if row[0] in names]


def compile_row(model: torch.nn.Module, recipe: str, lkd: zqcompile.LKDConfig | None):
    started = time.perf_counter()
    compiled = zqcompile.compile(model, recipe, lkd=lkd)
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


def recipe_rows(name: str, model: torch.nn.Module, reference: dict[str, float],
                metrics_of: Callable[[Any], dict[str, float]], args: argparse.Namespace,
                lkd: zqcompile.LKDConfig) -> list[Row]:
    """The FP32 row (``reference``) and one row per configuration, scored by ``metrics_of(compiled)``."""
    print(f"{name} FP32: {reference}", flush=True)
    rows, fp32_mb = [], float("nan")
    for label, recipe, lkd_config in configurations(lkd, args.configs):
        compiled, seconds = compile_row(model, recipe, lkd_config)
        if lkd_config is not None:
            print(compiled.lkd_result, flush=True)
        metrics = metrics_of(compiled)
        memory = compiled.weight_memory()
        rows.append(Row(name, label, metrics, memory.quantized_after / MB, memory.ratio_vs_fp16, seconds,
                        lkd_notes(compiled)))
        print(f"{name} {label}: {metrics}, {memory} ({seconds:.0f} s)", flush=True)
        fp32_mb = memory.quantized_before / MB
        del compiled
    return [Row(name, "FP32", reference, fp32_mb, 2.0, 0.0)] + rows


def decoder_rows(args: argparse.Namespace, lkd: zqcompile.LKDConfig) -> tuple[list[Row], str]:
    model, tokenizer = load_pretrained(SMOLLM2)
    text = (data_dir() / args.text).read_text()
    evaluate = lambda m: text_perplexity(m, tokenizer, text, args.tokens, args.window, args.stride)  # noqa: E731
    fp = evaluate(model)

    def metrics_of(compiled) -> dict[str, float]:
        ppl = evaluate(compiled).value
        return {"ppl": ppl, "ppl_vs_fp32": ppl / fp.value - 1}

    rows = recipe_rows(SMOLLM2, model, {"ppl": fp.value, "ppl_vs_fp32": 0.0}, metrics_of, args, lkd)
    return rows, f"{args.text}, {fp.tokens_scored} tokens scored, window {fp.window}, stride {fp.stride}"


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
    reference["cosine_vs_fp32"] = 1.0

    def metrics_of(compiled) -> dict[str, float]:
        metrics, docs, sents = scores(compiled)
        metrics["cosine_vs_fp32"] = mean_cosine(torch.cat([docs, sents]), torch.cat([ref_docs, ref_sents]))
        return metrics

    rows = recipe_rows(MINILM, model, reference, metrics_of, args, lkd)
    setting = (f"Lee-50: {len(documents)} documents (max 256 tokens), {len(documents) * (len(documents) - 1) // 2} "
               f"pairs; probe: {half} train / {len(sentences) - half} test sentences of rt_polarity (seed 0 shuffle), "
               f"L2-regularised logistic regression (L-BFGS); cosine over {len(documents) + len(sentences)} texts")
    return rows, setting


def render(data: dict[str, Any]) -> str:
    lines = [f"torch threads: {data['threads']}; SmolLM2 perplexity: {data['decoder_setting']}",
             f"MiniLM: {data['encoder_setting']}", f"LKD: {data['lkd']}", ""]
    decoder = [r for r in data["rows"] if r["model"] == SMOLLM2]
    encoder = [r for r in data["rows"] if r["model"] == MINILM]
    lines += table([SMOLLM2, "perplexity", "vs FP32", "quantized-linear weights MB", "x FP16", "compile s"],
                   [[r["config"], f"{r['metrics']['ppl']:.3f}", f"{100 * r['metrics']['ppl_vs_fp32']:+.2f}%",
                     f"{r['weight_mb']:.1f}", f"{r['ratio_fp16']:.3f}", f"{r['seconds']:.0f}"] for r in decoder])
    lines += table([MINILM, "cosine vs FP32", "Spearman (Lee-50)", "probe accuracy", "quantized-linear weights MB",
                    "x FP16", "compile s"],
                   [[r["config"], f"{r['metrics']['cosine_vs_fp32']:.4f}", f"{r['metrics']['spearman_lee50']:.4f}",
                     f"{r['metrics']['probe_accuracy']:.4f}", f"{r['weight_mb']:.1f}", f"{r['ratio_fp16']:.3f}",
                     f"{r['seconds']:.0f}"] for r in encoder])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated rows (FP32 is always run)")
    parser.add_argument("--text", default="austen_persuasion.txt", help="file in ../shared/data for perplexity")
    parser.add_argument("--tokens", type=int, default=1024, help="perplexity token budget (SmolLM2)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--stride", type=int, default=256)
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
