"""Push and pull against a real S3 implementation (moto's server, conftest.py).

A pushed store pulled into an empty directory is the same store, bit for bit: same ids,
same state and weights, same files, verify clean, and it takes further commits. A push
uploads what the new version adds, not the store. What a remote serves is checked by
hash: a damaged object is refused, never used. Missing credentials, a remote that is
down, a URL carrying credentials: one line each.
"""

from __future__ import annotations

import hashlib
import importlib

import pytest
from remote_helpers import BIG, SMALL, assert_same_store, commit, make_store

from engram.cli import main as engram
from engram.errors import RemoteConflictError, RemoteError, RemoteUnreachableError
from engram.store import Store
from engram.store import format as fmt
from engram.store.remote import pull, push, unpushed
from engram.store.remote.layout import object_key
from trees import assert_same_tree

pytestmark = pytest.mark.timeout(120)


def test_push_then_pull_into_an_empty_directory_is_the_same_store(tmp_path, s3, remote_url):
    make_store(tmp_path / "a", 1)
    report = push(tmp_path / "a", remote_url)
    assert report.pushed == [1] and report.head == 1

    pulled = pull(remote_url, tmp_path / "b")
    assert pulled.pulled == [1] and pulled.head == 1
    assert_same_store(tmp_path / "a", tmp_path / "b")
    assert "remote.json" in {p.name for p in (tmp_path / "b").iterdir()}
    with Store.open(tmp_path / "b", mode="w") as store:  # a normal store: it goes on
        assert commit(store, 1) == 2
        assert store.verify(all=True).ok


def test_resume_on_a_machine_with_no_store_continues_bit_identical(tmp_path, s3, remote_url):
    """Two machines: the first commits 3 versions and pushes; the second pulls, commits
    the 4th and pushes; the first pulls it back. Both then hold the same 4 versions."""
    make_store(tmp_path / "a", 3)
    push(tmp_path / "a", remote_url)
    pull(remote_url, tmp_path / "b")
    with Store.open(tmp_path / "b", mode="w") as store:
        assert commit(store, 3) == 4
    assert push(tmp_path / "b").pushed == [4]  # the URL is remembered
    assert pull(remote_url, tmp_path / "a").pulled == [4]
    assert_same_store(tmp_path / "b", tmp_path / "a")
    # the continuation equals an uninterrupted run of the same 4 commits
    make_store(tmp_path / "c", 4)
    with Store.open(tmp_path / "a") as resumed, Store.open(tmp_path / "c") as straight:
        assert_same_tree(resumed.load().state, straight.load().state)
        assert_same_tree(resumed.load().model, straight.load().model)


def test_push_uploads_what_a_version_adds_not_the_store(tmp_path, s3, remote_url):
    path = tmp_path / "a"
    sent = []
    with Store.open(path, mode="c") as store:
        commit(store, 0)
    sent.append(push(path, remote_url).uploaded_bytes)
    for i in range(1, 12):
        with Store.open(path, mode="w") as store:
            commit(store, i)
        sent.append(push(path).uploaded_bytes)
    assert sent[0] > 4 * BIG  # the kept tensor, once
    added = 4 * SMALL + 64 + 64 * 2  # the changed tensor, a sample, the weights (odd versions)
    overhead = 4096  # segment header, marker, HEAD; small JSON
    for n in sent[1:]:
        assert n <= added + 4096 + overhead, sent
    assert max(sent[-4:]) <= max(sent[1:5]) + 512, sent  # not growing with the store
    assert push(path).uploaded_bytes == 0  # up to date: nothing written


def test_pull_updates_a_clone_incrementally(tmp_path, s3, remote_url):
    make_store(tmp_path / "a", 2)
    push(tmp_path / "a", remote_url)
    first = pull(remote_url, tmp_path / "b")
    with Store.open(tmp_path / "a", mode="w") as store:
        commit(store, 2)
    push(tmp_path / "a")
    second = pull(remote_url, tmp_path / "b")
    assert second.pulled == [3]
    assert second.downloaded_bytes < first.downloaded_bytes / 10
    assert_same_store(tmp_path / "a", tmp_path / "b")
    assert pull(remote_url, tmp_path / "b").pulled == []


@pytest.mark.parametrize("what", ["pack", "checkpoint", "segment", "marker", "HEAD"])
def test_a_damaged_remote_object_is_refused_not_used(tmp_path, s3, remote_url, what):
    make_store(tmp_path / "a", 1)
    push(tmp_path / "a", remote_url)
    with Store.open(tmp_path / "a") as store:
        ckpt = store.checkpoint_path()
    pack = next((tmp_path / "a" / fmt.BLOB_DIR).iterdir())
    keys = s3.keys(remote_url)
    if what in ("pack", "checkpoint"):
        digest = hashlib.sha256((pack if what == "pack" else ckpt).read_bytes()).hexdigest()
        key = object_key(digest)
    elif what == "marker":
        key = next(k for k in keys if k.startswith("versions/"))
    elif what == "HEAD":
        key = "HEAD"
    else:  # the one object that is neither a file nor a marker
        files = {object_key(hashlib.sha256(p.read_bytes()).hexdigest()) for p in (pack, ckpt)}
        key = next(k for k in keys if k.startswith("objects/") and k not in files)
    data = bytearray(s3.read(remote_url, key))
    data[len(data) // 2] ^= 0x01  # one flipped bit
    s3.overwrite(remote_url, key, bytes(data))

    with pytest.raises(RemoteError) as caught:
        pull(remote_url, tmp_path / "b")
    message = str(caught.value)
    assert "\n" not in message and ("damaged" in message or "SHA-256" in message), message
    assert not isinstance(caught.value, RemoteUnreachableError)
    if (tmp_path / "b" / fmt.LMDB_DIR).exists():  # nothing of it became a version
        with Store.open(tmp_path / "b") as store:
            assert store.head is None and not store.versions()
        assert not list((tmp_path / "b" / fmt.BLOB_DIR).glob("pack-*"))
        assert not list((tmp_path / "b" / fmt.CHECKPOINT_DIR).glob("model-*"))


def test_missing_credentials_are_one_line(tmp_path, s3, remote_url, monkeypatch, capsys):
    make_store(tmp_path / "a", 1)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RemoteError) as caught:
        push(tmp_path / "a", remote_url)
    message = str(caught.value)
    assert "\n" not in message and "no credentials" in message and remote_url in message
    assert not isinstance(caught.value, RemoteUnreachableError)  # it answered: no copy serves
    assert engram(["push", str(tmp_path / "a"), remote_url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "credentials" in err
    with Store.open(tmp_path / "a") as store:  # the local store is untouched
        assert store.head.id == 1 and store.verify().ok


def test_a_remote_that_is_down_fails_in_one_line_and_loses_nothing(
    tmp_path, s3, remote_url, monkeypatch
):
    make_store(tmp_path / "a", 1)
    push(tmp_path / "a", remote_url)
    with Store.open(tmp_path / "a", mode="w") as store:
        commit(store, 1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(RemoteUnreachableError) as caught:
        push(tmp_path / "a")
    message = str(caught.value)
    assert "\n" not in message and "cannot be reached" in message
    assert "testing" not in message  # the secret key is never shown
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # back up: the push completes
    assert push(tmp_path / "a").pushed == [2]
    assert pull(remote_url, tmp_path / "b").head == 2


def test_urls_carrying_credentials_or_unknown_schemes_are_refused(tmp_path, s3):
    make_store(tmp_path / "a", 1)
    for url in ("s3://AKIA:secret@bucket/p", "s3://bucket/p?X-Amz-Credential=x", "ftp://x/y"):
        with pytest.raises(RemoteError) as caught:
            push(tmp_path / "a", url)
        assert "secret" not in str(caught.value) and "X-Amz" not in str(caught.value)
    assert not (tmp_path / "a" / "remote.json").exists()


def test_a_store_never_pushes_over_another_stores_remote(tmp_path, s3, remote_url):
    make_store(tmp_path / "a", 1)
    make_store(tmp_path / "other", 2)
    push(tmp_path / "a", remote_url)
    with pytest.raises(RemoteConflictError, match="holds store"):
        push(tmp_path / "other", remote_url)
    with pytest.raises(RemoteConflictError, match="pull into a new directory"):
        pull(remote_url, tmp_path / "other")
    assert pull(remote_url, tmp_path / "b").head == 1


def test_cli_push_and_pull(tmp_path, s3, remote_url, capsys):
    make_store(tmp_path / "a", 2)
    assert engram(["push", str(tmp_path / "a"), remote_url]) == 0
    assert "pushed v0001, v0002" in capsys.readouterr().out
    assert engram(["push", str(tmp_path / "a")]) == 0
    assert "up to date" in capsys.readouterr().out
    assert engram(["pull", remote_url, str(tmp_path / "b"), "--json"]) == 0
    assert '"pulled": [' in capsys.readouterr().out
    assert_same_store(tmp_path / "a", tmp_path / "b")
    assert engram(["push", str(tmp_path / "nothing")]) == 2
    assert "no store at" in capsys.readouterr().err
    make_store(tmp_path / "c", 1)
    assert engram(["push", str(tmp_path / "c")]) == 2
    assert "no remote yet" in capsys.readouterr().err


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_compacted_store_pushes_and_pulls_every_version_exactly(tmp_path, s3, remote_url):
    """Delta-coded blobs (with their bases) and blobs served from HEAD's checkpoint file
    travel with the versions that need them; a later gc and compact change nothing."""
    a = tmp_path / "a"
    make_store(a, 4)
    with Store.open(a, mode="w") as store:
        assert store.compact().versions
    push(a, remote_url)
    with Store.open(a, mode="w") as store:
        commit(store, 4)
        store.gc(keep_last=2)
        store.compact()
    assert push(a).pushed == [5]
    pull(remote_url, tmp_path / "b")
    with Store.open(a) as left, Store.open(tmp_path / "b") as right:
        assert right.verify(all=True).ok
        for v in left.versions():
            assert_same_tree(left.load(v.id).state, right.load(v.id).state)
            assert_same_tree(left.load(v.id).model, right.load(v.id).model)
        assert [v.id for v in right.versions()] == [1, 2, 3, 4, 5]  # the remote keeps all


def test_push_takes_a_store_this_process_has_open(tmp_path, s3, remote_url):
    with Store.open(tmp_path / "a", mode="c") as store:
        commit(store, 0)
        assert push(store, remote_url).pushed == [1]
        commit(store, 1)
        assert push(store).pushed == [2]
    assert pull(remote_url, tmp_path / "b").head == 2


def test_a_pack_id_both_clones_used_is_renumbered_on_pull_not_overwritten(tmp_path, s3, remote_url):
    """Clone b commits pack 3 while a compacts into its own pack 3: a's pull of b's
    version puts b's pack under a new id (and repoints its index entries)."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_store(a, 3)
    push(a, remote_url)
    pull(remote_url, b)
    with Store.open(a, mode="w") as store:
        assert store.compact().versions  # writes a's next pack
    with Store.open(b, mode="w") as store:
        commit(store, 3)  # writes b's next pack: the same id
    packs_a = {p.name: p.read_bytes() for p in (a / fmt.BLOB_DIR).iterdir()}
    packs_b = {p.name: p.read_bytes() for p in (b / fmt.BLOB_DIR).iterdir()}
    clash = {n for n in packs_a.keys() & packs_b.keys() if packs_a[n] != packs_b[n]}
    assert clash  # the situation under test
    push(b)
    assert pull(remote_url, a).pulled == [4]
    for name in clash:  # a's own pack is untouched
        assert (a / fmt.BLOB_DIR / name).read_bytes() == packs_a[name]
    with Store.open(a) as left, Store.open(b) as right:
        report = left.verify(all=True)
        assert report.ok, [str(p) for p in report.problems]
        for v in right.versions():
            assert_same_tree(left.load(v.id).state, right.load(v.id).state)
            assert_same_tree(left.load(v.id).model, right.load(v.id).model)
    with Store.open(a, mode="w") as store:  # and a's next pack takes a free id again
        commit(store, 4)
        assert store.verify(all=True).ok


def test_samples_a_clone_flushed_but_never_committed_do_not_block_a_pull(tmp_path, s3, remote_url):
    a, b = tmp_path / "a", tmp_path / "b"
    with Store.open(a, mode="c") as store:
        commit(store, 0)
        push(store, remote_url)
        store.samples.append([b"never committed" * 4])  # flushed at close, referenced by none
    pull(remote_url, b)
    with Store.open(b, mode="w") as store:
        commit(store, 1)  # its new sample takes the id a flushed
        new_id = store.load().state["buffer"].tolist()[-1]
        record = store.samples.read_records([new_id])
    with Store.open(a) as store:
        assert store.samples.read_records([new_id]) != record  # the clash under test
    push(b)
    assert pull(remote_url, a).pulled == [2]
    assert_same_store(b, a)
    with Store.open(a) as store:
        assert store.samples.read_records([new_id]) == record


def test_unpushed_counts_what_the_remote_lacks_without_asking_it(tmp_path, s3, remote_url):
    with Store.open(tmp_path / "a", mode="c") as store:
        commit(store, 0)
        assert unpushed(store) is None  # no remote yet
        push(store, remote_url)
        assert unpushed(store) == []
        commit(store, 1)
        commit(store, 2)
        assert unpushed(store) == [2, 3]
        push(store)
        assert unpushed(store) == []


def test_the_emulator_stopped_mid_push_then_restarted(tmp_path, s3, remote_url, monkeypatch):
    """A second moto server (moto keeps its buckets per process, so a server started
    again serves the same objects) goes down right after a push uploaded the files:
    the push fails in one line, the local commit stays, and once a server is back the
    push completes."""
    from moto.server import ThreadedMotoServer

    steps = importlib.import_module("engram.store.remote.push")  # the module, not push()
    a = tmp_path / "a"
    make_store(a, 1)
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)]
    servers[0].start()
    try:
        monkeypatch.setenv(
            "AWS_ENDPOINT_URL", f"http://127.0.0.1:{servers[0].get_host_and_port()[1]}"
        )
        push(a, remote_url)
        with Store.open(a, mode="w") as store:
            commit(store, 1)
        original = steps._upload_files

        def then_down(*args, **kwargs):
            result = original(*args, **kwargs)
            servers[0].stop()
            return result

        monkeypatch.setattr(steps, "_upload_files", then_down)
        with pytest.raises(RemoteUnreachableError) as caught:
            push(a)
        assert "\n" not in str(caught.value) and "cannot be reached" in str(caught.value)
        monkeypatch.setattr(steps, "_upload_files", original)
        with Store.open(a) as store:
            assert store.head.id == 2 and store.verify().ok
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # a server is back
        assert pull(remote_url, tmp_path / "before").head == 1
        assert push(a).pushed == [2]
        assert pull(remote_url, tmp_path / "after").head == 2
        assert_same_store(a, tmp_path / "after")
    finally:
        servers[0].stop()
