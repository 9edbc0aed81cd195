"""Hydra's sweepers and launchers run engram-train (the ``tune`` extra): an Optuna study
optimises ``run.objective`` (single- and multi-objective), a re-run study returns the
stored values without training, and the joblib launcher runs a sweep, one store a job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from engram.metrics import average_accuracy, forgetting
from engram.store import Store

TRAIN = [sys.executable, "-m", "engram.train", "run.quiet=true", "benchmark.n_experiences=2",
         "logger=none"]  # fmt: skip
DEADLINE_S = 240


def sweep(cwd: Path, *overrides: str, multirun: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [*TRAIN[:3], *(["-m"] if multirun else []), *TRAIN[3:], *overrides]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          timeout=DEADLINE_S, env=env)  # fmt: skip


def stored_matrices(cwd: Path) -> dict[str, list[list[float]]]:
    """Each job's store (by directory name): the accuracy matrix its HEAD holds."""
    out = {}
    for path in sorted((cwd / "runs").iterdir()):
        if path.name == "multirun":
            continue
        with Store.open(path) as store:
            out[path.name] = store.load(state=True, model=False).state["metrics"]["accuracy_matrix"]
    return out


def results(cwd: Path) -> dict:
    (found,) = cwd.glob("runs/multirun/*/optimization_results.yaml")
    return yaml.safe_load(found.read_text())


OPTUNA = ("hydra/sweeper=optuna", "hydra.sweeper.sampler.seed=7",
          "optimizer.lr=interval(0.001,0.1)", "strategy=replay")  # fmt: skip


def test_an_optuna_study_maximises_the_average_accuracy(tmp_path: Path) -> None:
    done = sweep(tmp_path, *OPTUNA, "hydra.sweeper.n_trials=3", "hydra.sweeper.direction=maximize")
    assert done.returncode == 0, done.stderr[-2000:]
    matrices = stored_matrices(tmp_path)
    assert len(matrices) == 3  # a store per trial
    best = results(tmp_path)
    values = {name: average_accuracy(m) for name, m in matrices.items()}
    assert best["best_value"] == max(values.values())
    (winner,) = [n for n, v in values.items() if v == best["best_value"]]
    assert f"optimizer.lr={best['best_params']['optimizer.lr']}" in winner

    # The same study again: the same trials (seeded sampler), already trained: the stored
    # values come back and nothing trains (no store gains a version).
    heads = {}
    for name in matrices:
        with Store.open(tmp_path / "runs" / name) as store:
            heads[name] = store.head.id
    for old in (tmp_path / "runs" / "multirun").iterdir():
        (old / "optimization_results.yaml").unlink()
    again = sweep(tmp_path, *OPTUNA, "hydra.sweeper.n_trials=3", "hydra.sweeper.direction=maximize")
    assert again.returncode == 0, again.stderr[-2000:]
    assert results(tmp_path)["best_value"] == best["best_value"]
    for name, head in heads.items():
        with Store.open(tmp_path / "runs" / name) as store:
            assert store.head.id == head


def test_a_multi_objective_study(tmp_path: Path) -> None:
    done = sweep(tmp_path, *OPTUNA, "hydra.sweeper.n_trials=2",
                 "hydra.sweeper.direction=[maximize,minimize]",
                 "run.objective=[average_accuracy,forgetting]")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    front = results(tmp_path)["solutions"]  # the Pareto front
    pairs = {(average_accuracy(m), forgetting(m)) for m in stored_matrices(tmp_path).values()}
    assert front and all(tuple(s["values"]) in pairs for s in front)


def test_a_bad_objective_is_one_line(tmp_path: Path) -> None:
    done = sweep(tmp_path, "run.objective=accuracy", multirun=False)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "run.objective" in line and "average_accuracy" in line
