"""Shared fixtures: real stores in temporary directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engram.store import Store


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path):
    with Store.open(store_path, mode="c") as s:
        yield s


@pytest.fixture
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
