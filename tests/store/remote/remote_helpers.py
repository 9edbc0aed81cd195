"""Stores for the remote's tests: a small deterministic training run, and the check that
a pulled store is its origin bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch

from engram.store import SampleIds, Store
from engram.store import format as fmt
from trees import assert_same_tree

BIG = 256 * 1024  # floats of a tensor every version keeps (1 MiB): pushed once
SMALL = 1024  # floats of the tensor each version changes (4 KiB)


def commit(store: Store, i: int) -> int:
    """Version ``i`` of a small training run: a kept tensor, a changed one, replay
    samples (one new per version), and weights that change every other version."""
    ids = store.samples.append([bytes([i % 256]) * 64])
    previous = store.head
    table = list(store.load(state=True, model=False).state["buffer"].tolist()) if previous else []
    state = {
        "kept": torch.arange(BIG, dtype=torch.float32),
        "step": torch.full((SMALL,), float(i)),
        "buffer": SampleIds.of(torch.tensor(table + ids, dtype=torch.int64)),
        "clock": {"experience": i},
    }
    weights = {"lin.weight": torch.full((4, 4), float(i // 2))}
    return store.commit(state, model=weights, meta={"experience": i}).id


def make_store(path: Path, versions: int) -> None:
    with Store.open(path, mode="c") as store:
        for i in range(versions):
            commit(store, i)


def assert_same_store(a: Path, b: Path) -> None:
    """``b`` holds ``a``'s versions bit for bit, and verifies clean."""
    with Store.open(a) as left, Store.open(b) as right:
        assert right.store_id == left.store_id
        assert [v.id for v in right.versions()] == [v.id for v in left.versions()]
        assert right.head.id == left.head.id
        for v in left.versions():
            assert right.manifest(v.id) == left.manifest(v.id)
            x, y = left.load(v.id), right.load(v.id)
            assert_same_tree(x.state, y.state)
            assert_same_tree(x.model, y.model)
        report = right.verify(all=True)
        assert report.ok, [str(p) for p in report.problems]
    for sub in (fmt.CHECKPOINT_DIR, fmt.BLOB_DIR):
        for file in (b / sub).iterdir():
            assert file.read_bytes() == (a / sub / file.name).read_bytes(), file.name
