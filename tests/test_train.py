"""engram-train: every strategy config composes and runs; re-running resumes; errors are short."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from engram.store import Store
from engram.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "engram" / "configs"
STRATEGIES = sorted(p.stem for p in (CONFIGS / "strategy").glob("*.yaml"))


def config(store: Path, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose(
            "train",
            overrides=[f"store={store}", "training.epochs=1", "run.quiet=true", *overrides],
        )


def test_every_strategy_is_configured() -> None:
    assert len(STRATEGIES) >= 11 and {"naive", "ewc", "replay", "derpp", "ewc_replay"} <= set(
        STRATEGIES
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_and_resumes(tmp_path: Path, strategy: str) -> None:
    cfg = config(tmp_path / "s", f"strategy={strategy}", "run.max_experiences=1")
    assert len(train(cfg)) == 1
    assert len(train(cfg)) == 2  # the same command again: the next experience
    with Store.open(tmp_path / "s") as store:
        head = store.head
    assert head.meta["strategy"] == strategy and head.meta["experience"] == 1


def test_task_incremental_multihead(tmp_path: Path) -> None:
    cfg = config(tmp_path / "s", "benchmark=split_digits_task", "model.multihead=true", "strategy=ewc",
                 "run.max_experiences=2")  # fmt: skip
    matrix = train(cfg)
    assert matrix[1][0] > 0.5  # task-incremental with its own head: little forgetting


@pytest.mark.parametrize(
    "override, error",
    [
        ("training.epoch=2", ConfigCompositionException),
        ("training.epochs=abc", ConfigCompositionException),
        ("strategy=ewcc", ConfigCompositionException),
        ("strategy.ewc_lambda=3", ConfigCompositionException),
    ],
)
def test_typos_fail_at_composition(tmp_path: Path, override: str, error: type) -> None:
    with pytest.raises((error, ConfigKeyError, ValidationError)):
        config(tmp_path / "s", override)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engram.train", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_resumes_and_reports_completion(tmp_path: Path) -> None:
    store = tmp_path / "s"
    args = [f"store={store}", "training.epochs=1", "benchmark.n_experiences=2"]
    first = run_cli(*args, "run.max_experiences=1")
    assert first.returncode == 0, first.stderr
    assert "experience 0: accuracy" in first.stdout
    second = run_cli(*args)
    assert "resuming" in second.stdout and "experience 1: accuracy" in second.stdout
    third = run_cli(*args)
    assert "already trained" in third.stdout
    assert (store / "hydra").is_dir()  # the resolved config is kept beside the store


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", mode="c"):
        out = run_cli(f"store={tmp_path / 's'}", "training.epochs=1")
    assert out.returncode == 2
    assert (
        out.stderr.strip().startswith("engram-train: error: store")
        and "locked by pid" in out.stderr
    )
    assert "Traceback" not in out.stderr


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag != "store/commit_seconds"  # a measurement, not a function of the history
    }


def test_tensorboard_history_after_a_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    common = ["benchmark.n_experiences=5", "strategy=ewc"]
    train(config(tmp_path / "whole", *common))
    for _ in range(3):
        train(config(tmp_path / "split", *common, "run.max_experiences=2"))
    whole, split = scalars(tmp_path / "whole" / "tb"), scalars(tmp_path / "split" / "tb")
    assert {"accuracy/exp0", "metrics/forgetting", "metrics/bwt", "store/version_bytes"} <= set(
        whole
    )
    assert whole == split
    assert [step for step, _ in whole["accuracy/exp0"]] == [0, 1, 2, 3, 4]
    assert (tmp_path / "split" / "tb" / "hparams").is_dir()
