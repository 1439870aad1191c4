"""zqcompile.pretrained.data_dir: where the real data is looked for, and the error that names the fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import zqcompile
from zqcompile import ZQError
from zqcompile.pretrained import data_dir


def test_data_dir_follows_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("ZQ_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path


def test_missing_data_dir_names_the_path_and_the_fix(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-data"
    monkeypatch.setenv("ZQ_DATA_DIR", str(missing))
    with pytest.raises(ZQError, match=rf"ZQ_DATA_DIR is '{re.escape(str(missing))}', which is not a directory"):
        data_dir()


def test_default_data_dir_is_beside_the_checkout_or_named_in_the_error(monkeypatch):
    monkeypatch.delenv("ZQ_DATA_DIR", raising=False)
    expected = Path(zqcompile.__file__).resolve().parents[1].parent / "shared" / "data"
    if expected.is_dir():
        assert data_dir() == expected
    else:
        with pytest.raises(ZQError, match=rf"real data not found at {re.escape(str(expected))} .*set ZQ_DATA_DIR"):
            data_dir()
