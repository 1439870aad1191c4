"""The persistent GEMM tuning cache: autotuning results on disk, so a new process warms up without re-tuning.

One JSON file per environment (GPU name, torch / CUDA / Triton / zqcompile versions) in the cache folder:
``$ZQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/zqcompile``, else ``~/.cache/zqcompile``; ``ZQ_TUNING_CACHE=0`` turns it
off. The file is named after a hash of its environment and repeats the environment inside, so a file that is
corrupt (not JSON, wrong layout) or foreign (copied from another GPU or another library version) is ignored with
a warning and rewritten, never trusted. An entry also records a fingerprint of the candidate configs it was
chosen from; the caller (triton_gemm) re-tunes when the candidates changed and accepts a stored choice only if
it is still one of them.

Entries are ``{key: {"candidates": fingerprint, "config": {...}}}`` with the tuner's key tuple written as a string.
Writes merge with what is on disk (another process may have tuned other shapes) and replace the file atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

FORMAT = "zqcompile-gemm-tuning"
VERSION = 1


@dataclass
class TuningStats:
    """What the tuner did in this process (benchmarks and tests read ``STATS``)."""

    tuned: int = 0  # shapes timed on the GPU
    loaded: int = 0  # shapes whose config came from the disk cache
    seconds: float = 0.0  # wall time spent timing candidates (with compiling them), of the shapes tuned
    compile_seconds: float = 0.0  # of which running each candidate once first (compiling it; autotune.py)


STATS = TuningStats()


def cache_dir() -> Path:
    if os.environ.get("ZQ_CACHE_DIR"):
        return Path(os.environ["ZQ_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zqcompile"


def enabled() -> bool:
    return os.environ.get("ZQ_TUNING_CACHE", "1") != "0"


def device_environment(device_index: int) -> dict[str, str]:
    """What a tuning result depends on besides the problem shape."""
    import torch

    from zqcompile.version import __version__
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"gpu": torch.cuda.get_device_name(device_index), "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "triton": triton_version, "zqcompile": __version__}


def fingerprint(candidates: Any) -> str:
    return hashlib.sha1(repr(candidates).encode()).hexdigest()[:16]


class TuningCache:
    """The tuning results of one environment, in memory and in one file."""

    def __init__(self, directory: Path, environment: Mapping[str, str]):
        self.environment = dict(environment)
        digest = hashlib.sha1(json.dumps(self.environment, sort_keys=True).encode()).hexdigest()[:16]
        self.path = Path(directory) / f"gemm-{digest}.json"
        self._entries = self._read(warn=True)
        self._write_failed = False

    def get(self, key: str, candidates_fingerprint: str) -> dict[str, Any] | None:
        """The stored config fields for ``key``, if chosen from the same candidates."""
        entry = self._entries.get(key)
        if not isinstance(entry, dict) or entry.get("candidates") != candidates_fingerprint:
            return None
        config = entry.get("config")
        return config if isinstance(config, dict) else None

    def put(self, key: str, candidates_fingerprint: str, config: Mapping[str, Any]) -> None:
        """Record a tuning result and write the file (merged with entries other processes wrote since)."""
        self._entries = {**self._read(warn=False), **self._entries,
                         key: {"candidates": candidates_fingerprint, "config": dict(config)}}
        document = {"format": FORMAT, "version": VERSION, "environment": self.environment, "entries": self._entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, suffix=".tmp", delete=False) as handle:
                json.dump(document, handle, indent=1, sort_keys=True)
            os.replace(handle.name, self.path)
        except OSError as err:
            if not self._write_failed:  # keep tuning in memory; say once that it will not persist
                warnings.warn(f"cannot write the GEMM tuning cache {self.path} ({err}); set ZQ_CACHE_DIR to a "
                              "writable folder to keep tuning results across processes", stacklevel=3)
            self._write_failed = True

    def _read(self, warn: bool) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            document = json.loads(self.path.read_text())
            problem = _layout_problem(document)
        except (OSError, ValueError) as err:
            problem = f"unreadable ({type(err).__name__}: {err})"
        if problem is None and document["environment"] != self.environment:
            problem = f"written for {document['environment']}, this process is {self.environment}"
        if problem is not None:
            if warn:
                warnings.warn(f"ignoring the GEMM tuning cache {self.path}: {problem}; shapes will be re-tuned and "
                              "the file rewritten", stacklevel=4)
            return {}
        return document["entries"]


def _layout_problem(document: Any) -> str | None:
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        return "not a zqcompile tuning cache"
    if document.get("version") != VERSION:
        return f"format version {document.get('version')!r}, expected {VERSION}"
    if not isinstance(document.get("environment"), dict) or not isinstance(document.get("entries"), dict):
        return "missing environment or entries"
    return None


_CACHES: dict[tuple[Path, int], TuningCache] = {}


def for_device(device_index: int) -> TuningCache | None:
    """The cache of this GPU in the current cache folder (read once per process), or None when turned off."""
    if not enabled():
        return None
    key = (cache_dir(), device_index)
    if key not in _CACHES:
        _CACHES[key] = TuningCache(key[0], device_environment(device_index))
    return _CACHES[key]
