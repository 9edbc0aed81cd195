"""Shared fixtures: real stores in temporary directories."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.store import Store

# Set by pytest itself, or once by a library on first import (OpenMP, torch's inductor):
# not a test's doing.
_IMPORT_TIME_ENV = {"PYTEST_CURRENT_TEST", "KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK",
                    "TORCHINDUCTOR_CACHE_DIR"}  # fmt: skip


_SESSION_START = (
    torch.get_num_threads(),
    torch.get_default_dtype(),
    (torch.are_deterministic_algorithms_enabled(),
     torch.is_deterministic_algorithms_warn_only_enabled()),
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
    os.getcwd(),
)  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_global_state() -> Iterator[None]:
    """Every test leaves the process as it found it, so the suite passes in any order
    (pytest-randomly shuffles it): torch's threads, default dtype, deterministic flags
    and RNG streams, numpy's and Python's RNG, the working directory and the
    environment. A test that leaks one of these fails here, naming it."""
    # Compared with the values the session started with, not the test's: a module-scoped
    # fixture runs before this one and could otherwise leak unseen.
    threads, dtype, deterministic, cudnn, cwd = _SESSION_START
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    environ = dict(os.environ)
    yield
    leaked = []
    if torch.get_num_threads() != threads:
        leaked.append(f"torch threads {threads} -> {torch.get_num_threads()}")
        torch.set_num_threads(threads)
    if torch.get_default_dtype() != dtype:
        leaked.append(f"default dtype {dtype} -> {torch.get_default_dtype()}")
        torch.set_default_dtype(dtype)
    now = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
    if now != deterministic:
        leaked.append(f"deterministic algorithms {deterministic} -> {now}")
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    if (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) != cudnn:
        leaked.append("cudnn flags")
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    if os.getcwd() != cwd:
        leaked.append(f"cwd {cwd} -> {os.getcwd()}")
        os.chdir(cwd)
    changed = {k for k, _ in set(os.environ.items()) ^ set(environ.items())} - _IMPORT_TIME_ENV
    if changed:
        leaked.append(f"environment variables {sorted(changed)}")
        for key in changed:
            if key in environ:
                os.environ[key] = environ[key]
            else:
                del os.environ[key]
    # RNG streams are consumed by every test that draws a number: restored, not reported.
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])
    if leaked:
        pytest.fail("the test changed global state it must restore: " + "; ".join(leaked))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The default timeout (pyproject) guards against hangs; slow studies run longer.
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(3600))
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


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
