"""One copy of a remote, many users (moto's S3 server, conftest.py): every ``ModelHandle``
and ``load_model`` on it in one process share one open copy, and processes syncing it at
once take turns, from reading the remote's HEAD to remembering it
(:mod:`engram.store.remote.copies`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from remote_helpers import commit, make_store

import engram
from engram.models import build_model
from engram.store import Store
from engram.store.remote import push
from engram.store.remote.cache import RemoteStore, cache_path, sync
from engram.store.remote.copies import _OPEN

pytestmark = pytest.mark.timeout(120)

SPEC = {"name": "mlp", "args": {"input_shape": [4], "n_classes": 3, "hidden": [8]}}
DEADLINE_S = 60.0

# A child syncing the copy (ENGRAM_CACHE from the environment) and printing its HEAD.
# With PAUSE set, it stops right after reading the remote's HEAD and tags (before the
# copy's records are touched) until the file GO exists or PAUSE seconds passed.
CHILD = """
import importlib, os, sys, time
from pathlib import Path
from engram.store.remote.cache import RemoteStore

pull = importlib.import_module("engram.store.remote.pull")  # (the package's pull is a function)

url, pause = sys.argv[1], float(os.environ.get("PAUSE", "0"))
if pause:
    read_tags = pull.read_tags
    def paused(client):
        tags = read_tags(client)
        Path(os.environ["PAUSED"]).touch()
        deadline = time.monotonic() + pause
        while not Path(os.environ["GO"]).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return tags
    pull.read_tags = paused
with RemoteStore.open_url(url) as store:
    print(store.head.id, flush=True)
"""


def child(url: str, cache: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, url], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "ENGRAM_CACHE": str(cache), **env})  # fmt: skip


def finished(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=DEADLINE_S)
    return proc.returncode, out, err


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_handle_and_load_model_share_one_open_copy(tmp_path, s3, remote_url, cache):
    a = tmp_path / "a"
    with Store.open(a, mode="c") as store:
        models = []
        for seed in range(3):
            torch.manual_seed(seed)
            models.append(build_model(SPEC))
            store.commit(model=models[-1], meta={"model_spec": SPEC})
        store.tag("prod", 1)
    push(a, remote_url)

    def same(model: torch.nn.Module, i: int) -> bool:
        mine, theirs = model.state_dict(), models[i].state_dict()
        return all(torch.equal(mine[k], theirs[k]) for k in theirs)

    with engram.ModelHandle(f"{remote_url}@prod", check_every=0) as handle:
        assert same(handle.model, 0)
        # the same copy, in the same process: was "already open in this process"
        assert same(engram.load_model(remote_url), 2)
        with engram.ModelHandle(remote_url, check_every=0) as second:
            assert same(second.model, 2)
            with Store.open(a, mode="w") as store:
                store.tag("prod", 3)
            push(a)
            model, version = handle.get()  # synced through the shared copy
            assert version.id == 3 and same(model, 2)
            assert second.get()[1].id == 3  # its view sees the synced copy too
        assert same(engram.load_model(f"{remote_url}@prod"), 2)
        assert handle.get()[1].id == 3  # still serving after the others closed theirs
        with Store.open(a) as plain:  # a view has every attribute a Store sets
            assert set(vars(plain)) <= set(vars(handle.store))
        (shared,) = [s for s in _OPEN.values() if s.path == cache_path(remote_url).resolve()]
        assert shared.users == 1
    assert all(s.path != cache_path(remote_url).resolve() for s in _OPEN.values())
    with Store.open(cache_path(remote_url)) as copy:  # closed: this process may open it again
        assert copy.head.id == 3 and copy.tags() == {"prod": 3}


def test_two_processes_syncing_one_copy_at_once_both_read_the_same_version(
    tmp_path, s3, remote_url, cache
):
    make_store(tmp_path / "a", 4)
    push(tmp_path / "a", remote_url)
    procs = [child(remote_url, cache) for _ in range(2)]  # a new copy, made by both at once
    results = [finished(p) for p in procs]
    assert [(code, out) for code, out, _ in results] == [(0, "4\n"), (0, "4\n")], results
    with RemoteStore.open_url(remote_url) as store:
        assert [v.id for v in store.versions()] == [1, 2, 3, 4]
        assert store.verify(all=True).ok


def test_a_sync_never_pulls_against_a_head_another_sync_moved_past(tmp_path, s3, remote_url, cache):
    a = tmp_path / "a"
    make_store(a, 2)
    push(a, remote_url)
    sync(remote_url, cache_path(remote_url))
    paused, go = tmp_path / "paused", tmp_path / "go"
    # it reads HEAD v0002, then waits (up to 2 s, or until GO) before touching the copy
    slow = child(remote_url, cache, PAUSE="2", PAUSED=str(paused), GO=str(go))
    deadline = time.monotonic() + DEADLINE_S
    while not paused.exists():
        assert slow.poll() is None and time.monotonic() < deadline, slow.communicate()
        time.sleep(0.02)
    with Store.open(a, mode="w") as store:
        commit(store, 2)
    push(a)
    # Another sync now: it waits for the paused one (the copy's sync lock). Had it gone
    # first, the paused one would find the copy at v0003 while it pulls v0002's lineage.
    assert sync(remote_url, cache_path(remote_url)).head == 3
    go.touch()
    code, out, err = finished(slow)
    assert (code, out) == (0, "2\n"), err[-2000:]
    code, out, err = finished(child(remote_url, cache))
    assert (code, out) == (0, "3\n"), err[-2000:]
    with RemoteStore.open_url(remote_url) as store:
        assert store.head.id == 3 and store.verify(all=True).ok
