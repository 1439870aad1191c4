"""The main job on an embedded default: compile a real pretrained model that ships in a pip package.

    python3 examples/quickstart.py                       # all-MiniLM-L6-v2 (BERT encoder), W8A8
    python3 examples/quickstart.py --recipe w4a8
    python3 examples/quickstart.py --model SmolLM2-135M-Instruct --tokens 512

Prints the compiled graph's per-layer summary, the accuracy against the FP32 model on real text from
../shared/data (sentence-embedding cosine for encoders, perplexity for decoders) and the weight memory.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import zqcompile
from zqcompile.evaluate import sentence_embeddings, text_perplexity
from zqcompile.pretrained import MINILM, SHIPPED_MODELS, data_dir, load_pretrained


def encoder_accuracy(model, qmodel, tokenizer, sentences: int) -> str:
    texts = [row["text"] for row in json.loads((data_dir() / "rt_polarity_4000.json").read_text())[:sentences]]
    reference = sentence_embeddings(model, tokenizer, texts)
    quantized = sentence_embeddings(qmodel, tokenizer, texts)
    cosine = (reference * quantized).sum(-1)
    return (f"sentence-embedding cosine vs FP32 on {len(texts)} real sentences (rt_polarity): "
            f"mean {cosine.mean():.5f}, min {cosine.min():.5f}")


def decoder_accuracy(model, qmodel, tokenizer, tokens: int) -> str:
    text = (data_dir() / "austen_persuasion.txt").read_text()
    fp = text_perplexity(model, tokenizer, text, max_tokens=tokens)
    q = text_perplexity(qmodel, tokenizer, text, max_tokens=tokens)
    return (f"perplexity on austen_persuasion.txt: FP32 {fp.value:.3f}, quantized {q.value:.3f} "
            f"({100 * (q.value / fp.value - 1):+.2f}%), {fp.tokens_scored} tokens, window {fp.window}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MINILM, help=f"one of {list(SHIPPED_MODELS)} or a local HF directory")
    parser.add_argument("--recipe", default="w8a8", help=f"a preset {list(zqcompile.PRESETS)} or a YAML/JSON path")
    parser.add_argument("--sentences", type=int, default=256, help="real sentences scored (encoders)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of real text scored (decoders)")
    parser.add_argument("--code", action="store_true", help="also print the rewritten graph's code")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_pretrained(args.model)
    start = time.perf_counter()
    qmodel = zqcompile.compile(model, args.recipe)
    print(f"compiled {type(model).__name__} with recipe {qmodel.recipe.name} in {time.perf_counter() - start:.1f} s\n")
    print(zqcompile.inspect(qmodel, code=args.code))
    print()
    print(decoder_accuracy(model, qmodel, tokenizer, args.tokens) if "logits" in qmodel.output_keys
          else encoder_accuracy(model, qmodel, tokenizer, args.sentences))


if __name__ == "__main__":
    main()
