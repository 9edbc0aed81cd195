"""Asynchronous commits (engram.store.background, DurableTemplate(async_commit=True)).

* The staged state is a snapshot: tensors mutated in place after ``submit`` do not
  reach the version; training runs while a commit is in flight; at most one is.
* An error of a background commit surfaces at the next commit and at close.
* Every version an async run writes equals, bit for bit, the synchronous run's.
* Crashes (SIGKILL, in fresh processes) inside a background commit, and in the training
  thread while one is in flight, leave the previous version as HEAD, and a re-run ends
  bit-identical to a run that never stopped.

The background commit is held open by wrapping the store's real ``write_checkpoint``
where the commit protocol calls it (``engram.store.commit``; it still writes the file):
nothing is mocked, and every test that wraps it asserts the wrapper was called.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import engram.store.commit as commit_module
from engram.errors import CommitError
from engram.store import SampleIds, Store
from engram.store.background import BackgroundCommitter, stage

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import scenario  # noqa: E402
from test_resume import assert_equivalent, assert_same_tree  # noqa: E402

WAIT_S = 120.0  # deadlock guards only, never a performance threshold
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["engram.training.template", "scenario"])


class Gate:
    """Wraps the commit's ``write_checkpoint``: the Nth call waits for ``release``.

    ``calls`` counts the calls: a test asserts it is positive, so a wrapper that the
    commit no longer calls (the name moved) fails the test instead of passing it.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, call: int = 1) -> None:
        self.original = commit_module.write_checkpoint
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls, self.call = 0, call
        monkeypatch.setattr(commit_module, "write_checkpoint", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.call:
            self.entered.set()
            assert self.release.wait(WAIT_S), "never released"
        return self.original(*args, **kwargs)


def test_stage_copies_every_tensor_and_keeps_types() -> None:
    ids = SampleIds.of([3, 1, 2])
    state = {
        "t": torch.ones(3),
        "ids": ids,
        "np": np.zeros(2),
        "nested": [{"a": torch.zeros(2)}, (1, "x", None)],
        0: 1.5,
    }
    staged = stage(state)
    state["t"].add_(1)
    ids.add_(10)
    state["np"] += 1
    state["nested"][0]["a"].add_(1)
    state["nested"].append("later")
    assert torch.equal(staged["t"], torch.ones(3))
    assert type(staged["ids"]) is SampleIds and staged["ids"].tolist() == [3, 1, 2]
    assert np.array_equal(staged["np"], np.zeros(2))
    assert torch.equal(staged["nested"][0]["a"], torch.zeros(2))
    assert staged["nested"][1] == (1, "x", None) and len(staged["nested"]) == 2
    assert staged[0] == 1.5


def test_submit_returns_while_the_commit_runs_and_commits_the_staged_state(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch)
    weights = {"w": torch.arange(6.0)}
    state = {"momentum": torch.full((4,), 2.0), "step": 1}
    committer = BackgroundCommitter(store)
    committer.submit(state, weights, message="first", meta={"i": 1})
    assert gate.entered.wait(WAIT_S)  # the commit is in flight, held in its checkpoint write
    assert committer.in_flight and store.head is None
    weights["w"].mul_(-1)  # training goes on, in place
    state["momentum"].add_(5)
    gate.release.set()
    version = committer.wait()
    assert version is not None and version.message == "first" and store.head.id == version.id
    snap = store.load()
    assert torch.equal(snap.model["w"], torch.arange(6.0))
    assert torch.equal(snap.state["momentum"], torch.full((4,), 2.0))
    assert snap.state["step"] == 1
    committer.close()
    assert store.verify(all=True).ok
    assert gate.calls == 1


def test_at_most_one_commit_in_flight(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch)
    committer = BackgroundCommitter(store)
    committer.submit({"i": 1}, {"w": torch.zeros(2)}, message="one")
    assert gate.entered.wait(WAIT_S)
    second = threading.Thread(
        target=committer.submit, args=({"i": 2}, {"w": torch.ones(2)}), kwargs={"message": "two"}
    )
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waits for the first commit
    gate.release.set()
    second.join(WAIT_S)
    committer.close()
    first, last = store.versions()
    assert (first.message, last.message) == ("one", "two") and last.parent == first.id
    assert gate.calls == 2


def test_a_failed_background_commit_surfaces_at_the_next_commit_and_at_close(
    store: Store,
) -> None:
    committer = BackgroundCommitter(store)
    committer.submit({"i": 1}, message="good")
    committer.submit({"bad": object()}, message="bad one")  # cannot be encoded
    with pytest.raises(CommitError, match=r"background commit 'bad one'.*HEAD is still v0001"):
        committer.submit({"i": 3}, message="next")
    assert [v.message for v in store.versions()] == ["good"]
    committer.submit({"bad": object()}, message="bad again")
    with pytest.raises(CommitError, match="bad again"):
        committer.close()
    assert store.samples.__class__.__name__ == "SampleTable"  # given back, even so
    assert store.head.message == "good"


def test_template_close_waits_for_the_commit_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Gate(monkeypatch)
    template = scenario.build("naive", tmp_path / "s", async_commit=True)
    template.cursor.iteration = 3  # a mid-experience commit: in the background
    template.commit("mid")
    assert gate.entered.wait(WAIT_S)
    closer = threading.Thread(target=template.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive()
    gate.release.set()
    closer.join(WAIT_S)
    with Store.open(tmp_path / "s") as s:
        assert s.head.message == "mid" and s.head.meta["kind"] == "mid-experience"
    assert gate.calls >= 1


@pytest.mark.parametrize("strategy", ["ewc", "er", "derpp"])
def test_every_async_version_equals_the_synchronous_one(tmp_path: Path, strategy: str) -> None:
    stores = {}
    for mode in (False, True):
        stores[mode] = tmp_path / f"async{int(mode)}"
        bench = scenario.split_digits(5)
        with scenario.build(
            strategy, stores[mode], commit_every=2, async_commit=mode, keep_mid_experience=True
        ) as template:
            template.fit(bench.train_stream[:2], bench.test_stream[:2])
    with Store.open(stores[False]) as sync, Store.open(stores[True]) as asy:
        versions = sync.versions()
        assert [v.meta for v in asy.versions()] == [v.meta for v in versions]
        assert len(versions) > 10
        for v in versions:
            a, b = sync.load(v.id), asy.load(v.id)
            assert_same_tree(a.model, b.model, f"{v.name} model")
            assert_same_tree(a.state, b.state, f"{v.name} state")
        assert asy.verify(all=True).ok


# ------------------------------------------------------------ crashes, in children


def async_run(argv: list[str]) -> None:
    """Child: ``STRATEGY STORE [--kill-in-background-commit N | --kill-while-in-flight N]``.

    ``--kill-in-background-commit N``: SIGKILL inside the Nth commit after its checkpoint
    is written and before it is published, in the background thread.
    ``--kill-while-in-flight N``: hold the Nth commit (in the background) until training
    has run one more iteration, then SIGKILL the process from the training thread.
    """
    torch.set_num_threads(1)  # as scenario.run's reference (this is a child process)
    strategy, store, *rest = argv
    option, n = (rest[0], int(rest[1])) if rest else (None, 0)
    original, calls = commit_module.write_checkpoint, [0]
    writers: dict[int, threading.Thread | None] = {}  # each write's background commit
    trained_on = threading.Event()
    extra = []

    def write(*args, **kwargs):
        calls[0] += 1
        writers[calls[0]] = _commit_thread()  # (the write itself runs in a pool's thread)
        if calls[0] == n and threading.current_thread().name != "MainThread":
            if _commit_thread() is None:
                os._exit(3)  # not a background commit: the test is wrong
            if option == "--kill-while-in-flight":
                trained_on.set()
                threading.Event().wait(WAIT_S)  # the training thread kills us meanwhile
                os._exit(4)  # it never did: not killed where the test means to kill
            original(*args, **kwargs)  # the checkpoint file is written, not published
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    if option:
        commit_module.write_checkpoint = write
    if option == "--kill-while-in-flight":
        from avalanche.core import SupervisedPlugin

        class KillWhileInFlight(SupervisedPlugin):
            def after_training_iteration(self, strategy, **kwargs) -> None:
                flight = _commit_thread()
                if calls[0] == n - 1 and flight is not None and flight is not writers[n - 1]:
                    # the Nth commit runs and is not yet held: wait for it, as the next
                    # commit may be due in this very iteration and would wait for it
                    trained_on.wait(WAIT_S)
                if trained_on.is_set():  # an iteration ran while the commit was held
                    os.kill(os.getpid(), signal.SIGKILL)

        extra.append(KillWhileInFlight())
    bench = scenario.split_digits(5)
    train, test = bench.train_stream[:3], bench.test_stream[:3]
    with scenario.build(
        strategy, Path(store), commit_every=5, async_commit=True, extra_plugins=extra
    ) as template:
        template.fit(train, test)
    if option and calls[0] < n:  # the kill never came: the wrapper is not what commits call
        sys.exit(f"write_checkpoint wrapper called {calls[0]} times, expected {n}")


def _commit_thread() -> threading.Thread | None:
    """The background commit in flight (at most one), if any."""
    return next((t for t in threading.enumerate() if t.name == "engram-commit"), None)


def child(*args: object, expect_kill: bool = False) -> None:
    proc = _CONTEXT.Process(target=async_run, args=([str(a) for a in args],))
    proc.start()
    proc.join(timeout=300)
    assert proc.exitcode == (-signal.SIGKILL if expect_kill else 0), proc.exitcode


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted synchronous runs."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for name in ("ewc", "er", "derpp"):
        out[name] = root / name
        scenario.run(name, out[name])
    return out


@pytest.mark.parametrize("strategy", ["ewc", "er", "derpp"])
def test_async_run_equals_the_synchronous_reference(references, tmp_path, strategy) -> None:
    child(strategy, tmp_path / "store")
    assert_equivalent(references[strategy], tmp_path / "store")


@pytest.mark.parametrize("strategy", ["ewc", "er"])
def test_sigkill_inside_a_background_commit_then_rerun(references, tmp_path, strategy) -> None:
    store = tmp_path / "store"
    # commits at iterations 5, 10 and 15 of experience 0 (18 iterations): the third is
    # mid-experience, so it runs in the background
    child(strategy, store, "--kill-in-background-commit", 3, expect_kill=True)
    with Store.open(store) as s:
        versions = s.versions()
        assert [v.meta["iteration"] for v in versions] == [5, 1]  # 10 = epoch 1, iteration 1
        assert s.head.id == versions[-1].id
        assert s.verify(all=True).ok
    child(strategy, store)
    assert_equivalent(references[strategy], store)


@pytest.mark.parametrize("strategy", ["ewc", "er"])
def test_sigkill_in_training_while_a_commit_is_in_flight_then_rerun(
    references, tmp_path, strategy
) -> None:
    store = tmp_path / "store"
    child(strategy, store, "--kill-while-in-flight", 2, expect_kill=True)
    with Store.open(store) as s:
        assert [v.meta["iteration"] for v in s.versions()] == [5]  # the second never landed
        assert s.verify(all=True).ok
    child(strategy, store)
    assert_equivalent(references[strategy], store)
