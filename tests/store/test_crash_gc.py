"""SIGKILL right after each step of ``gc``: a consistent store, and gc finishes."""

from __future__ import annotations

import inspect
import signal
from pathlib import Path

import pytest
import torch
from children import (
    LINUX_ONLY,
    assert_deletion_cut_short,
    assert_no_leftovers,
    assert_same,
    make_weights,
)

from engram.store import Store

pytestmark = LINUX_ONLY


GC_CRASH = """
path, point = sys.argv[1], sys.argv[2]
with Store.open(path, mode="c") as store:
    for i in range(3):
        store.commit(gc_state(i), model=linear(i), meta={"i": i})
    crash_at(point)
    report = store.gc(keep_last=1)
    sys.setprofile(None)
    print("survived", report, flush=True)
"""


def gc_state(i: int) -> dict:
    """4 MiB shared by every version, 8 MiB of its own: ``gc(keep_last=1)`` repacks."""
    return {
        "shared": torch.arange(1 << 20, dtype=torch.float32),
        "own": torch.full((1 << 21,), float(i)),
    }


@pytest.mark.parametrize(
    ("point", "versions_left"),
    [
        ("finish", [1, 2, 3]),  # the repacked pack is written, nothing published
        ("sweep", [1, 2, 3]),  # inside the LMDB txn
        ("write", [3]),  # the index moved to the new pack, no file removed yet (Env.write)
        ("unlink", [3]),  # one old pack removed, the others not yet
    ],
    ids=["repack-written", "in-lmdb-txn", "index-swept", "first-unlink"],
)
def test_sigkill_during_gc(spawn, tmp_path: Path, point: str, versions_left) -> None:
    """gc is crash-safe too: a kill at any step leaves a consistent store; gc finishes."""
    path = tmp_path / "store"
    child = spawn(
        inspect.getsource(gc_state) + GC_CRASH,  # the child needs gc_state too
        path,
        point,
    )
    lines = child.finish()
    assert child.proc.returncode == -signal.SIGKILL, (lines, child.stderr())
    if point == "unlink":
        assert_deletion_cut_short(path)
    with Store.open(path, mode="w") as store:
        report = store.verify(all=True)
        assert report.ok, [str(p) for p in report.problems]
        assert [v.id for v in store.versions()] == versions_left
        assert store.head.id == 3
        for vid in versions_left:
            snap = store.load(vid, verify=True)
            assert_same(snap.state, gc_state(vid - 1))
            assert_same(snap.model, make_weights(vid - 1), "model")
        store.gc(keep_last=1)
        assert [v.id for v in store.versions()] == [3]
        assert store.verify(all=True).ok
        assert_same(store.load(verify=True).state, gc_state(2))
        after = store.commit(gc_state(3), model=make_weights(3), meta={"i": 3})
        assert after.id == 4
        assert_same(store.load(verify=True).state, gc_state(3))
    assert_no_leftovers(path)
