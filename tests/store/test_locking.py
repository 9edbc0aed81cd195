"""The writer lock between processes: contention, reclaim after SIGKILL, lock_timeout."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from children import LINUX_ONLY

from engram.errors import StoreLockedError
from engram.store import Store

pytestmark = LINUX_ONLY


HOLD_LOCK = """
path = sys.argv[1]
store = Store.open(path, mode="w")
print("locked", os.getpid(), flush=True)
command = sys.stdin.readline().strip()
if command.startswith("release-after"):
    time.sleep(float(command.split()[1]))
    store.close()
    print("released", flush=True)
    sys.stdin.readline()  # stay alive: the lock was released, not dropped by death
"""


def _make_store(path: Path) -> None:
    with Store.open(path, mode="c") as store:
        store.commit({"x": torch.arange(5)}, model={"w": torch.ones(3)}, meta={"i": 0})


def test_lock_held_by_another_process(spawn, tmp_path: Path) -> None:
    path = tmp_path / "store"
    _make_store(path)
    child = spawn(HOLD_LOCK, path)
    assert int(child.expect("locked").split()[1]) == child.pid
    for mode in ("w", "c"):
        with pytest.raises(StoreLockedError) as err:
            Store.open(path, mode=mode)
        assert f"pid {child.pid}" in str(err.value), str(err.value)
    # readers need no lock
    with Store.open(path, mode="r") as reader:
        assert reader.head.id == 1
        assert torch.equal(reader.load().state["x"], torch.arange(5))
    child.sigkill()  # the holder dies without closing anything
    child.finish()
    with Store.open(path, mode="w") as store:  # the kernel dropped its flock
        assert store.verify(all=True).ok
        assert store.commit({"x": torch.arange(6)}, meta={"i": 1}).id == 2
    with Store.open(path, mode="w"):  # and ours was released by close()
        pass


def test_lock_timeout_waits_for_release(spawn, tmp_path: Path) -> None:
    path = tmp_path / "store"
    _make_store(path)
    child = spawn(HOLD_LOCK, path)
    child.expect("locked")
    start = time.monotonic()
    with pytest.raises(StoreLockedError, match=f"pid {child.pid}"):
        Store.open(path, mode="w", lock_timeout=0.3)
    assert time.monotonic() - start >= 0.3  # it did wait before giving up
    child.send("release-after 0.5")
    start = time.monotonic()
    with Store.open(path, mode="w", lock_timeout=10) as store:
        waited = time.monotonic() - start
        assert 0.3 <= waited < 10, waited
        assert child.proc.poll() is None  # released by close(), the holder still runs
        assert store.commit({"x": torch.arange(7)}, meta={"i": 1}).id == 2
        # now we hold it: the lock file names us
        assert json.loads((path / "writer.lock").read_text())["pid"] == os.getpid()
    child.expect("released")
    child.send("exit")
    child.finish()
    assert child.proc.returncode == 0, child.stderr()
