"""The ``zqcompile`` command line, end to end on a tiny BERT directory (with its own word-level tokenizer)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import zqcompile
from zqcompile.cli import EXIT_USER_ERROR, main

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a lazy dog sleeps in the sun",
    "the fox is quick and brown",
    "dogs and foxes are animals",
]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zqcompile.cli", "--quiet", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A Hugging Face BERT directory (random weights, hidden 32) with a word-level tokenizer of the test words."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w for s in SENTENCES for w in s.split()})]
    tokenizer = BertTokenizer(vocab={word: index for index, word in enumerate(words)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, architectures=["BertModel"])
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def compiled_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "compiled"
    result = run_cli("compile", str(tiny_model_dir), "--recipe", "w8a8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "W8A8" in result.stdout and f"saved to {out}" in result.stdout
    return out


def test_compile_writes_a_loadable_model(compiled_dir, tiny_model_dir):
    from transformers import BertModel

    qmodel = zqcompile.load(compiled_dir)
    fp_model = BertModel.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    with torch.no_grad():
        expected = fp_model(input_ids=ids).last_hidden_state
    got = qmodel(input_ids=ids).last_hidden_state
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99


def test_export_onnx_command(compiled_dir, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["--quiet", "export-onnx", str(compiled_dir), str(out)]) == 0
    assert "MatMulIntegerToFloat=12" in capsys.readouterr().out
    qmodel = zqcompile.load(compiled_dir)
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]])
    mask = (ids != 0).long()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        ["last_hidden_state"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                "token_type_ids": torch.zeros_like(ids).numpy()})[0]
    expected = qmodel(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(got).flatten(), expected.flatten(), dim=0) > 0.9999


def test_inspect_bench_eval(compiled_dir, tmp_path, capsys):
    assert main(["inspect", str(compiled_dir)]) == 0
    table = capsys.readouterr().out
    assert table.count("W8A8") == 12 and "pass counters" in table

    assert main(["bench", str(compiled_dir), "--seq", "16", "--repeats", "1"]) == 0
    bench = capsys.readouterr().out
    assert re.search(r"quantized: [\d.]+ ms", bench) and re.search(r"FP \(torch.float32\): [\d.]+ ms", bench)

    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    assert main(["eval", str(compiled_dir), "--text", str(text)]) == 0
    report = capsys.readouterr().out
    mean = float(re.search(r"cosine mean ([\d.]+)", report).group(1))
    assert 0.99 < mean <= 1.0


def test_bad_input_exits_with_status_2(tiny_model_dir, tmp_path, capsys):
    result = run_cli("compile", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"))
    assert result.returncode == EXIT_USER_ERROR
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr

    assert main(["compile", str(tiny_model_dir), "--recipe", "w9a9", "--out", str(tmp_path / "o")]) == EXIT_USER_ERROR
    assert "unknown recipe preset 'w9a9'" in capsys.readouterr().err

    assert main(["inspect", str(tmp_path)]) == EXIT_USER_ERROR
    assert "no manifest.json" in capsys.readouterr().err

    assert main(["eval", str(tmp_path), "--text", str(tmp_path / "missing.txt")]) == EXIT_USER_ERROR
    assert "does not exist" in capsys.readouterr().err


def test_unsupported_architecture(tiny_model_dir, tmp_path, capsys):
    """A Hugging Face model without input_ids (a vision transformer) is refused with a message, not a traceback."""
    from transformers import BertTokenizer, ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16, architectures=["ViTModel"])
    ViTModel(config).save_pretrained(tmp_path / "vit")
    BertTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "vit")  # past the tokenizer check
    assert main(["--quiet", "compile", str(tmp_path / "vit"), "--out", str(tmp_path / "out")]) == EXIT_USER_ERROR
    assert "does not take input_ids" in capsys.readouterr().err


def test_compile_with_lkd(tiny_model_dir, tmp_path, capsys):
    import json

    out = tmp_path / "lkd"
    argv = ["--quiet", "compile", str(tiny_model_dir), "--lkd", "--lkd-steps", "2", "--lkd-data", "random",
            "--out", str(out)]
    assert main(argv) == 0
    assert "LKD over 2 blocks" in capsys.readouterr().out
    assert "LKD over 2 blocks" in json.loads((out / "manifest.json").read_text())["lkd_log"]
    assert zqcompile.load(out).recipe.name == "w8a8"
