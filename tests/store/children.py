"""Real child processes for the store's crash, locking and reader tests.

The tests (``test_crash_*.py``, ``test_write_failure.py``, ``test_locking.py``,
``test_concurrent_readers.py``) run real child processes (``sys.executable -c
<script>``) on a real store (LMDB, pack files, safetensors checkpoints) in a temporary
directory; nothing is mocked. Children only import torch and engram.store, and every
random choice is seeded, so a failure replays.

A child can kill itself right after a named step (``crash_at``: SIGKILL as soon as a
function of that name returns). The steps are the store's own functions: ``finish``
(a pack file written and fsynced), ``write_safetensors`` and ``write_checkpoint`` (the
checkpoint file), ``publish``, ``sweep`` and ``swap`` (inside the LMDB transaction of
a commit, gc and compaction), ``write`` (``engram.store.env.Env.write``: that
transaction committed), ``unlink``, ``mkdir`` and ``_init_meta``.

Children import torch (seconds): a pool (the ``spawn`` fixture, tests/store/conftest.py)
keeps the next child importing while a test runs.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import lmdb
import pytest
import torch

from engram.store import Store
from engram.store.blobs import FileBlob, decode_entry
from engram.store.format import BLOB_DIR, CHECKPOINT_DIR, DB_BLOBS, LMDB_DIR
from engram.store.records import unseal
from trees import assert_same_tree

# SIGKILL/RLIMIT_FSIZE/flock semantics are Linux's: each test module skips elsewhere.
LINUX_ONLY = pytest.mark.skipif(
    sys.platform != "linux", reason="SIGKILL/RLIMIT_FSIZE/flock semantics are Linux's"
)

# A child blocks at most this long waiting for its parent; any wait of the parent
# is bounded too, so a broken store fails a test instead of hanging the run.
WAIT_S = 90.0


# ----------------------------------------------------------- deterministic data
# These two functions run in the children too (their source is sent along), so the
# parent can regenerate exactly what a child committed from its ``meta["i"]``.


def make_state(i: int) -> dict:
    """The state committed as step ``i``: tensors of 1-8 MiB and of odd sizes, nesting."""
    g = torch.Generator().manual_seed(10_007 * (i + 1))
    mib = (1, 2, 4, 8)[i % 4]
    odd = int(torch.randint(1, 300_000, (1,), generator=g))
    return {
        "big": torch.randn(mib * (1 << 18), generator=g),  # float32: 1, 2, 4 or 8 MiB
        "odd": torch.randint(-1000, 1000, (odd,), generator=g, dtype=torch.int32),
        "optimizer": {"state": {0: {"exp_avg": torch.randn(7, 5, generator=g)}}, "step": i},
        "rng": torch.randint(0, 255, (64,), generator=g, dtype=torch.uint8),
        "shared": torch.arange(4096, dtype=torch.float64),  # equal every step: deduplicated
        "half": torch.randn(33, generator=g).to(torch.bfloat16),
        "i": i,
        "name": f"step-{i}",
        "pair": (i, [float(i), None]),
    }


def make_weights(i: int) -> dict:
    """nn.Linear(64, 32) weights of step ``i``; equal for 2i and 2i+1 (shared checkpoint)."""
    g = torch.Generator().manual_seed(777 + i // 2)
    return {"weight": torch.randn(32, 64, generator=g), "bias": torch.randn(32, generator=g)}


_GEN_SRC = inspect.getsource(make_state) + "\n" + inspect.getsource(make_weights)

_PRELUDE = (
    textwrap.dedent(
        """
        import json, os, resource, signal, sys, threading, time
        import torch
        from engram.store import Store
        from engram.errors import CommitError

        # steps whose name alone is too common: the store file they must return from
        _STEP_FILES = {"write": os.path.join("engram", "store", "env.py")}

        def crash_at(name, match=None):
            # SIGKILL this process as soon as a function called `name` returns
            file = _STEP_FILES.get(name)
            def hook(frame, event, arg):
                if (
                    event == "return"
                    and frame.f_code.co_name == name
                    and (file is None or frame.f_code.co_filename.endswith(file))
                    and (match is None or match(frame))
                ):
                    os.kill(os.getpid(), signal.SIGKILL)
            sys.setprofile(hook)
            threading.setprofile(hook)  # commit steps run in worker threads too

        def linear(i):
            model = torch.nn.Linear(64, 32)
            with torch.no_grad():
                for name, value in make_weights(i).items():
                    getattr(model, name).copy_(value)
            return model
        """
    )
    + _GEN_SRC
)


# A child interpreter imports torch and engram (seconds) before it reads, from its
# first stdin line, the script it is to run and its argv. The pool below keeps one
# such child warming up while a test runs, so children start with their imports done.
_BOOT = _PRELUDE + textwrap.dedent(
    """
    _request = json.loads(sys.stdin.readline())
    sys.argv = ["-c", *_request["args"]]
    exec(compile(_request["body"], "<child>", "exec"))
    """
)


# ------------------------------------------------------------------ helpers


class Child:
    """A ``python -c script`` child whose stdout lines are read by a thread."""

    def __init__(self, script: str, *args: object, log: Path) -> None:
        self.log = log
        self._err = open(log, "wb")  # noqa: SIM115 - closed in finish()
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def stderr(self) -> str:
        if not self._err.closed:
            self._err.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def expect(self, prefix: str, timeout: float = WAIT_S) -> str:
        """The next stdout line starting with ``prefix`` (other lines are kept)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"child {self.pid} did not print {prefix!r}:\n{self.stderr()}")
            if line is None:
                self._queue.put(None)
                pytest.fail(
                    f"child {self.pid} exited (rc={self.proc.wait()}) before printing "
                    f"{prefix!r}; stdout={self.lines}\n{self.stderr()}"
                )
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def sigkill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        rc = self.proc.wait(timeout=WAIT_S)
        assert rc == -signal.SIGKILL, (
            f"child {self.pid} had already exited ({rc}):\n{self.stderr()}"
        )

    def finish(self, timeout: float = WAIT_S) -> list[str]:
        """Wait for the child to exit; return every line it printed."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"child {self.pid} did not exit:\n{self.stderr()}")
        self._reader.join(timeout=WAIT_S)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        with contextlib.suppress(OSError):
            self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.stdout.close()  # type: ignore[union-attr]
        self._err.close()
        return self.lines

    def stop(self) -> None:
        """Teardown: kill this child (by its own pid) if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT_S)
        if not self._err.closed:
            self.finish(timeout=WAIT_S)


class Pool:
    """Hands out children that are already importing; starts the next one meanwhile."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started = 0
        self.spare: Child | None = None

    def _start(self) -> Child:
        self.started += 1
        return Child(_BOOT, log=self.logs / f"child-{self.started}.stderr")

    def take(self, body: str, args: tuple[object, ...]) -> Child:
        child = self.spare if self.spare is not None else self._start()
        self.spare = self._start()
        child.send(json.dumps({"body": textwrap.dedent(body), "args": [str(a) for a in args]}))
        return child

    def close(self) -> None:
        if self.spare is not None:
            self.spare.stop()
            self.spare = None


def blob_packs_referenced(path: Path) -> set[str]:
    """Names of the pack files the LMDB blob index points into (read with lmdb directly)."""
    env = lmdb.open(str(path / LMDB_DIR), readonly=True, max_dbs=8, subdir=True)
    try:
        db = env.open_db(DB_BLOBS, create=False)
        with env.begin(db=db) as txn:
            packs = set()
            for key, value in txn.cursor(db=db):
                entry = decode_entry(unseal(DB_BLOBS, key, value), key.hex())  # format 3
                if not isinstance(entry, FileBlob):  # plain and delta-coded blobs
                    packs.add(entry.pack)
            return {f"pack-{pack:08d}.bin" for pack in packs}
    finally:
        env.close()


def assert_no_leftovers(path: Path) -> None:
    """After gc: every pack and checkpoint file on disk is referenced, no temp files."""
    with Store.open(path) as store:
        checkpoints = {v.checkpoint for v in store.versions() if v.checkpoint is not None}
    assert set(os.listdir(path / CHECKPOINT_DIR)) == checkpoints
    assert set(os.listdir(path / BLOB_DIR)) == blob_packs_referenced(path)


def assert_deletion_cut_short(path: Path) -> None:
    """The kill landed between two file deletions: the first pack (unlinked first, in
    name order) is gone, and unreferenced files are still there."""
    packs = set(os.listdir(path / BLOB_DIR))
    assert "pack-00000001.bin" not in packs, packs
    with Store.open(path) as store:
        checkpoints = {v.checkpoint for v in store.versions() if v.checkpoint is not None}
    unreferenced = (packs - blob_packs_referenced(path)) | (
        set(os.listdir(path / CHECKPOINT_DIR)) - checkpoints
    )
    assert unreferenced, "every old file was removed: the kill came after the last deletion"


def assert_same(a: object, b: object, where: str = "state") -> None:
    """The crash tests' check: bit for bit, dict keys in any order (a child's state and
    what a load returns may list them differently)."""
    assert_same_tree(a, b, where, key_order=False)
