"""Compiled Numba kernels on disk, so that a new process loads the fused kernels instead of compiling them again
(about a second each; without this, about a third of BERT-base's warm-cache ``warmup``: BENCHMARKS.md, "Serving").

This is Numba's own CUDA kernel cache (``cuda.jit(cache=True)``: index and data files, a cubin per compute
capability) with two changes. The key: Numba's keys a kernel by a pickle of its closure, and the fused kernels
close over the device functions and intrinsics their builders make, which do not pickle to stable bytes; a kernel
here is keyed by its builder's name and parameters (what decides its closure), with Numba's key parts kept (the
argument types, the GPU's compute capability and the Numba versions) and Numba's invalidation of a function's
whole index when its source file (kernels.py) changes. The place: ``<cache folder>/numba`` of the tuning cache's
folder (``$ZQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/zqcompile``, else ``~/.cache/zqcompile``);
``ZQ_KERNEL_CACHE=0`` turns it off.

The files are pickles, as Numba writes them, so they are read only from a folder that belongs to this user and
that no one else can write to (else a warning, and the kernels compile as without the cache); a file that cannot
be read back (truncated, corrupt) is ignored with a warning and the kernel compiled and stored again.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Callable

from numba.cuda.dispatcher import CUDACache, CUDACacheImpl

from zqcompile.backends.tuning_cache import cache_dir
from zqcompile.version import __version__

try:
    from numba.cuda.core import caching  # numba-cuda
except ImportError:  # the CUDA target bundled with numba
    from numba.core import caching


def enabled() -> bool:
    return os.environ.get("ZQ_KERNEL_CACHE", "1") != "0"


def kernel_cache_dir() -> Path:
    return cache_dir() / "numba"


@functools.cache  # read from the installed packages' metadata once, not for every kernel built
def _numba_versions() -> tuple[str, str]:
    try:
        numba_cuda = importlib.metadata.version("numba-cuda")
    except importlib.metadata.PackageNotFoundError:
        numba_cuda = "bundled"
    return importlib.metadata.version("numba"), numba_cuda


def check_private(path: Path) -> None:
    """Raise OSError unless ``path`` and the folders above it up to the cache folder belong to this user and are
    not writable by anyone else (another user who can write there could plant a pickle that loading would run)."""
    root, user = kernel_cache_dir(), os.getuid() if hasattr(os, "getuid") else None  # no uids on Windows
    for folder in (path, *path.parents):
        info = folder.stat()
        if (user is not None and info.st_uid != user) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise OSError(f"{folder} is not private to this user (owner uid {info.st_uid}, mode "
                          f"{stat.filemode(info.st_mode)}); make it owned by you and not group- or world-writable, "
                          "or point ZQ_CACHE_DIR elsewhere")
        if folder == root:
            return


class _Locator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """Numba's per-source-file cache subfolder, under zqcompile's cache folder, private (see ``check_private``)."""

    def __init__(self, py_func: Callable, py_file: str):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = str(kernel_cache_dir() / self.get_suitable_cache_subpath(py_file))

    def get_cache_path(self) -> str:
        return self._cache_path

    def ensure_cache_path(self) -> None:
        for folder in (kernel_cache_dir(), Path(self._cache_path)):  # 0o700 whatever the umask
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_private(Path(self._cache_path))
        super().ensure_cache_path()

    @classmethod
    def from_function(cls, py_func: Callable, py_file: str) -> "_Locator":
        locator = cls(py_func, py_file)
        locator.ensure_cache_path()  # an OSError propagates (Numba's locators return None): attach() reports it
        return locator


class _CacheImpl(CUDACacheImpl):
    _locator_classes = [_Locator]


class KernelDiskCache(CUDACache):
    """A kernel's disk cache keyed by ``build_key`` (its builder and parameters) instead of its closure."""

    _impl_class = _CacheImpl

    def __init__(self, py_func: Callable, build_key: str):
        self._build_key = (build_key, __version__, *_numba_versions())
        super().__init__(py_func)

    def _index_key(self, sig: Any, codegen: Any) -> tuple:
        return (sig, codegen.magic_tuple(), getattr(self, "_launch_config_key", None), self._build_key)

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        try:
            return super().load_overload(sig, target_context)
        except Exception as err:  # noqa: BLE001 - any unreadable entry means "compile it", never a failed launch
            warnings.warn(f"ignoring an unreadable compiled-kernel cache entry in {self.cache_path} "
                          f"({type(err).__name__}: {err}); compiling the kernel again", stacklevel=2)
            try:
                self.flush()  # an empty index, so that storing the compiled kernel does not read the bad one again
            except OSError:
                pass
            return None

    def save_overload(self, sig: Any, data: Any) -> None:
        try:
            super().save_overload(sig, data)
        except OSError as err:
            warnings.warn(f"cannot write the compiled-kernel cache in {self.cache_path} ({err}); set ZQ_CACHE_DIR to "
                          "a writable folder or ZQ_KERNEL_CACHE=0", stacklevel=2)


def attach(dispatcher: Any, build_key: str) -> None:
    """Give a ``cuda.jit`` kernel the disk cache, keyed by ``build_key``; where the cache folder is unusable
    (not private, not writable), a warning and the kernel keeps compiling in every process."""
    if not enabled():
        return
    try:
        dispatcher._cache = KernelDiskCache(dispatcher.py_func, build_key)  # what enable_caching() sets
    except OSError as err:
        warnings.warn(f"compiled Numba kernels are not cached on disk: {err}", stacklevel=2)
