"""engram-train with ``store.remote``: resumed anywhere, pushed in the background.

Against moto's S3 server (conftest.py), one per module; the runs are the tiny runner
config of tests/test_train.py (split digits, one epoch per experience).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from remote_helpers import assert_same_store, commit, make_store

from engram.cli import main as engram
from engram.errors import ConfigError, RemoteConflictError
from engram.run.validation import validate
from engram.store import Store
from engram.store.remote import pull, push
from engram.store.remote.background import BackgroundPusher, catch_up, serve
from engram.store.remote.client import ObjectStore
from engram.store.remote.lineage import read_head
from engram.train import train


def config(store: Path, *overrides: str, quiet: bool = True):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[
            f"store.path={store}", "training.epochs=1", f"run.quiet={str(quiet).lower()}",
            "logger=none", *overrides,
        ])  # fmt: skip


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def remote_head(url: str) -> int | None:
    head, _ = read_head(ObjectStore(url))
    return None if head is None else head.version


def head_weights(path: Path) -> dict[str, torch.Tensor]:
    with Store.open(path) as store:
        return dict(store.load(state=False).model)


def test_a_run_resumes_on_another_machine_from_its_remote(
    tmp_path: Path, remote_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    five = ("benchmark.n_experiences=5", f"store.remote={remote_url}")
    first = tmp_path / "first"
    assert len(train(config(first, *five, "run.max_experiences=2"))) == 2
    assert remote_head(remote_url) == 2  # the run waited for its last push
    shutil.rmtree(first)  # the machine is gone

    second = tmp_path / "second"
    second.mkdir()  # another machine: a new, empty directory
    matrix = train(config(second, *five, quiet=False))
    out = capsys.readouterr().out
    assert f"pulled v0002 from {remote_url}\n" in out and "resuming" in out

    whole = train(config(tmp_path / "whole", "benchmark.n_experiences=5"))  # no remote
    assert matrix == whole
    a, b = head_weights(second), head_weights(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with Store.open(second) as store:
        assert [v.id for v in store.versions()] == [1, 2, 3, 4, 5]
    assert remote_head(remote_url) == 5
    clone = tmp_path / "clone"  # what the remote holds is the run, bit for bit
    pull(remote_url, clone)
    assert_same_store(second, clone)


def test_a_remote_that_is_down_loses_no_commit_and_push_completes_it(
    tmp_path: Path, remote_url: str, s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "s"
    five = ("benchmark.n_experiences=5", f"store.remote={remote_url}")
    train(config(store, *five, "run.max_experiences=1"))
    assert remote_head(remote_url) == 1

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(train(config(store, *five, "run.max_experiences=2"))) == 3  # completes
    said = [str(w.message) for w in caught if "remote" in str(w.message)]
    assert any("the endpoint cannot be reached" in s and "trains on" in s for s in said)
    assert any("background push failed" in s for s in said)
    assert f"remote {remote_url} is 2 versions behind {store}; run `engram push {store}`" in said
    assert all("\n" not in s and "testing" not in s for s in said)  # one line, no credential
    with Store.open(store) as opened:
        assert [v.id for v in opened.versions()] == [1, 2, 3]  # every commit is local
        assert opened.verify(all=True).ok

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # the remote is back
    assert remote_head(remote_url) == 1  # nothing half-pushed moved it
    assert engram(["push", str(store)]) == 0  # the URL was remembered by the run
    assert remote_head(remote_url) == 3
    pull(remote_url, tmp_path / "clone")
    assert_same_store(store, tmp_path / "clone")


def test_a_store_and_remote_that_diverged_are_refused_before_training(
    tmp_path: Path, remote_url: str
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_store(a, 1)
    push(a, remote_url)
    pull(remote_url, b)
    with Store.open(a, mode="w") as store:
        commit(store, 1)
    push(a, remote_url)
    report = catch_up(remote_url, b)  # behind: a fast-forward
    assert report is not None and report.pulled == [2]
    assert catch_up(remote_url, b) is None  # at the remote's HEAD
    with Store.open(b, mode="w") as store:
        commit(store, 2)  # b's own v0003
    assert catch_up(remote_url, b) is None  # ahead: the run pushes it
    with Store.open(a, mode="w") as store:
        commit(store, 2)  # a's own v0003, pushed: now they diverged
    push(a, remote_url)
    with Store.open(b) as store:
        before = [(v.id, v.created_at) for v in store.versions()]

    with pytest.raises(RemoteConflictError) as refused:
        train(config(b, f"store.remote={remote_url}"))
    line = str(refused.value)
    assert "\n" not in line and "diverged" in line and "nothing was pulled or trained" in line
    with Store.open(b) as store:
        assert [(v.id, v.created_at) for v in store.versions()] == before
    with Store.open(a) as store:
        assert remote_head(remote_url) == 3 and store.head.id == 3


def test_store_remote_is_checked_and_never_echoes_a_credential(tmp_path: Path) -> None:
    validate(config(tmp_path / "s", "store.remote=s3://bucket/runs/ewc"))
    validate(config(tmp_path / "s", "store.remote=file:///mnt/runs"))  # a directory
    with pytest.raises(ConfigError, match=r"store.remote must be a URL s3://BUCKET/PREFIX"):
        validate(config(tmp_path / "s", "store.remote=file://host/mnt/runs"))
    for url in ("s3://AKIAEXAMPLE:hunter2@bucket/p", "s3://bucket/p?X-Amz-Signature=hunter2"):
        with pytest.raises(ConfigError) as refused:
            validate(config(tmp_path / "s", f"store.remote='{url}'"))
        assert "hunter2" not in str(refused.value) and "AKIA" not in str(refused.value)
        assert "carries no user info or query" in str(refused.value)


def test_the_worker_pushes_the_version_asked_for_not_a_later_head(
    tmp_path: Path, remote_url: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # a mid-experience checkpoint committed after the request must not reach the remote:
    # pruned at the experience's end, it would leave the remote off the store's history
    make_store(tmp_path / "s", 3)
    monkeypatch.setattr(sys, "stdin", io.StringIO("2\n"))
    serve([str(tmp_path / "s"), remote_url])
    assert json.loads(capsys.readouterr().out) == {"head": 2, "pushed": [1, 2]}
    assert remote_head(remote_url) == 2


def test_a_push_past_the_final_deadline_is_stopped_and_reported(
    tmp_path: Path, remote_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s"
    make_store(path, 2)
    with socket.socket() as silent:  # takes connections, never answers: a stuck remote
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        with Store.open(path, mode="w") as store:
            pusher = BackgroundPusher(store, remote_url, finish_timeout_s=1.0)
            pusher.request()
            started = time.monotonic()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert pusher.finish() == [1, 2]
            assert time.monotonic() - started < 6.0  # the deadline, not the client's 30 s
    said = [str(w.message) for w in caught]
    assert any("did not finish within 1 s and was stopped" in s for s in said), said
    assert f"remote {remote_url} is 2 versions behind {path}; run `engram push {path}`" in said
    assert not [t for t in threading.enumerate() if t.name == "engram-push"]
