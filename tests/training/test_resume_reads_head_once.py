"""A resume reads HEAD once (engram.training.resumed): the runner's one read sizes the
benchmark and feeds the lineage, architecture and execution checks, the state applied,
the TensorBoard history and the "already trained" decision."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module

from engram.sklearn.learner import SklearnLearner
from engram.store import Store
from engram.store.history import History
from engram.train import train
from engram.training.template import DurableTemplate


def config(store: Path, *overrides: str) -> Any:
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[f"store.path={store}", "training.epochs=1",
                                           "run.quiet=true", *overrides])  # fmt: skip


@pytest.fixture
def manifest_reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Every manifest the store reads, by version id (the real reader, counted)."""
    reads: Counter = Counter()
    real = History.manifest

    def counted(self: History, txn: Any, vid: int) -> dict[str, Any]:
        reads[vid] += 1
        return real(self, txn, vid)

    monkeypatch.setattr(History, "manifest", counted)
    return reads


@pytest.fixture
def reads_before_training(monkeypatch: pytest.MonkeyPatch, manifest_reads: Counter) -> Counter:
    """The manifest reads made before the first experience trains: the resume's (the
    commits after it read their parent, which is not resuming)."""
    before: Counter = Counter()
    for learner in (DurableTemplate, SklearnLearner):
        real = learner.train_experience

        def first(self: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            if not before:
                before.update(manifest_reads)
                before["trained"] = 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(learner, "train_experience", first)
    return before


@pytest.mark.parametrize("strategy, model", [("replay", "mlp"), ("replay", "sgd_classifier")])
def test_a_resume_reads_head_once(tmp_path: Path, manifest_reads: Counter,
                                  reads_before_training: Counter, strategy: str,
                                  model: str) -> None:  # fmt: skip
    args = (f"strategy={strategy}", f"model={model}", "benchmark.n_experiences=5",
            "run.max_experiences=1")  # fmt: skip
    train(config(tmp_path / "s", *args))  # experience 0, with TensorBoard (the default)
    with Store.open(tmp_path / "s") as store:
        head = store.head.id
    manifest_reads.clear()
    reads_before_training.clear()
    matrix = train(config(tmp_path / "s", *args))  # resumes, trains experience 1
    assert len(matrix) == 2
    assert reads_before_training == {head: 1, "trained": 1}


def test_an_already_trained_stream_reads_head_once(tmp_path: Path, manifest_reads: Counter) -> None:
    args = ("strategy=ewc", "benchmark.n_experiences=2")
    train(config(tmp_path / "s", *args))
    with Store.open(tmp_path / "s") as store:
        head = store.head.id
    manifest_reads.clear()
    assert len(train(config(tmp_path / "s", *args))) == 2  # nothing left to train
    assert dict(manifest_reads) == {head: 1}
