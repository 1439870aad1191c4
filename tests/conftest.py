"""Shared fixtures: the real-data directory, tiny models compiled once per session, a fixed RNG state.

Test modules import their helpers (tiny-model builders, graph utilities) from helpers.py, not from here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zqcompile
from helpers import TINY_MODELS
from zqcompile.pretrained import data_dir as resolve_data_dir


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
