"""engram-train also searches ./configs of the directory it runs in (configs/train.yaml's
hydra.searchpath): a user's configs/experiment/mine.yaml runs as experiment=mine with no
code, and the project's own configs/ (top level of the checkout) compose."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

import engram.train  # noqa: F401 - registers the config schemas
from engram.store import Store

ROOT = Path(__file__).resolve().parents[1]
MINE = """# @package _global_
defaults:
  - override /strategy: ewc
benchmark:
  n_experiences: 2
strategy:
  ewc:
    ewc_lambda: 7.0
"""


def test_a_users_experiment_in_the_working_directory_runs(tmp_path: Path) -> None:
    (tmp_path / "configs" / "experiment").mkdir(parents=True)
    (tmp_path / "configs" / "experiment" / "mine.yaml").write_text(MINE)
    run = [sys.executable, "-m", "engram.train", "experiment=mine", "run.quiet=true",
           "logger=none", "store.path=s"]  # fmt: skip
    done = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr == ""  # no warning about the search path either
    with Store.open(tmp_path / "s") as store:
        assert store.head.meta["hparams"]["plugins"]["ewc"]["ewc_lambda"] == 7.0
        assert store.head.meta["experience"] == 1  # its two experiences
    elsewhere = subprocess.run(run, cwd=tmp_path / "configs", capture_output=True, text=True,
                               timeout=240)  # fmt: skip
    assert elsewhere.returncode == 2 and "Could not find 'experiment/mine'" in elsewhere.stderr


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
)
def test_the_projects_own_experiments_compose(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.chdir(ROOT)
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        cfg = compose("train", overrides=[f"experiment={name}"])
    assert (
        cfg.strategy.name != "naive" or cfg.benchmark.name != "split_digits"
    )  # it changed something
