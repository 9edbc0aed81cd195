"""The determinism contract on CPU: what bit-identity depends on is recorded, a resume
that differs is warned about, and models with dropout, Adam with an LR schedule and
bf16/fp16 mixed precision resume bit-identically — also from an interruption mid-epoch."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import LRSchedulerPlugin
from torch import nn

from engram.store import Store
from engram.strategies import EWCPlugin
from engram.training import execution
from engram.training.execution import ExecutionChangedWarning, deterministic_algorithms
from engram.training.template import DurableTemplate


def streams(n: int = 2):
    from engram.streams.digits import split_digits

    bench = split_digits(5)
    return bench.train_stream[:n], bench.test_stream[:n]


class Interrupt(Exception):
    """Stands for a crash: the run stops with whatever the store holds."""


class StopAt(SupervisedPlugin):
    engram_transient = ("iteration",)  # a test's hook, not memory

    def __init__(self, iteration: int) -> None:
        super().__init__()
        self.iteration = iteration

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if strategy.clock.train_iterations == self.iteration:
            raise Interrupt


def build(store: Path, kind: str, *, stop_at: int | None = None, **kwargs) -> DurableTemplate:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))
    plugins = [EWCPlugin(ewc_lambda=1.0)]
    if kind == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        plugins.append(LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.7),
                                         reset_scheduler=False, reset_lr=False))  # fmt: skip
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if stop_at is not None:
        plugins.append(StopAt(stop_at))
    return DurableTemplate(model=model, optimizer=optimizer, store=store, plugins=plugins,
                           train_epochs=2, commit_every_iterations=5, name=kind,
                           precision={"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(kind, "32"),
                           **kwargs)  # fmt: skip


def assert_same_final_state(a: Path, b: Path) -> None:
    with Store.open(a) as sa, Store.open(b) as sb:
        x, y = sa.load(), sb.load()
        assert x.state["metrics"]["accuracy_matrix"] == y.state["metrics"]["accuracy_matrix"]
        for key in x.model:
            assert torch.equal(x.model[key], y.model[key]), key
        assert x.state["cursor"] == y.state["cursor"]


@pytest.mark.parametrize("kind", ["dropout", "adam", "bf16", "fp16"])
def test_an_interrupted_run_resumes_bit_identically(tmp_path: Path, kind: str) -> None:
    train, test = streams()
    with build(tmp_path / "whole", kind) as t:
        t.fit(train, test)
    with build(tmp_path / "split", kind, stop_at=17) as t, pytest.raises(Interrupt):
        t.fit(train, test)  # mid-epoch of experience 0; HEAD: iteration 15's checkpoint
    with Store.open(tmp_path / "split") as s:
        assert s.head.meta["kind"] == "mid-experience" and s.head.meta["experience"] == 0
    torch.manual_seed(12345)  # a fresh process's RNG: only the stored streams can match
    with build(tmp_path / "split", kind) as t:
        t.fit(train, test)
        assert t.execution_changes == []
    assert_same_final_state(tmp_path / "whole", tmp_path / "split")
    if kind == "fp16":  # the loss scaler's state is part of the committed state
        with Store.open(tmp_path / "split") as s:
            assert s.load().state["scaler"]["_growth_tracker"] > 0


def test_every_version_records_its_execution_settings(tmp_path: Path) -> None:
    train, test = streams(1)
    with build(tmp_path / "s", "bf16") as t:
        t.fit(train, test)
    with Store.open(tmp_path / "s") as s:
        for v in s.versions():
            settings = v.meta["execution"]
            assert settings["precision"] == "bf16-mixed" and settings["device"] == "cpu"
            assert settings["threads"] == torch.get_num_threads()
            assert settings["torch"] == torch.__version__
            assert settings["deterministic"] is False
            assert settings["device_count"] == 0  # CUDA devices, when it trains on CUDA


def test_a_resume_with_another_thread_count_warns_and_names_it(tmp_path: Path) -> None:
    train, test = streams()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with build(tmp_path / "s", "dropout") as t:
            t.fit(train, test, max_experiences=1)
        torch.set_num_threads(2)
        with (
            build(tmp_path / "s", "dropout") as t,
            pytest.warns(
                ExecutionChangedWarning, match=r"threads: store 1 vs now 2.*not bit-identical"
            ),
        ):
            t.fit(train, test)
        assert t.execution_changes == ["threads: store 1 vs now 2"]
    finally:
        torch.set_num_threads(threads)


def test_a_resume_with_another_device_count_warns_and_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA RNG is one stream per device: a store written with two GPUs cannot restore
    them on one (here: a run recorded as on two devices resumes on this CPU's none)."""
    train, test = streams()
    with monkeypatch.context() as m:
        m.setattr(execution, "device_count", lambda device: 2)
        with build(tmp_path / "s", "dropout") as t:
            t.fit(train, test, max_experiences=1)
    with (
        build(tmp_path / "s", "dropout") as t,
        pytest.warns(ExecutionChangedWarning, match=r"device_count: store 2 vs now 0"),
    ):
        t.fit(train, test)
    assert t.execution_changes == ["device_count: store 2 vs now 0"]


def test_a_store_that_never_recorded_the_device_count_resumes_without_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    train, test = streams()
    recorded = execution.settings
    with monkeypatch.context() as m:  # what versions written before it was recorded hold
        m.setattr(execution, "settings", lambda *a: {
            k: v for k, v in recorded(*a).items() if k != "device_count"
        })  # fmt: skip
        with build(tmp_path / "s", "dropout") as t:
            t.fit(train, test, max_experiences=1)
    with Store.open(tmp_path / "s") as s:
        assert "device_count" not in s.head.meta["execution"]
    with build(tmp_path / "s", "dropout") as t, warnings.catch_warnings():
        warnings.simplefilter("error", ExecutionChangedWarning)  # absent: unknown, not a change
        t.fit(train, test)


def test_the_same_settings_resume_without_a_warning(tmp_path: Path) -> None:
    train, test = streams()
    with build(tmp_path / "s", "dropout") as t:
        t.fit(train, test, max_experiences=1)
    with build(tmp_path / "s", "dropout") as t, warnings.catch_warnings():
        warnings.simplefilter("error", ExecutionChangedWarning)
        t.fit(train, test)


def test_deterministic_algorithms_are_recorded_and_restored_afterwards(tmp_path: Path) -> None:
    train, test = streams(1)
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(True), build(tmp_path / "s", "dropout") as t:
        t.fit(train, test)
    assert torch.are_deterministic_algorithms_enabled() == before
    with Store.open(tmp_path / "s") as s:
        assert s.head.meta["execution"]["deterministic"] is True


def test_engram_show_lists_the_execution_settings(tmp_path: Path, capsys) -> None:
    from engram.cli import main

    train, test = streams(1)
    with build(tmp_path / "s", "bf16") as t:
        t.fit(train, test)
    assert main(["show", str(tmp_path / "s")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("execution"))
    assert f"torch {torch.__version__}, cpu (cpu)" in line and "precision bf16-mixed" in line
    assert f"{torch.get_num_threads()} threads" in line
