"""Listing a long history without reading all of it: the newest versions alone
(History.survey(last=N)), ids from the keys, and ``damaged()`` right after
``versions()`` reusing that survey's verdicts while nothing was committed since."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from engram.store import Store
from engram.store import format as fmt
from engram.store.history import History


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "s", mode="c") as s:
        for i in range(12):
            s.commit({"step": i}, message=f"step {i}")
        s.gc(drop=[3, 4, 9])  # gaps in the ids
    s = Store.open(tmp_path / "s", mode="w")
    yield s
    s.close()


def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The version ids whose manifests are read from now on."""
    read: list[int] = []
    manifest = History.manifest

    def spy(history: History, txn: Any, vid: int) -> Any:
        read.append(vid)
        return manifest(history, txn, vid)

    monkeypatch.setattr(History, "manifest", spy)
    return read


def spoil(s: Store, vid: int) -> None:
    key, db = vid.to_bytes(8, "big"), s.env.dbs[fmt.DB_VERSIONS]

    def work(txn: lmdb.Transaction) -> None:
        txn.put(key, b"#" + bytes(txn.get(key, db=db))[1:], db=db)

    s.env.write(work)


def test_ids_and_newest_ids_come_from_the_keys(store: Store) -> None:
    history = History(store.env)
    with store.env.read() as txn:
        assert history.ids(txn) == [1, 2, 5, 6, 7, 8, 10, 11, 12]
        assert history.ids(txn, since=7) == [7, 8, 10, 11, 12]
        assert history.ids(txn, since=9) == [10, 11, 12]
        assert history.ids(txn, since=13) == []
        assert history.newest_ids(txn, 4) == [8, 10, 11, 12]
        assert history.newest_ids(txn, 100) == history.ids(txn)
        assert history.newest_ids(txn, 0) == []
        assert history.count(txn) == 9


def test_the_newest_versions_read_only_their_manifests(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = History(store.env)
    read = reads(monkeypatch)
    assert [v.id for v in history.versions(last=3)] == [10, 11, 12]
    assert sorted(read) == [10, 11, 12]
    monkeypatch.undo()
    assert [v.message for v in history.versions(last=3)] == ["step 9", "step 10", "step 11"]
    assert history.versions(last=50) == history.versions()


def test_a_damaged_version_among_the_newest_is_reported_the_older_ones_are_not_read(
    store: Store,
) -> None:
    spoil(store, 11)
    spoil(store, 2)
    history = History(store.env)
    with store.env.read() as txn:
        good, damaged = history.survey(txn, last=3)
    assert [v.id for v in good] == [10, 12] and [vid for vid, _ in damaged] == [11]
    assert [vid for vid, _ in history.damaged()] == [2, 11]


def test_damaged_after_versions_reuses_the_survey_until_something_is_written(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    spoil(store, 5)
    assert [v.id for v in store.versions()][:3] == [1, 2, 6]
    read = reads(monkeypatch)
    assert [vid for vid, _ in store.damaged()] == [5]
    assert read == []  # the same snapshot: the verdicts of versions() stand
    spoil(store, 6)  # a write: a new snapshot
    assert [vid for vid, _ in store.damaged()] == [5, 6]
    assert read  # read again
    store.commit({"step": 99})
    read.clear()
    assert [vid for vid, _ in store.damaged()] == [5, 6] and read
