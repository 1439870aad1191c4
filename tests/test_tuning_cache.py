"""The persistent GEMM tuning cache (zqcompile/backends/tuning_cache.py) and the tuner's use of it, on the CPU:
the GPU timing is replaced by a fake that records what it was asked to time, so the tests see exactly which
shapes were tuned, which came from disk, and which disk entries were ignored."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from zqcompile.backends import triton_gemm, tuning_cache
from zqcompile.backends.triton_gemm import GemmConfig, candidate_configs, tuning_key

ENV = {"gpu": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0", "zqcompile": "0.1.0"}
KEY = tuning_key(300, 768, 768, None, False, True, True, torch.float16, 0)
CANDIDATES = candidate_configs(300, 768, None, tma=True)


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    """A fresh cache folder, this fake GPU's environment, an empty in-process tuner, and a fresh process's view
    of the disk (no cache objects read yet)."""
    monkeypatch.setenv("ZQ_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ZQ_TUNING_CACHE", raising=False)
    monkeypatch.setattr(tuning_cache, "device_environment", lambda index: dict(ENV))
    monkeypatch.setattr(tuning_cache, "_CACHES", {})
    monkeypatch.setattr(tuning_cache, "STATS", tuning_cache.TuningStats())
    monkeypatch.setattr(triton_gemm, "_TUNED", {})
    monkeypatch.setattr(triton_gemm, "AUTOTUNE", True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return tmp_path


@pytest.fixture
def timer(monkeypatch):
    """Fake GPU timing: the last candidate is the fastest; records the candidate lists it timed."""
    timed: list[list[GemmConfig]] = []

    def fake(candidates, run, cycled_runs=None):
        timed.append(list(candidates))
        return {cfg: float(len(candidates) - i) for i, cfg in enumerate(candidates)}
    monkeypatch.setattr(triton_gemm, "_time_candidates", fake)
    return timed


def _new_process(monkeypatch):
    monkeypatch.setattr(tuning_cache, "_CACHES", {})
    monkeypatch.setattr(triton_gemm, "_TUNED", {})


def _pick():
    return triton_gemm._pick_config(KEY, CANDIDATES, run=lambda cfg: None, device_index=0)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ZQ_CACHE_DIR", str(tmp_path / "zq"))
    assert tuning_cache.cache_dir() == tmp_path / "zq"
    monkeypatch.delenv("ZQ_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning_cache.cache_dir() == tmp_path / "xdg" / "zqcompile"


def test_a_new_process_loads_instead_of_tuning(cache_folder, timer, monkeypatch):
    assert _pick() == CANDIDATES[-1] and len(timer) == 1 and tuning_cache.STATS.tuned == 1
    files = list(cache_folder.glob("gemm-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["environment"] == ENV
    _new_process(monkeypatch)
    assert _pick() == CANDIDATES[-1]
    assert len(timer) == 1 and tuning_cache.STATS.loaded == 1  # nothing timed in the new process


def test_other_gpus_and_versions_use_their_own_file(cache_folder, timer, monkeypatch):
    _pick()
    _new_process(monkeypatch)
    monkeypatch.setattr(tuning_cache, "device_environment", lambda index: {**ENV, "triton": "3.7.0"})
    _pick()
    assert len(timer) == 2 and len(list(cache_folder.glob("gemm-*.json"))) == 2


@pytest.mark.parametrize("content, reason", [
    ("{not json", "unreadable"),
    (json.dumps([1, 2]), "not a zqcompile tuning cache"),
    (json.dumps({"format": tuning_cache.FORMAT, "version": 99, "environment": ENV, "entries": {}}), "format version"),
    (json.dumps({"format": tuning_cache.FORMAT, "version": 1, "environment": {**ENV, "gpu": "NVIDIA A100"},
                 "entries": {}}), "written for"),
])
def test_corrupt_or_foreign_files_are_ignored_with_a_warning_and_rewritten(cache_folder, timer, content, reason):
    path = tuning_cache.TuningCache(cache_folder, ENV).path
    path.write_text(content)
    with pytest.warns(UserWarning, match=f"ignoring the GEMM tuning cache .*{reason}"):
        assert _pick() == CANDIDATES[-1]
    assert len(timer) == 1  # tuned, not trusted
    document = json.loads(path.read_text())
    assert document["environment"] == ENV and list(document["entries"]) == [repr(KEY)]


def test_an_entry_that_is_not_a_candidate_is_re_tuned(cache_folder, timer, monkeypatch):
    _pick()
    path = next(cache_folder.glob("gemm-*.json"))
    document = json.loads(path.read_text())
    document["entries"][repr(KEY)]["config"]["block_m"] = 48  # no candidate has it
    path.write_text(json.dumps(document))
    _new_process(monkeypatch)
    with pytest.warns(UserWarning, match="not one of this shape's candidate configs"):
        assert _pick() == CANDIDATES[-1]
    assert len(timer) == 2


def test_changed_candidates_are_re_tuned_silently(cache_folder, timer, monkeypatch):
    _pick()
    _new_process(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = triton_gemm._pick_config(KEY, CANDIDATES[:2], run=lambda cfg: None, device_index=0)
    assert chosen == CANDIDATES[1] and len(timer) == 2


def test_writes_merge_with_other_processes(cache_folder):
    first, second = tuning_cache.TuningCache(cache_folder, ENV), tuning_cache.TuningCache(cache_folder, ENV)
    first.put("a", "fp", {"block_m": 16})
    second.put("b", "fp", {"block_m": 32})
    reread = tuning_cache.TuningCache(cache_folder, ENV)
    assert reread.get("a", "fp") == {"block_m": 16} and reread.get("b", "fp") == {"block_m": 32}
    assert reread.get("a", "other candidates") is None


def test_the_cache_can_be_turned_off(cache_folder, timer, monkeypatch):
    monkeypatch.setenv("ZQ_TUNING_CACHE", "0")
    _pick()
    assert tuning_cache.for_device(0) is None and not list(cache_folder.iterdir())


def test_decode_size_kernel_choices_persist_too(cache_folder, timer, monkeypatch):
    """The weight-streaming kernels (M <= 64; their own config class) load from disk in a new process as well."""
    from zqcompile.backends import triton_small_m

    candidates = triton_small_m.candidate_configs(triton_gemm._Problem(m=32, n=768, k=3072, g_out=1, g_in=1))
    key = ("stream", 32, 768, 3072, None, False, torch.float16, True, torch.float16, 0)

    def pick():
        return triton_gemm._pick_config(key, candidates, run=lambda cfg: None, device_index=0)

    assert len(candidates) > 1 and pick() == candidates[-1] and tuning_cache.STATS.tuned == 1
    _new_process(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pick() == candidates[-1]
    assert len(timer) == 1 and tuning_cache.STATS.loaded == 1
