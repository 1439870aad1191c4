"""Ablation of the survey's weight methods (GPTQ, AWQ, LoRC, LLM.int8()) on SmolLM2-135M: one recipe per run.

Compiles SmolLM2-135M-Instruct with the recipe given as JSON, then measures perplexity on the first ``--tokens``
tokens of each ``--texts`` file (non-overlapping windows of 256 tokens, zqcompile.evaluate.text_perplexity), and
reports compile time, the process's peak resident memory (run one recipe per process) and the weight memory.
Calibration data is whatever the recipe makes itself (text sampled from the FP model): no reported text is
used to choose anything. Usage::

    python benchmarks/survey_methods.py --name W4A8-GPTQ --recipe '{"base": "w4a8", "weight_rounding": "gptq"}'
    python benchmarks/survey_methods.py --name FP32 --recipe fp

Appends one JSON line per run to ``--out`` (default ``benchmarks/results/survey_methods.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

import zqcompile
from zqcompile.evaluate import text_perplexity
from zqcompile.pretrained import SMOLLM2, data_dir, load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--recipe", required=True, help="a recipe as JSON, a preset name, or 'fp'")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--texts", default="austen_persuasion.txt,wsj_ptb_1000.txt")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "survey_methods.jsonl"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_pretrained(SMOLLM2)
    started = time.perf_counter()
    if args.recipe == "fp":
        compiled, weights = model, None
    else:
        recipe = json.loads(args.recipe) if args.recipe.startswith("{") else args.recipe
        compiled = zqcompile.compile(model, recipe)
        weights = compiled.weight_memory()
    seconds = time.perf_counter() - started
    row = {"name": args.name, "recipe": args.recipe, "compile_s": round(seconds, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "quantized_mb": round(weights.quantized_after / 2 ** 20, 2) if weights else None}
    for name in args.texts.split(","):
        text = (data_dir() / name).read_text()
        result = text_perplexity(compiled, tokenizer, text, max_tokens=args.tokens)
        row[name] = {"perplexity": round(result.value, 3), "tokens": result.tokens_scored}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
