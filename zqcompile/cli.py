"""The ``zqcompile`` command line.

    zqcompile compile MODEL --recipe w8a8 --out DIR [--lkd [--lkd-steps N] [--lkd-data FILE]]
    zqcompile inspect DIR [--code]
    zqcompile export-onnx DIR OUT.onnx [--int4 matmulnbits|exact] [--int8 exact|u8s8]
    zqcompile bench DIR [--batch 1] [--seq 128] [--repeats 10]
    zqcompile eval DIR --text FILE [FILE ...] [--max-tokens 16384] [--window 512]
    zqcompile generate DIR|MODEL --prompt TEXT [--max-new-tokens 64] [--sample [--temperature T] [--top-k K]
                       [--top-p P] [--seed S]] [--recipe w8a8]

MODEL is a local Hugging Face directory or a shipped model name (``all-MiniLM-L6-v2``,
``SmolLM2-135M-Instruct``); ``generate`` takes a saved directory or compiles MODEL on the fly (``--recipe``).
``bench`` and ``eval`` compare against the FP model the directory was compiled
from (its path is recorded in the manifest; ``--model`` overrides it). Errors in the input (a missing
directory, an unknown recipe, an architecture zqcompile cannot capture) print one message on stderr and
exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

EXIT_USER_ERROR = 2


def _load_fp_model(name_or_path: str):
    """(model, tokenizer) through zqcompile.pretrained, with transformers' load failures as ZQError."""
    from zqcompile.errors import ZQError
    from zqcompile.pretrained import load_pretrained

    try:
        return load_pretrained(name_or_path)
    except ZQError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise ZQError(f"cannot load {name_or_path!r} as a Hugging Face text model: "
                      f"{str(err).strip().splitlines()[0]}") from err


def _source_of(model: str) -> str:
    """What the manifest records: an absolute directory, or a shipped model's name."""
    path = Path(model)
    return str(path.resolve()) if path.is_dir() else model


# ---- commands ---------------------------------------------------------------------------------------

def _writable_directory(path: str) -> None:
    """ZQError unless ``path`` is (or can become) a directory; checked before any long work."""
    from zqcompile.errors import ZQError

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ZQError(f"--out {path!r} is a file; pass a directory to write the compiled model into")
    parent = next((p for p in (target, *target.parents) if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ZQError(f"--out {path!r} cannot be created: {str(parent)!r} is not a writable directory")


def _writable_file(path: str) -> None:
    from zqcompile.errors import ZQError

    target = Path(path)
    if target.is_dir():
        raise ZQError(f"{path!r} is a directory; pass the path of the .onnx file to write")
    parent = next((p for p in target.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ZQError(f"{path!r} cannot be written: {str(parent)!r} is not a writable directory")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def cmd_compile(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    import zqcompile
    from zqcompile.recipe import load_recipe

    _writable_directory(args.out)  # fail on a bad --out or recipe before the (slow) model load
    recipe = load_recipe(args.recipe)
    lkd = None
    if args.lkd:
        lkd = {"steps": args.lkd_steps, "data": args.lkd_data or "auto", "tokenizer": _source_of(args.model)}
    with tqdm(total=3, desc="zqcompile", disable=args.quiet) as bar:
        bar.set_postfix_str(f"load {args.model}")
        model, _ = _load_fp_model(args.model)
        bar.update()
        bar.set_postfix_str(f"compile {recipe.name}")
        qmodel = zqcompile.compile(model, recipe, lkd=lkd, backend="cpu")
        bar.update()
        bar.set_postfix_str(f"save {args.out}")
        qmodel.save(args.out, source_model=_source_of(args.model))
        bar.update()
    print(zqcompile.inspect(qmodel, code=False))
    if qmodel.lkd_result is not None:
        print(f"\n{qmodel.lkd_result}")
    print(f"\nsaved to {args.out}")


def cmd_inspect(args: argparse.Namespace) -> None:
    import zqcompile
    from zqcompile.serialize import read_manifest

    print(zqcompile.inspect(zqcompile.load(args.dir), code=args.code))
    manifest = read_manifest(args.dir)
    if manifest.get("lkd_log"):
        print(f"\n{manifest['lkd_log']}")
    if manifest.get("source_model"):
        print(f"\ncompiled from {manifest['source_model']}")


def cmd_export_onnx(args: argparse.Namespace) -> None:
    import zqcompile

    _writable_file(args.out)
    info = zqcompile.export_onnx(zqcompile.load(args.dir), None, args.out, int4=args.int4, int8=args.int8,
                                 progress=not args.quiet)
    print(f"wrote {info}")


def _fp_model_for(args: argparse.Namespace, manifest: dict):
    from zqcompile.errors import ZQError

    source = args.model or manifest.get("source_model")
    if source is None:
        raise ZQError(f"{args.dir} does not record the FP model it was compiled from; pass --model MODEL")
    return _load_fp_model(source)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    import zqcompile
    from zqcompile.serialize import read_manifest

    if args.threads:
        torch.set_num_threads(args.threads)
    qmodel = zqcompile.load(args.dir)
    manifest = read_manifest(args.dir)
    vocab = int(qmodel.example_inputs[0].max()) + 1 if args.no_fp else None
    fp_model = None
    if not args.no_fp:
        fp_model, _ = _fp_model_for(args, manifest)
        vocab = fp_model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=qmodel.device)
    with torch.no_grad():
        q_ms = _median_ms(lambda: qmodel(input_ids=ids), args.repeats)
        print(f"{qmodel.model_class} {qmodel.recipe.name} ({qmodel.backend} backend), batch {args.batch}, "
              f"seq {args.seq}, {torch.get_num_threads()} threads, median of {args.repeats}:")
        print(f"  quantized: {q_ms:.2f} ms")
        if fp_model is not None:
            fp_ms = _median_ms(lambda: fp_model(input_ids=ids), args.repeats)
            print(f"  FP ({next(fp_model.parameters()).dtype}): {fp_ms:.2f} ms  -> speed-up {fp_ms / q_ms:.3g}x")
        else:
            print("  (FP model not measured: --no-fp)")
    print(f"  weights: {qmodel.weight_memory()}")


def cmd_eval(args: argparse.Namespace) -> None:
    import torch

    import zqcompile
    from zqcompile.errors import ZQError
    from zqcompile.evaluate import EVAL_MIN_SCORED, bootstrap_change, sentence_embeddings, text_perplexity
    from zqcompile.serialize import read_manifest

    texts = {}
    for name in args.text:
        if not Path(name).is_file():
            raise ZQError(f"text file {name!r} does not exist")
        texts[name] = Path(name).read_text(encoding="utf-8", errors="replace")
    qmodel = zqcompile.load(args.dir)
    fp_model, tokenizer = _fp_model_for(args, read_manifest(args.dir))
    if "logits" in qmodel.output_keys:
        pairs = []
        for name, text in texts.items():
            fp = text_perplexity(fp_model, tokenizer, text, max_tokens=args.max_tokens, window=args.window)
            quantized = text_perplexity(qmodel, tokenizer, text, max_tokens=args.max_tokens, window=args.window)
            pairs.append((quantized, fp))
            short = ""
            if fp.tokens_scored < EVAL_MIN_SCORED:
                short = f"  (only {fp.tokens_scored} tokens: fewer than {EVAL_MIN_SCORED} is noisy)"
            print(f"{name}:\n  FP:        {fp}\n  quantized: {quantized}\n"
                  f"  change {bootstrap_change([(quantized, fp)]).percent()} (95% bootstrap interval over "
                  f"{len(fp.window_tokens)} windows){short}")
        if len(pairs) > 1:
            print(f"mean change over {len(pairs)} texts: {bootstrap_change(pairs).percent()}")
        return
    text = "\n".join(texts.values())
    sentences = [line.strip() for line in text.splitlines() if line.strip()][:args.max_sentences]
    if not sentences:
        raise ZQError(f"{', '.join(args.text)} has no non-empty lines (eval embeds one sentence per line)")
    reference = sentence_embeddings(fp_model, tokenizer, sentences)
    embedded = sentence_embeddings(qmodel, tokenizer, sentences)
    cosine = (reference.double() * embedded.double()).sum(-1)
    print(f"sentence embeddings of {len(sentences)} lines, quantized vs FP: cosine mean {cosine.mean():.5f}, "
          f"min {cosine.min():.5f}")
    same_nearest = (torch.argmax(embedded @ embedded.T - 2 * torch.eye(len(sentences)), 1)
                    == torch.argmax(reference @ reference.T - 2 * torch.eye(len(sentences)), 1)).float().mean()
    print(f"same nearest neighbour as FP for {100 * same_nearest:.1f}% of the lines")


def _tokenizer_for(source: str):
    from transformers import AutoTokenizer

    from zqcompile.errors import ZQError
    from zqcompile.pretrained import SHIPPED_MODELS, shipped_model_dir

    try:
        return AutoTokenizer.from_pretrained(shipped_model_dir(source) if source in SHIPPED_MODELS else source)
    except (OSError, ValueError) as err:
        raise ZQError(f"cannot load the tokenizer of {source!r}: {str(err).strip().splitlines()[0]}") from err


def cmd_generate(args: argparse.Namespace) -> None:
    from transformers import TextStreamer

    import zqcompile
    from zqcompile.serialize import MANIFEST, read_manifest

    if (Path(args.model) / MANIFEST).is_file():
        qmodel = zqcompile.load(args.model)
        source = args.tokenizer or read_manifest(args.model).get("source_model")
        if source is None:
            from zqcompile.errors import ZQError
            raise ZQError(f"{args.model} does not record the model it was compiled from; pass --tokenizer MODEL")
        tokenizer = _tokenizer_for(source)
    else:
        model, tokenizer = _load_fp_model(args.model)
        qmodel = zqcompile.compile(model, args.recipe)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(qmodel.device)
    # the streamer prints the prompt too: decoded with the new tokens, the text keeps the tokenizer's spacing
    qmodel.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    streamer=TextStreamer(tokenizer, skip_special_tokens=True))


# ---- parser -----------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with a usage error as one line on stderr and exit status 2, like every other input error."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from zqcompile.onnx_export import INT4_MODES, INT8_MODES
    from zqcompile.recipe import PRESETS

    parser = _Parser(prog="zqcompile", description="ZeroQuant post-training quantization compiler")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="quantize a Hugging Face model and save it")
    p.add_argument("model", help="local Hugging Face directory or shipped model name")
    p.add_argument("--recipe", default="w8a8", help=f"preset {list(PRESETS)} or a .yaml/.json recipe file")
    p.add_argument("--out", required=True, help="directory to write the compiled model to")
    p.add_argument("--lkd", action="store_true", help="layer-by-layer knowledge distillation before quantizing")
    p.add_argument("--lkd-steps", type=_positive_int, default=40, help="LKD optimizer steps per block")
    p.add_argument("--lkd-data", default=None, help="LKD data: a .txt file, 'self' or 'random' (default: auto)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("inspect", help="per-layer table, counters and weight memory of a compiled model")
    p.add_argument("dir")
    p.add_argument("--code", action="store_true", help="also print the graph's code")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export-onnx", help="write the compiled model as ONNX (integer ORT kernels)")
    p.add_argument("dir")
    p.add_argument("out")
    p.add_argument("--int4", choices=INT4_MODES, default="matmulnbits")
    p.add_argument("--int8", choices=INT8_MODES, default="exact",
                   help="u8s8: ORT's u8 x s8 kernel, faster but saturating on x86 CPUs without VNNI")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("bench", help="CPU latency of the compiled model vs its FP model")
    p.add_argument("dir")
    p.add_argument("--model", default=None, help="the FP model (default: the one recorded at compile time)")
    p.add_argument("--no-fp", action="store_true", help="time the compiled model only")
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--seq", type=_positive_int, default=128)
    p.add_argument("--repeats", type=_positive_int, default=10)
    p.add_argument("--threads", type=_positive_int, default=None)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="perplexity (decoders) or embedding agreement (encoders) vs the FP model")
    p.add_argument("dir")
    p.add_argument("--text", required=True, nargs="+",
                   help="text file(s); decoders: perplexity of each and their mean; encoders: one sentence per line")
    p.add_argument("--model", default=None, help="the FP model (default: the one recorded at compile time)")
    p.add_argument("--max-tokens", type=_positive_int, default=16384, help="decoders: tokens scored per text")
    p.add_argument("--window", type=_positive_int, default=512, help="decoders: window length (non-overlapping)")
    p.add_argument("--max-sentences", type=_positive_int, default=200, help="encoders: lines embedded")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="continue a prompt with a compiled decoder, streaming the text")
    p.add_argument("model", help="a saved compiled model, or a decoder (local HF directory or shipped name) to "
                                 "compile first")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--recipe", default="w8a8", help="recipe when compiling MODEL on the fly")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer (default: the model's, or the one recorded at compile time)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler (reproducible output)")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from zqcompile.errors import ZQError

    try:
        args.func(args)
    except ZQError as err:
        print(f"zqcompile {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
