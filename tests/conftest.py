"""Shared fixtures: real test data from ../shared/data (a missing folder fails loudly, never skips)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()


def data_file(*parts: str) -> Path:
    """Path of a file in ../shared/data; fails (not skips) with where it looked."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"test data {path} not found: the tests read ../shared/data relative to the project root ({ROOT})")
    return path


@pytest.fixture
def data():
    return data_file
