"""Shared fixtures: real stores in temporary directories."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
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


@pytest.fixture
def hold_writer_lock() -> Iterator[Callable[[Path], subprocess.Popen]]:
    """Call it with a store path: another process opens the store for writing and holds
    the lock until the test ends, or until the test closes the process's stdin."""
    holders: list[subprocess.Popen] = []

    def hold(path: Path) -> subprocess.Popen:
        code = textwrap.dedent(f"""
            import sys
            from engram.store import Store
            with Store.open({str(path)!r}, mode="w"):
                print("locked", flush=True)
                sys.stdin.read()
        """)
        holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        holders.append(holder)
        assert holder.stdout.readline() == "locked\n"
        return holder

    yield hold
    for holder in holders:
        if not holder.stdin.closed:
            holder.stdin.close()
        holder.wait()
