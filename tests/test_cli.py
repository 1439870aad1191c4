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
    # --int8 u8s8: the int8 weights go to ORT's u8 x s8 kernel as they are (no weight zero point)
    assert main(["--quiet", "export-onnx", str(compiled_dir), str(out), "--int8", "u8s8"]) == 0
    import onnx
    gemms = [n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(gemms) == 12 and all(len(n.input) == 5 for n in gemms)


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


def _status_and_stderr(argv, capsys) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        status = exit_.code
    return status, capsys.readouterr().err


def test_arguments_checked_before_long_work(tiny_model_dir, compiled_dir, tmp_path, capsys):
    # each is one line on stderr and exit 2, without loading or compiling anything first
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["compile", str(tiny_model_dir), "--out", str(a_file)], "is a file; pass a directory"),
        (["compile", str(tiny_model_dir), "--out", str(a_file / "sub")], "is not a writable directory"),
        (["export-onnx", str(compiled_dir), str(tmp_path)], "is a directory; pass the path of the .onnx file"),
        (["export-onnx", str(compiled_dir), str(a_file / "m.onnx")], "is not a writable directory"),
        (["bench", str(compiled_dir), "--batch", "0"], "--batch: must be a positive integer, got '0'"),
        (["bench", str(compiled_dir), "--seq", "0"], "--seq: must be a positive integer, got '0'"),
        (["bench", str(compiled_dir), "--repeats", "0"], "--repeats: must be a positive integer, got '0'"),
    ]
    for argv, message in cases:
        status, err = _status_and_stderr(argv, capsys)
        assert status == EXIT_USER_ERROR and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def _save_tiny(directory, model, tiny_model_dir):
    from transformers import BertTokenizer

    model.save_pretrained(directory)
    BertTokenizer.from_pretrained(tiny_model_dir).save_pretrained(directory)
    return directory


def test_classifier_keeps_its_head(tiny_model_dir, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig.from_pretrained(tiny_model_dir, num_labels=3, architectures=["BertForSequenceClassification"])
    torch.manual_seed(1)
    model = _save_tiny(tmp_path / "clf", BertForSequenceClassification(config).eval(), tiny_model_dir)
    assert main(["--quiet", "compile", str(model), "--out", str(tmp_path / "out")]) == 0
    qmodel = zqcompile.load(tmp_path / "out")
    fp = BertForSequenceClassification.from_pretrained(model).eval()
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 9, 3, 0]])
    with torch.no_grad():
        expected = fp(input_ids=ids).logits
    got = qmodel(input_ids=ids).logits
    assert qmodel.model_class == "BertForSequenceClassification" and got.shape == (2, 3)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_unsupported_heads_and_encoder_decoders_are_refused(tiny_model_dir, tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    config = BertConfig.from_pretrained(tiny_model_dir, architectures=["BertForMaskedLM"])
    masked = _save_tiny(tmp_path / "mlm", BertForMaskedLM(config), tiny_model_dir)
    t5 = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                  architectures=["T5ForConditionalGeneration"])
    encoder_decoder = _save_tiny(tmp_path / "t5", T5ForConditionalGeneration(t5), tiny_model_dir)
    for directory, message in ((masked, "BertForMaskedLM, whose head zqcompile does not compile"),
                               (encoder_decoder, "is an encoder-decoder model")):
        assert main(["--quiet", "compile", str(directory), "--out", str(tmp_path / "out")]) == EXIT_USER_ERROR
        assert message in capsys.readouterr().err
