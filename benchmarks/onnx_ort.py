"""ONNX Runtime benchmark: zqcompile's exported INT8/INT4 models against ORT FP32 and ORT quantize_dynamic.

In one run on this machine:

- speed, BERT-base with random weights (speed does not depend on the values), B in {1, 8}, S = 128:
  ORT FP32, ORT ``quantize_dynamic`` (per-tensor uint8 activations, int8 weights), zqcompile W8A8
  exported (per-token activations; the exact u8 x u8 GEMMs and ``int8="u8s8"``), zqcompile W4A8 exported
  (MatMulNBits for the INT4 MLP weights), and
  zqcompile's own CPU backend (torch, reference kernels); file sizes;
- accuracy, all-MiniLM-L6-v2 (a real sentence encoder) on real sentences (the Lee et al. news corpus):
  cosine of the token outputs and of the mean-pooled sentence embeddings against the FP32 torch model,
  for ORT FP32, quantize_dynamic, zqcompile W8A8 ONNX (both GEMM modes), zqcompile W8A8 on its CPU backend.

Latency is the median of interleaved rounds (each round runs every engine once), so a slow patch caused
by other processes on the shared CPU hits all engines alike. Results go to ``--out`` (default ``$OUT``, else
the git-ignored benchmarks/results/) as ``onnx_ort.json`` and ``onnx_ort.md``. Usage::

    python benchmarks/onnx_ort.py [--threads 2] [--rounds 15] [--out DIR] [--keep-onnx DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch.export import Dim
from transformers import BertConfig, BertModel

import zqcompile
from common import Results, default_out_dir, interleaved_median_ms, table
from zqcompile.evaluate import sentence_embeddings
from zqcompile.pretrained import MINILM, data_dir, load_pretrained

SEQ = 128
BATCHES = (1, 8)


class _Tuple(torch.nn.Module):
    """HF model -> tuple outputs with an explicit (input_ids, attention_mask, token_type_ids) signature."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state, out.pooler_output


def export_fp32(model: torch.nn.Module, path: Path) -> Path:
    """The FP32 baseline through the same exporter (dynamo, dynamic batch/seq, onnxscript optimizer)."""
    ids = torch.randint(0, 100, (2, 16))
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    dims = {0: Dim("batch", min=1), 1: Dim("seq", min=1, max=512)}
    with torch.no_grad():
        program = torch.onnx.export(_Tuple(model).eval(), args, dynamo=True, dynamic_shapes=(dims, dims, dims),
                                    input_names=["input_ids", "attention_mask", "token_type_ids"],
                                    output_names=["last_hidden_state", "pooler_output"], optimize=True)
    program.save(str(path))
    onnx.checker.check_model(str(path))
    return path


def ort_quantize_dynamic(fp32: Path, path: Path) -> Path:
    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
    return path


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=_providers())


def _providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def file_mb(path: Path) -> float:
    total = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    return total / 2 ** 20


def cosine(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double().flatten(), torch.as_tensor(np.asarray(b)).double().flatten()
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


# the two ways zqcompile's W8A8 ONNX runs its integer GEMMs (export_onnx's int8=)
EXACT_W8A8 = "zqcompile W8A8 ONNX (per-token, exact u8 x u8)"
U8S8_W8A8 = "zqcompile W8A8 ONNX (per-token, int8='u8s8')"


# ---- speed ------------------------------------------------------------------------------------------

def bench_speed(workdir: Path, threads: int, rounds: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()  # BERT-base, random weights
    paths = {"ORT FP32": export_fp32(model, workdir / "bert_fp32.onnx")}
    paths["ORT quantize_dynamic (per-tensor)"] = ort_quantize_dynamic(paths["ORT FP32"], workdir / "bert_qdyn.onnx")
    w8a8 = zqcompile.compile(model, "w8a8")
    paths[EXACT_W8A8] = zqcompile.export_onnx(w8a8, None, workdir / "bert_w8a8.onnx").path
    paths[U8S8_W8A8] = zqcompile.export_onnx(w8a8, None, workdir / "bert_w8a8_u8s8.onnx", int8="u8s8").path
    w4a8 = zqcompile.compile(model, "w4a8")
    paths["zqcompile W4A8 ONNX (MatMulNBits MLP)"] = zqcompile.export_onnx(w4a8, None, workdir / "bert_w4a8.onnx").path
    sessions = {name: session(p, threads) for name, p in paths.items()}
    torch.set_num_threads(threads)

    results: dict[str, dict[int, float]] = {name: {} for name in [*paths, "zqcompile CPU backend (torch)"]}
    for batch in BATCHES:
        ids = torch.randint(0, model.config.vocab_size, (batch, SEQ))
        feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        np_feeds = {k: v.numpy() for k, v in feeds.items()}
        runners = {name: (lambda s=s: s.run(None, np_feeds)) for name, s in sessions.items()}

        def run_torch():
            with torch.no_grad():
                return w8a8(**feeds)
        runners["zqcompile CPU backend (torch)"] = run_torch
        for name, ms in interleaved_median_ms(runners, rounds).items():
            results[name][batch] = ms
    sizes = {name: file_mb(p) for name, p in paths.items()}
    return results, sizes


# ---- accuracy ---------------------------------------------------------------------------------------

def bench_accuracy(workdir: Path, threads: int, n_sentences: int) -> dict[str, dict[str, float]]:
    model, tokenizer = load_pretrained(MINILM)
    sentences = [line.strip() for line in (data_dir() / "lee50.txt").read_text().splitlines() if line.strip()]
    sentences = sentences[:n_sentences]
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=SEQ, return_tensors="pt")
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
    reference_emb = sentence_embeddings(model, tokenizer, sentences, max_length=SEQ)

    fp32 = export_fp32(model, workdir / "minilm_fp32.onnx")
    qdyn = ort_quantize_dynamic(fp32, workdir / "minilm_qdyn.onnx")
    qmodel = zqcompile.compile(model, "w8a8")
    zq_onnx = {EXACT_W8A8: zqcompile.export_onnx(qmodel, None, workdir / "minilm_w8a8.onnx").path,
               U8S8_W8A8: zqcompile.export_onnx(qmodel, None, workdir / "minilm_u8s8.onnx", int8="u8s8").path}
    mask = batch["attention_mask"].bool()

    def scores(hidden: torch.Tensor) -> dict[str, float]:
        m = batch["attention_mask"][..., None].float()
        emb = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
        per_sentence = (emb.double() * reference_emb.double()).sum(-1)
        return {"token cosine": cosine(hidden[mask], reference[mask]),
                "sentence emb. cosine (mean)": per_sentence.mean().item(),
                "sentence emb. cosine (min)": per_sentence.min().item()}

    feeds = {k: v.numpy() for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    hidden = {name: torch.from_numpy(session(path, threads).run(None, feeds)[0])
              for name, path in {"ORT FP32": fp32, "ORT quantize_dynamic (per-tensor)": qdyn, **zq_onnx}.items()}
    out = {name: scores(h) for name, h in hidden.items()}
    with torch.no_grad():
        zq_cpu = qmodel(**batch).last_hidden_state
    out["zqcompile W8A8 CPU backend (torch)"] = scores(zq_cpu)
    for name in zq_onnx:
        out[name]["cosine vs zqcompile CPU"] = cosine(hidden[name][mask], zq_cpu[mask])
    out["_meta"] = {"sentences": len(sentences), "padded length": batch["input_ids"].shape[1]}
    return out


# ---- report -----------------------------------------------------------------------------------------

def render(data: dict[str, Any]) -> str:
    speed, sizes, accuracy, args = data["speed_ms"], data["file_mb"], data["accuracy"], data["args"]
    lines = [f"- command: `python benchmarks/onnx_ort.py --threads {args['threads']} --rounds {args['rounds']}`",
             f"- speed: BERT-base (random weights), S={SEQ}, median of {args['rounds']} interleaved rounds, "
             f"onnxruntime providers {', '.join(_providers())}, intra_op_num_threads={args['threads']}", ""]
    if speed:
        fp32, qdyn = speed["ORT FP32"], speed["ORT quantize_dynamic (per-tensor)"]
        lines += table(["engine", "B=1 ms", "B=8 ms", "speed-up vs ORT FP32 B=1 / B=8", "vs quantize_dynamic B=8",
                        "file MB"],
                       [[name, f"{ms[1]:.1f}", f"{ms[8]:.1f}", f"{fp32[1] / ms[1]:.2f}x / {fp32[8] / ms[8]:.2f}x",
                         f"{ms[8] / qdyn[8]:.2f}x the latency", f"{sizes[name]:.1f}" if name in sizes else "-"]
                        for name, ms in speed.items()])
    if accuracy:
        meta = accuracy["_meta"]
        lines += [f"- accuracy: all-MiniLM-L6-v2 on the first {meta['sentences']} Lee et al. news documents "
                  f"(truncated to {SEQ} tokens, padded to {meta['padded length']}), against the FP32 torch model", ""]
        lines += table(["engine", "token cosine", "sentence emb. cosine mean", "min", "cosine vs zqcompile CPU"],
                       [[name, f"{s['token cosine']:.5f}", f"{s['sentence emb. cosine (mean)']:.5f}",
                         f"{s['sentence emb. cosine (min)']:.5f}",
                         f"{s['cosine vs zqcompile CPU']:.6f}" if "cosine vs zqcompile CPU" in s else "-"]
                        for name, s in accuracy.items() if name != "_meta"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sentences", type=int, default=50)
    parser.add_argument("--out", type=Path, default=default_out_dir(), help="onnx_ort.json and .md go here")
    parser.add_argument("--keep-onnx", type=Path, default=None, help="keep the .onnx files here")
    args = parser.parse_args()
    res = Results(args.out, "onnx_ort", args, {"speed_ms": {}, "file_mb": {}, "accuracy": {}}, render)
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep_onnx or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        res.data["speed_ms"], res.data["file_mb"] = bench_speed(workdir, args.threads, args.rounds)
        res.save()
        res.data["accuracy"] = bench_accuracy(workdir, args.threads, args.sentences)
    res.data["notes"].append(f"wall time {time.time() - start:.0f} s")
    res.save()
    print(res.markdown())


if __name__ == "__main__":
    main()
