"""``file:///ABS/PATH`` remotes: a directory (a shared mount) used as an object store
through obstore's LocalStore, with engram's compare-and-swap by create-only claims
(engram.store.remote.client) since LocalStore has no If-Match."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from remote_helpers import assert_same_store, commit, make_store

import engram
from engram.errors import RemoteConflictError, RemoteError
from engram.store import Store
from engram.store.remote import pull, push
from engram.store.remote.client import AlreadyExists, ObjectStore, Stale
from engram.store.remote.lineage import read_head

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("error")]


@pytest.fixture(autouse=True)
def _obstore() -> None:
    pytest.importorskip("obstore")


def test_push_and_pull_through_a_directory(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    url = f"file://{tmp_path}/shared/runs/ewc"  # made by the first push
    make_store(a, 2)
    with Store.open(a, mode="w") as store:
        store.tag("prod", 1)
        store.tag("best", 2)
    assert push(a, url).pushed == [1, 2]
    report = pull(url, b)
    assert report.pulled == [1, 2] and report.tags == ["best", "prod"]  # created here
    assert_same_store(a, b)
    with Store.open(b, mode="w") as store:
        store.tag("prod", 2)  # b's own prod: a pull never moves a local tag
    with Store.open(a, mode="w") as store:
        store.tag("best", 1)
    assert push(a).tags == ["best"]
    assert pull(url, b).tags == []
    with Store.open(b) as store:
        assert store.tags() == {"prod": 2, "best": 2}
    root = tmp_path / "shared" / "runs" / "ewc"
    assert json.loads((root / "HEAD").read_text())["version"] == 2  # the rename landed
    with Store.open(b, mode="w") as store:
        commit(store, 2)
    assert push(b).pushed == [3]  # the URL is remembered
    assert pull(url, a).pulled == [3]
    assert_same_store(b, a)


def test_the_compare_and_swap_lets_exactly_one_writer_move_head(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/remote"
    make_store(tmp_path / "a", 1)
    push(tmp_path / "a", url)
    first, second = ObjectStore(url), ObjectStore(url)
    got = first.get("HEAD", swapped=True)
    assert got is not None and got.etag == hashlib.sha256(got.data).hexdigest()
    first.swap("HEAD", b'{"x": 1}', got.etag)
    with pytest.raises(Stale):  # the value it expected was claimed away
        second.swap("HEAD", b'{"x": 2}', got.etag)
    first.swap("HEAD", b'{"x": 1}', got.etag)  # a re-run of the winner's own move is fine
    assert second.get("HEAD", swapped=True).data == b'{"x": 1}'
    second.swap("fresh", b"b", None)  # created: None expects no value yet
    with pytest.raises(Stale):
        first.swap("fresh", b"a", None)
    assert first.get("fresh", swapped=True).data == b"b"
    big = tmp_path / "big"
    big.write_bytes(b"\0" * (12 << 20))  # past obstore's multipart threshold
    first.create("objects/big", big)
    with pytest.raises(AlreadyExists):
        second.create("objects/big", big)


def test_a_writer_killed_between_its_claim_and_the_rename_has_moved_head(tmp_path: Path) -> None:
    """The claim is the move: with HEAD's file left at the old value (the rename never
    happened), readers still see the new HEAD and a writer expecting the old one is
    refused."""
    url = f"file://{tmp_path}/remote"
    a, b = tmp_path / "a", tmp_path / "b"
    make_store(a, 1)
    push(a, url)
    pull(url, b)
    old = (tmp_path / "remote" / "HEAD").read_bytes()
    with Store.open(a, mode="w") as store:
        commit(store, 1)
    push(a)
    (tmp_path / "remote" / "HEAD").write_bytes(old)  # as if killed before the rename
    head, _ = read_head(ObjectStore(url))
    assert head.version == 2
    assert pull(url, tmp_path / "c").head == 2
    with Store.open(b, mode="w") as store:  # b committed its own v0002 meanwhile
        commit(store, 5)
    with pytest.raises(RemoteConflictError, match="not in the history"):
        push(b)


def test_a_tag_moving_back_and_forth_is_followed(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    url = f"file://{tmp_path}/remote"
    a = tmp_path / "a"
    make_store(a, 2)
    for vid in (1, 2, 1):  # a value seen before: the seq tells the two apart
        with Store.open(a, mode="w") as store:
            store.tag("prod", vid)
        assert push(a, url).tags == ["prod"]
    with engram.ModelHandle(f"{url}@prod", load=lambda store, vid, device: vid) as handle:
        assert handle.get()[0] == 1
        with Store.open(a, mode="w") as store:
            store.tag("prod", 2)
        push(a)
        assert handle.refresh() and handle.get()[0] == 2


def test_file_urls_name_an_absolute_directory(tmp_path: Path) -> None:
    for url in ("file://host/runs", "file://relative/runs", "file:///tmp/x?y=1"):
        with pytest.raises(RemoteError, match="file:///ABS/PATH"):
            ObjectStore(url)
    with pytest.raises(RemoteError, match="holds no engram store"):  # as an empty prefix
        pull(f"file://{tmp_path}/nothing", tmp_path / "b")
    assert not (tmp_path / "b").exists() and not (tmp_path / "nothing").exists()
