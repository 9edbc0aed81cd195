"""``engram gc`` of a remote: what a failed push left is removed, every version stays,
and a push in flight — paused between its files and its marker while a gc deletes
them — loses nothing (the fence makes it put them back before it moves HEAD)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from remote_helpers import assert_same_store, commit, make_store
from test_push_processes import finish, remote_head, start

from engram.cli import main as engram
from engram.errors import RemoteError
from engram.store import Store
from engram.store.remote import pull, push
from engram.store.remote.client import ObjectStore
from engram.store.remote.gc import _start, gc
from engram.store.remote.layout import GC_KEY, HEAD_KEY

pytestmark = pytest.mark.timeout(180)
push_steps = importlib.import_module("engram.store.remote.push")  # the module, not push()


class Stopped(Exception):
    """A push stopped right before it moves HEAD (as a network failure would)."""


def left_behind(path: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """A store at v2 whose remote is at v1 plus the files, segment and marker of a
    push of v2 that stopped before HEAD; the keys that push wrote."""
    make_store(path, 1)
    push(path, url)
    before = set(ObjectStore(url).list(""))
    with Store.open(path, mode="w") as store:
        commit(store, 1)

    def stop(*args: object, **kwargs: object) -> None:
        raise Stopped

    with monkeypatch.context() as m:
        m.setattr(push_steps, "_move_head", stop)
        with pytest.raises(Stopped):
            push(path)
    return set(ObjectStore(url).list("")) - before


def test_gc_removes_what_a_stopped_push_left_and_keeps_every_version(
    tmp_path, s3, remote_url, monkeypatch
):
    a = tmp_path / "a"
    orphans = left_behind(a, remote_url, monkeypatch)
    assert any(k.startswith("versions/v0002-") for k in orphans)  # files, segment, marker
    assert any(k.startswith("objects/") for k in orphans)

    dry = gc(remote_url, dry_run=True, grace_s=0)
    assert {r["key"] for r in dry.removed} == orphans and dry.dry_run
    assert orphans <= set(s3.keys(remote_url))  # a dry run removes nothing
    assert GC_KEY not in s3.keys(remote_url)  # nor writes the fence

    young = gc(remote_url)  # the default grace (24 h): all of it is too recent
    assert young.removed == [] and {r["key"] for r in young.recent} == orphans

    report = gc(remote_url, grace_s=0)
    assert {r["key"] for r in report.removed} == orphans
    assert report.removed_bytes == sum(r["bytes"] for r in report.removed) > 0
    assert report.head == 1 and report.versions == 1 and report.recent == []
    assert not orphans & set(s3.keys(remote_url))
    assert remote_head(remote_url, tmp_path / "before") == 1  # v1 whole, verified
    assert gc(remote_url, grace_s=0).removed == []  # nothing more to collect

    assert push(a).pushed == [2]  # the push puts back what it needs
    assert remote_head(remote_url, tmp_path / "after") == 2
    assert_same_store(a, tmp_path / "after")


@pytest.mark.skipif(sys.platform != "linux", reason="the child harness is Linux's")
def test_a_push_paused_between_its_files_and_its_marker_loses_nothing(tmp_path, s3, remote_url):
    a = tmp_path / "a"
    make_store(a, 1)
    push(a, remote_url)
    with Store.open(a, mode="w") as store:
        commit(store, 1)
    before = set(s3.keys(remote_url))
    paused = start("_upload_files", "wait", a)  # v2's files are up; no segment, no marker
    try:
        assert paused.stdout.readline() == "at _upload_files\n"
        uploaded = set(s3.keys(remote_url)) - before
        assert uploaded  # v2's new pack and checkpoint file

        assert gc(remote_url).removed == []  # the grace keeps a push's recent files
        report = gc(remote_url, grace_s=0)  # no grace: deleted under the push's feet
        assert {r["key"] for r in report.removed} == uploaded
        assert not uploaded & set(s3.keys(remote_url))
    finally:
        paused.stdin.write("go\n")
        paused.stdin.flush()
    code, _, err = finish(paused)
    assert code == 0, err  # it saw the gc's fence move and put its files back
    assert uploaded <= set(s3.keys(remote_url))
    assert remote_head(remote_url, tmp_path / "clone") == 2
    assert_same_store(a, tmp_path / "clone")


def test_a_push_waits_for_a_gc_that_is_deleting_and_a_stopped_one_is_finished_by_the_next(
    tmp_path, s3, remote_url, monkeypatch
):
    a = tmp_path / "a"
    make_store(a, 1)
    push(a, remote_url)
    with Store.open(a, mode="w") as store:
        commit(store, 1)
    _start(ObjectStore(remote_url))  # a gc killed while it deleted: its fence says running
    monkeypatch.setattr(push_steps, "GC_WAIT_S", 0.5)
    with pytest.raises(RemoteError, match="still deleting") as caught:
        push(a)
    assert "\n" not in str(caught.value) and f"engram gc {remote_url}" in str(caught.value)
    assert remote_head(remote_url, tmp_path / "before") == 1  # v2 not published

    gc(remote_url, grace_s=0)  # the next gc finishes (and collects what that push left)
    assert push(a).pushed == [2]
    assert remote_head(remote_url, tmp_path / "after") == 2
    assert_same_store(a, tmp_path / "after")


def test_gc_of_a_file_remote_keeps_its_claims_and_every_version(tmp_path, monkeypatch):
    pytest.importorskip("obstore")
    a, url = tmp_path / "a", f"file://{tmp_path}/shared"
    orphans = left_behind(a, url, monkeypatch)
    claims = {k for k in ObjectStore(url).list("") if k.startswith("claims/")}
    head = ObjectStore(url).get(HEAD_KEY, swapped=True)

    report = gc(url, grace_s=0)
    assert {r["key"] for r in report.removed} == orphans
    keys = set(ObjectStore(url).list(""))
    assert not orphans & keys and claims <= keys  # a claim is a move: never collected
    assert ObjectStore(url).get(HEAD_KEY, swapped=True).data == head.data
    assert push(a).pushed == [2]
    pull(url, tmp_path / "b")
    assert_same_store(a, tmp_path / "b")


def test_gc_removes_nothing_from_a_remote_whose_history_is_damaged(
    tmp_path, s3, remote_url, monkeypatch
):
    orphans = left_behind(tmp_path / "a", remote_url, monkeypatch)
    segment = next(
        k for k in s3.keys(remote_url) if k.startswith("objects/") and k not in orphans
        and s3.read(remote_url, k).startswith(b"ENGRAMS1")
    )  # fmt: skip
    s3.client.delete_object(Bucket="engram-remote-tests", Key=s3.key_of(remote_url, segment))
    with pytest.raises(RemoteError, match="gc removes nothing") as caught:
        gc(remote_url, grace_s=0)
    assert "\n" not in str(caught.value)
    assert orphans <= set(s3.keys(remote_url))


def test_the_cli(tmp_path, s3, remote_url, monkeypatch, capsys):
    orphans = left_behind(tmp_path / "a", remote_url, monkeypatch)
    capsys.readouterr()
    assert engram(["gc", remote_url, "--dry-run", "--grace", "0"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and f"would remove {len(orphans)} unreferenced objects" in out
    assert all(key in out for key in orphans) and "of 1 versions (HEAD v0001)" in out
    assert orphans <= set(s3.keys(remote_url))

    assert engram(["gc", remote_url]) == 0
    out = capsys.readouterr().out
    assert "removed 0 unreferenced" in out and "younger than the grace period (1d" in out

    for args, says in (
        (["gc", str(tmp_path / "a"), "--dry-run"], "for a remote"),
        (["gc", remote_url, "--keep-last", "1"], "--keep-last is for a local store"),
        (["gc", remote_url, "--grace", "soon"], "is not a duration"),
        (["gc", f"{remote_url}-nothing-here"], "holds no engram store"),
    ):
        assert engram(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, (args, err)

    assert engram(["gc", remote_url, "--grace", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {r["key"] for r in result["removed"]} == orphans and result["head"] == 1
