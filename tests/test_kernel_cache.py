"""The compiled-kernel disk cache (zqcompile/backends/numba_cuda/kernel_cache.py): its folder, keys and refusals on
the CPU with stand-in kernels; on a GPU, a second process loads the fused kernels the first one compiled and
computes the same values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from zqcompile.backends.numba_cuda.kernel_cache import KernelDiskCache, attach

ROOT = Path(__file__).resolve().parents[1]
CODEGEN = SimpleNamespace(magic_tuple=lambda: ("nvptx64-nvidia-cuda", (9, 0), ""))
CONTEXT = SimpleNamespace(refresh=lambda: None, codegen=lambda: CODEGEN)


def stand_in_kernel(x):  # a py_func: the locator needs its code object and source file
    return x


class SavedKernel:
    """What the cache stores of a compiled kernel: its reduced state and the codegen that made it."""

    codegen = CODEGEN

    def _reduce_states(self) -> dict:
        return {"name": "stand_in"}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ZQ_CACHE_DIR", str(tmp_path / "zq"))
    monkeypatch.delenv("ZQ_KERNEL_CACHE", raising=False)
    return tmp_path / "zq" / "numba"


def test_folder_is_private_whatever_the_umask_and_keys_follow_the_build_parameters(folder):
    old = os.umask(0o002)  # a group-writable default, as on distributions with per-user groups
    try:
        cache = KernelDiskCache(stand_in_kernel, "_layernorm_kernel('f16', 384)")
    finally:
        os.umask(old)
    path = Path(cache.cache_path)
    assert path.parent == folder
    assert (folder.stat().st_mode & 0o777, path.stat().st_mode & 0o777) == (0o700, 0o700)
    same = KernelDiskCache(stand_in_kernel, "_layernorm_kernel('f16', 384)")
    other = KernelDiskCache(stand_in_kernel, "_layernorm_kernel('f16', 768)")
    assert cache._index_key(("sig",), CODEGEN) == same._index_key(("sig",), CODEGEN)
    assert cache._index_key(("sig",), CODEGEN) != other._index_key(("sig",), CODEGEN)
    assert cache._index_key(("sig",), CODEGEN) != cache._index_key(("other sig",), CODEGEN)


def test_folder_others_can_write_to_is_refused_with_a_warning(folder):
    KernelDiskCache(stand_in_kernel, "k")  # creates the folders
    folder.chmod(0o770)
    dispatcher = SimpleNamespace(py_func=stand_in_kernel, _cache="numba's NullCache")
    with pytest.warns(UserWarning, match="not private to this user.*group- or world-writable"):
        attach(dispatcher, "k")
    assert dispatcher._cache == "numba's NullCache"


def test_switched_off_by_the_environment(folder, monkeypatch):
    monkeypatch.setenv("ZQ_KERNEL_CACHE", "0")
    dispatcher = SimpleNamespace(py_func=stand_in_kernel, _cache="numba's NullCache")
    attach(dispatcher, "k")
    assert dispatcher._cache == "numba's NullCache" and not folder.exists()


def test_attached_cache_stores_entries_under_the_build_key(folder):
    dispatcher = SimpleNamespace(py_func=stand_in_kernel, _cache=None)
    attach(dispatcher, "k")
    assert isinstance(dispatcher._cache, KernelDiskCache)
    dispatcher._cache.save_overload(("sig",), SavedKernel())
    data_files = sorted(p.suffix for p in Path(dispatcher._cache.cache_path).iterdir())
    assert data_files == [".nbc", ".nbi"]


@pytest.mark.parametrize("damage", ["index", "data"])
def test_unreadable_entry_is_ignored_with_a_warning_and_stored_again(folder, damage):
    cache = KernelDiskCache(stand_in_kernel, "k")
    cache.save_overload(("sig",), SavedKernel())
    path = Path(cache.cache_path)
    suffix = ".nbi" if damage == "index" else ".nbc"
    next(p for p in path.iterdir() if p.suffix == suffix).write_bytes(b"\x80\x05 not a pickle")
    with pytest.warns(UserWarning, match="ignoring an unreadable compiled-kernel cache entry"):
        assert cache.load_overload(("sig",), CONTEXT) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.save_overload(("sig",), SavedKernel())  # the bad index was replaced: storing works again
    assert cache._cache_file.load(cache._index_key(("sig",), CODEGEN)) == {"name": "stand_in"}


GPU_SCRIPT = """
import json, torch
from zqcompile.backends import register_cuda_kernels
from zqcompile.backends.numba_cuda import kernels
register_cuda_kernels()
torch.manual_seed(0)
x, w, b = torch.randn(37, 384, dtype=torch.float16) * 3, torch.randn(384, dtype=torch.float16), torch.randn(384, dtype=torch.float16)
outputs = {"layernorm": torch.ops.zq.layernorm_quant(x.cuda(), w.cuda(), b.cuda(), 1e-5),
           "gelu": torch.ops.zq.gelu_quant(x.cuda(), b.cuda(), "none")}
references = {"layernorm": torch.ops.zq.layernorm_quant(x, w, b, 1e-5), "gelu": torch.ops.zq.gelu_quant(x, b, "none")}
q_off = {name: (outputs[name][-2].cpu().int() - references[name][-2].int()).abs() for name in outputs}
stats = [k.stats for k in kernels.BUILT_KERNELS.values()]
print(json.dumps({"hits": sum(sum(s.cache_hits.values()) for s in stats),
                  "misses": sum(sum(s.cache_misses.values()) for s in stats),
                  "q_max_off": max(d.max().item() for d in q_off.values()),
                  "q_share_off": max(d.ne(0).float().mean().item() for d in q_off.values()),
                  "values": [t.double().sum().item() for out in outputs.values() for t in out]}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_second_process_loads_the_kernels_the_first_compiled(tmp_path):
    env = {**os.environ, "ZQ_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop("ZQ_KERNEL_CACHE", None)

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", GPU_SCRIPT], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["misses"] >= 2 and first["hits"] == 0
    assert second["hits"] == first["misses"] and second["misses"] == 0
    assert second["values"] == first["values"]
    # the loaded kernels against the CPU reference ops: +-1 on at most 1% of the int8 values (kernels.py's rounding)
    assert second["q_max_off"] <= 1 and second["q_share_off"] <= 0.01
