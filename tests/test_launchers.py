"""Hydra's launchers run an engram-train sweep (the ``tune`` extra): the joblib launcher
runs its jobs in parallel processes, one store a job (tests/test_sweepers.py: Optuna)."""

from __future__ import annotations

from pathlib import Path

from test_sweepers import stored_matrices, sweep


def test_the_joblib_launcher_runs_a_sweep(tmp_path: Path) -> None:
    done = sweep(tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1")
    assert done.returncode == 0, done.stderr[-2000:]
    matrices = stored_matrices(tmp_path)
    assert sorted(matrices) == [f"naive-split_digits-seed{seed}-benchmark.n_experiences=2"
                                for seed in (0, 1)]  # fmt: skip
    assert all(len(m) == 2 for m in matrices.values())
