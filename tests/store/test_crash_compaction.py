"""SIGKILL right after each step of ``compact``: every version restores bit-exactly,
and compact and gc finish without leaving an orphan file."""

from __future__ import annotations

import inspect
import signal
from pathlib import Path

import pytest
import torch
from children import LINUX_ONLY, assert_deletion_cut_short, assert_no_leftovers, assert_same

from engram.store import Store

pytestmark = LINUX_ONLY


def tuned_weights(i: int) -> dict:
    """Weights of fine-tuning step ``i``: every float moves a little, as under SGD."""
    g = torch.Generator().manual_seed(31)
    weight, bias = torch.randn(64, 256, generator=g), torch.randn(256, generator=g)
    for _ in range(i):
        weight = weight - 1e-3 * torch.randn(64, 256, generator=g)
        bias = bias - 1e-3 * torch.randn(256, generator=g)
    return {"weight": weight, "bias": bias}


def tuned_state(i: int) -> dict:
    """A state with a fine-tuned tensor, a changing random one and a constant one."""
    return {
        "fisher": tuned_weights(i)["weight"].abs(),
        "rng": torch.randint(0, 255, (4096,), generator=torch.Generator().manual_seed(i)),
        "shared": torch.arange(1 << 16, dtype=torch.float32),
        "i": i,
    }


COMPACT_CRASH = """
path, point = sys.argv[1], sys.argv[2]
with Store.open(path, mode="c") as store:
    for i in range(4):
        store.commit(tuned_state(i), model=tuned_weights(i), meta={"i": i})
    crash_at(point)
    report = store.compact()
    sys.setprofile(None)
    print("survived", report, flush=True)
"""


@pytest.mark.parametrize(
    ("point", "compacted"),
    [
        ("finish", False),  # the pack of delta-coded blobs is written, nothing published
        ("swap", False),  # inside the LMDB txn
        ("write", True),  # index and manifests swapped, no old file removed yet (Env.write)
        ("unlink", True),  # the first old file removed, the others not yet
    ],
    ids=["pack-written", "in-lmdb-txn", "swapped", "first-unlink"],
)
def test_sigkill_during_compaction(spawn, tmp_path: Path, point: str, compacted: bool) -> None:
    """compact is crash-safe: after a kill at any step every version restores
    bit-exactly, verify is clean, compact and gc finish and leave no orphan file."""
    path = tmp_path / "store"
    child = spawn(
        inspect.getsource(tuned_weights) + inspect.getsource(tuned_state) + COMPACT_CRASH,
        path,
        point,
    )
    lines = child.finish()
    assert child.proc.returncode == -signal.SIGKILL, (lines, child.stderr())
    if point == "unlink":
        assert_deletion_cut_short(path)

    def check(store: Store) -> None:
        report = store.verify(all=True)
        assert report.ok, [str(p) for p in report.problems]
        assert [v.id for v in store.versions()] == [1, 2, 3, 4] and store.head.id == 4
        for vid in (1, 2, 3, 4):
            snap = store.load(vid, verify=True)
            assert_same(snap.state, tuned_state(vid - 1))
            assert_same(snap.model, tuned_weights(vid - 1), "model")

    with Store.open(path, mode="w") as store:
        assert store.info(1).compacted == compacted
        check(store)
        store.compact()
        assert all(store.info(v).compacted for v in (1, 2, 3)) and not store.info().compacted
        check(store)
        store.gc()
        check(store)
    assert_no_leftovers(path)
