"""Shared fixtures: the real-data directory, tiny and real models compiled once per session, a fixed RNG state.

Test modules import their helpers (tiny-model builders, graph utilities) from helpers.py, not from here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import zqcompile
from helpers import TINY_MODELS
from zqcompile.pretrained import data_dir as resolve_data_dir
from zqcompile.pretrained import load_pretrained


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files that hold a ``slow`` test (tens of seconds each) go first. scripts/test.sh hands whole files to the
    pytest-xdist workers in collection order (``--dist loadfile --no-loadscope-reorder``): a long file handed out
    last would keep one worker busy while the others sit idle."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within each group is kept


@pytest.fixture(autouse=True)
def _deterministic_rng():
    """Every test starts from the same RNG state, so its random inputs do not depend on test order."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data (``../shared/data`` or ``$ZQ_DATA_DIR``); a missing directory fails with the fix named."""
    return resolve_data_dir()


@pytest.fixture(scope="session")
def compiled_tiny():
    """``compiled_tiny(family, recipe) -> (fp_model, qmodel)``, compiled once per session and shared."""
    cache: dict[tuple[str, str], tuple[torch.nn.Module, zqcompile.QuantizedModel]] = {}

    def get(family: str, recipe: str = "w8a8"):
        if (family, recipe) not in cache:
            model = TINY_MODELS[family]()
            # the forward path only (tests/test_generation.py covers generate): a decoder compiles in half the time
            cache[family, recipe] = (model, zqcompile.compile(model, recipe, generation=False))
        return cache[family, recipe]
    return get


@pytest.fixture(scope="session")
def pretrained():
    """``pretrained(name) -> (model, tokenizer)``: each shipped real model loaded once per session (read-only: a
    test that needs another tokenizer setting passes it per call, e.g. ``padding_side="left"``)."""
    return functools.lru_cache(maxsize=None)(load_pretrained)


@pytest.fixture(scope="session")
def compiled_pretrained(pretrained):
    """``compiled_pretrained(name, recipe, generation=False) -> (fp_model, qmodel, tokenizer)``, compiled once per
    session and shared across test modules: a real decoder's torch.export is the slowest step of the suite (tens of
    seconds for SmolLM2's 30 layers), so test_real_models measures the perplexity of the same W8A8 SmolLM2 that
    test_generation generates with. ``generation=True`` compiles the generation graph too (a 128-slot KV cache); a
    model compiled with it also serves the forward-only requests."""
    cache: dict[tuple[str, str], tuple[torch.nn.Module, zqcompile.QuantizedModel, object]] = {}

    def get(name: str, recipe: str, generation: bool = False):
        cached = cache.get((name, recipe))
        if cached is None or (generation and cached[1].generation is None):
            model, tokenizer = pretrained(name)
            options = {"max_cache_len": 128} if generation else {"generation": False}
            cache[name, recipe] = (model, zqcompile.compile(model, recipe, **options), tokenizer)
        return cache[name, recipe]
    return get
