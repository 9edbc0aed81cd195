"""A remote read in place (moto's S3 server, conftest.py): ``engram ls/show/diff/export/
verify`` and ``load_model`` / ``ModelHandle`` on ``s3://...[@REF]`` read through a local
copy that holds the records and fetches only the files a read needs; ``verify --all``
re-hashes every object the remote references; ``Store.open(path, remote=)`` clones and
remembers; ``engram ls STORE`` says how far the remote is behind, and never fails for it.
"""

from __future__ import annotations

import json
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
from remote_helpers import assert_same_store, commit, make_store

import engram
from engram.cli import main as engram_cli
from engram.errors import RemoteError, VersionNotFoundError
from engram.models import build_model
from engram.store import Store
from engram.store import format as fmt
from engram.store.remote import pull, push
from engram.store.remote.cache import RemoteStore, cache_path, split_ref
from engram.store.remote.layout import object_key

pytestmark = pytest.mark.timeout(120)

SPEC = {"name": "mlp", "args": {"input_shape": [4], "n_classes": 3, "hidden": [8]}}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where this test's copies of remotes go (``ENGRAM_CACHE``)."""
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def files_in(copy: Path) -> set[str]:
    return {p.name for d in (fmt.BLOB_DIR, fmt.CHECKPOINT_DIR) for p in (copy / d).iterdir()
            if not p.name.startswith(".")}  # fmt: skip


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = engram_cli(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_reads_a_remote_fetching_only_the_files_a_read_needs(
    tmp_path, s3, remote_url, cache, capsys
):
    a = tmp_path / "a"
    make_store(a, 3)
    with Store.open(a, mode="w") as store:
        store.tag("prod", 2)
    assert push(a, remote_url).tags == ["prod"]
    copy = cache_path(remote_url)

    code, out, _ = run(capsys, "ls", remote_url, "--json")
    listed = json.loads(out)
    assert code == 0 and [v["name"] for v in listed["versions"]] == ["v0001", "v0002", "v0003"]
    assert listed["head"] == 3 and listed["versions"][1]["tags"] == ["prod"]
    assert "remote" not in listed  # a remote's own copy has no "remote behind" line
    assert files_in(copy) == set()  # records only: no file fetched to list

    code, out, _ = run(capsys, "show", f"{remote_url}@prod", "--json")
    assert code == 0 and json.loads(out)["name"] == "v0002" and json.loads(out)["head"]
    assert files_in(copy) == set()

    out_file = tmp_path / "model.safetensors"
    code, out, err = run(capsys, "export", f"{remote_url}@prod", "--out", str(out_file))
    assert code == 0, err
    with Store.open(a) as store:
        checkpoint = store.manifest(2)["checkpoint"]["file"]
        from safetensors.torch import load_file

        exported = load_file(out_file)
        assert torch.equal(exported["lin.weight"], store.load(2).model["lin.weight"])
    assert files_in(copy) == {checkpoint}  # v0002's weights, nothing else

    code, out, err = run(capsys, "diff", remote_url, "HEAD~1", "HEAD", "--json")
    assert code == 0, err
    assert {c["path"] for c in json.loads(out)["tensors"]["changed"]} >= {"/step"}
    code, out, err = run(capsys, "verify", f"{remote_url}@prod")
    assert code == 0 and "v0002: ok" in out, out + err

    # the remote moves on: the next read sees it (the copy is synced first)
    with Store.open(a, mode="w") as store:
        commit(store, 3)
    push(a)
    code, out, _ = run(capsys, "ls", remote_url, "--json")
    assert json.loads(out)["head"] == 4


def test_load_model_and_a_handle_follow_the_remote_tag(tmp_path, s3, remote_url, cache):
    a = tmp_path / "a"
    with Store.open(a, mode="c") as store:
        weights = []
        for seed in range(3):
            torch.manual_seed(seed)
            model = build_model(SPEC)
            weights.append({k: v.clone() for k, v in model.state_dict().items()})
            store.commit(model=model, meta={"model_spec": SPEC})
        store.tag("prod", 1)
    push(a, remote_url)

    def same(model: torch.nn.Module, i: int) -> bool:
        mine = model.state_dict()
        return all(torch.equal(mine[k], weights[i][k]) for k in weights[i])

    assert same(engram.load_model(f"{remote_url}@prod"), 0)
    assert same(engram.load_model(remote_url), 2)
    assert same(engram.load_model(remote_url, "prod"), 0)
    with engram.ModelHandle(f"{remote_url}@prod", check_every=0) as handle:
        model, version = handle.get()
        assert version.id == 1 and same(model, 0)
        assert "@prod" in repr(handle)
        assert handle.refresh() is False  # the remote's prod has not moved
        with Store.open(a, mode="w") as store:  # another machine moves prod, pushes
            store.tag("prod", 3)
        assert push(a).tags == ["prod"]
        model, version = handle.get()  # one read of refs/tags/prod: moved, so reloaded
        assert version.id == 3 and same(model, 2)
        s3.overwrite(remote_url, "refs/tags/prod", b"not a tag")  # damaged: keeps serving
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, version = handle.get()
        assert version.id == 3 and same(model, 2)
        assert any("refs/tags/prod is damaged" in str(w.message) for w in caught)


def test_verify_all_rehashes_every_remote_object_and_reports_a_damaged_one(
    tmp_path, s3, remote_url, cache, capsys
):
    a = tmp_path / "a"
    make_store(a, 2)
    push(a, remote_url)
    code, out, err = run(capsys, "verify", remote_url, "--all", "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"], out + err
    # HEAD, 2 markers, 2 segments, the files (packs and checkpoints) of both versions
    with Store.open(a) as store:
        n_files = len(files_in(a))
        assert result["versions"] == ["v0001", "v0002"] and store.verify(all=True).ok
    assert result["remote"]["objects"] == 1 + 2 * 2 + n_files
    assert files_in(cache_path(remote_url)) == files_in(a)  # kept as checked: no 2nd download

    pack = sorted((a / fmt.BLOB_DIR).iterdir())[0]
    digest = __import__("hashlib").sha256(pack.read_bytes()).hexdigest()
    damaged = bytearray(pack.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    s3.overwrite(remote_url, object_key(digest), bytes(damaged))
    code, out, err = run(capsys, "verify", remote_url, "--all")
    assert code == 1, out + err
    assert f"remote {object_key(digest)} ({pack.name})" in out and "SHA-256" in out
    code, out, _ = run(capsys, "verify", remote_url, "--all", "--json")
    assert code == 1 and json.loads(out)["exit"] == 1 and not json.loads(out)["ok"]


def test_mistakes_on_a_remote_are_one_line_errors(tmp_path, s3, remote_url, cache, capsys,
                                                  monkeypatch):  # fmt: skip
    def one_line(argv: list[str], expected: str) -> str:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert expected in err, err
        return err

    one_line(["ls", remote_url], "holds no engram store")  # nothing pushed there
    make_store(tmp_path / "a", 1)
    push(tmp_path / "a", remote_url)
    one_line(["show", f"{remote_url}@nope"], f"remote {remote_url} has no tag or version 'nope'")
    one_line(["show", remote_url, "v0009"], f"version v0009 is not in store {remote_url}")
    one_line(["rollback", remote_url, "v0001"], "is a remote: engram reads it but changes it")
    one_line(["du", remote_url], "du measures a store on disk, not a remote")
    err = one_line(["ls", "s3://AKIAEXAMPLE:hunter2@bucket/p"], "carries no user info")
    assert "hunter2" not in err and "AKIA" not in err
    one_line(["verify", remote_url, "--untrusted"], "--untrusted is for a local store")
    with pytest.raises(VersionNotFoundError, match="has no tag or version 'nope'"):
        engram.load_model(f"{remote_url}@nope")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    one_line(["ls", remote_url], "no credentials found")
    with pytest.raises(RemoteError, match="no credentials"):
        engram.ModelHandle(remote_url)
    assert split_ref(f"{remote_url}@prod") == (remote_url, "prod")


def test_store_open_with_a_remote_clones_remembers_and_fast_forwards(tmp_path, s3, remote_url):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_store(a, 2)
    push(a, remote_url)
    with Store.open(b, mode="c", remote=remote_url) as store:  # a new machine: cloned first
        assert store.head.id == 2
        commit(store, 2)
    assert push(b).pushed == [3]  # the remote was remembered
    with Store.open(c, remote=remote_url) as store:  # read-only: cloned, then only read
        assert store.head.id == 3
    with Store.open(a, mode="w", remote=remote_url) as store:  # behind: fast-forwarded
        assert store.head.id == 3
    assert_same_store(b, a)


def test_ls_says_how_far_the_remote_is_behind_and_never_fails_for_it(
    tmp_path, s3, remote_url, capsys, monkeypatch
):
    a, b = tmp_path / "a", tmp_path / "b"
    make_store(a, 1)
    code, out, _ = run(capsys, "ls", str(a))
    assert code == 0 and "remote" not in out  # no remote: no line, no library loaded
    push(a, remote_url)
    with Store.open(a, mode="w") as store:
        commit(store, 1)
        commit(store, 2)
    code, out, _ = run(capsys, "ls", str(a))
    assert f"remote {remote_url} is 2 versions behind; run `engram push {a}`" in out
    push(a)
    code, out, _ = run(capsys, "ls", str(a), "--json")
    assert json.loads(out)["remote"] == {"url": remote_url, "reachable": True, "head": 3,
                                         "behind": 0, "error": None}  # fmt: skip
    pull(remote_url, b)  # another clone pushes: a's HEAD is now behind the remote's
    with Store.open(b, mode="w") as store:
        commit(store, 3)
    push(b)
    code, out, _ = run(capsys, "ls", str(a))
    assert f"remote {remote_url} HEAD v0004 is not in the history of this store's HEAD" in out
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    code, out, err = run(capsys, "ls", str(a))
    assert code == 0 and err == "" and f"remote {remote_url} unreachable (" in out
    assert time.monotonic() - started < 10
    with socket.socket() as silent:  # takes the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr("engram.store.remote.status.STATUS_TIMEOUT_S", 0.5)
        started = time.monotonic()
        code, out, _ = run(capsys, "ls", str(a))
        assert code == 0 and "unreachable" in out and "v0003" in out
        assert time.monotonic() - started < 5  # the short timeout, not the client's 30 s


def test_an_open_copy_follows_the_remote_on_refresh(tmp_path, s3, remote_url, cache):
    make_store(tmp_path / "a", 1)
    push(tmp_path / "a", remote_url)
    with RemoteStore.open_url(remote_url) as first:
        assert first.head.id == 1
        with Store.open(tmp_path / "a", mode="w") as store:
            commit(store, 1)
        push(tmp_path / "a")
        assert first.refresh() is True and first.head.id == 2
        assert first.refresh() is False
        assert torch.equal(first.load().state["step"], torch.full((1024,), 1.0))
