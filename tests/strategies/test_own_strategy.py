"""A strategy of one's own is one file plus one YAML (engram.strategies.registry's
entry points): a temporary package declares it, and engram-train validates its
hyperparameters, records them, keeps its state and resumes it bit-identically."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engram.store import Store

STRATEGY_FILE = '''
"""Pull the weights toward the last experience's: a strategy of one's own, one file."""
from dataclasses import dataclass

import torch
from avalanche.core import SupervisedPlugin

from engram.rules import hp, number
from engram.stateful import PersistentFields
from engram.strategies.entry import DeclaredHparams, Entry


@dataclass
class ShrinkConfig:
    strength: float = hp(0.1, number(0), "pull toward the last experience's weights")


class ShrinkPlugin(DeclaredHparams, PersistentFields, SupervisedPlugin):
    engram_name = "shrink"
    persistent_fields = ("anchors",)

    def __init__(self, strength: float = ShrinkConfig.strength) -> None:
        super().__init__()
        self.strength = strength
        self.anchors = {}

    def before_backward(self, strategy, **kwargs):
        if self.anchors:
            strategy.loss += self.strength * sum(
                ((p - self.anchors[n]) ** 2).sum() for n, p in strategy.model.named_parameters()
            )

    def after_training_exp(self, strategy, **kwargs):
        self.anchors = {n: p.detach().clone() for n, p in strategy.model.named_parameters()}


STRATEGY = Entry("shrink_strategy:ShrinkPlugin", ShrinkConfig)
'''
YAML = "defaults:\n  - strategy_schema\nname: shrink\nshrink: {}\n"
DEADLINE_S = 240


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory with the package (one file and its dist-info, as pip installs it)
    and the strategy's YAML in ./configs."""
    site = tmp_path / "site"
    (site / "shrink_strategy-0.1.dist-info").mkdir(parents=True)
    (site / "shrink_strategy.py").write_text(STRATEGY_FILE)
    info = site / "shrink_strategy-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: shrink-strategy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[engram.strategies]\nshrink = shrink_strategy:STRATEGY\n"
    )
    (tmp_path / "configs" / "strategy").mkdir(parents=True)
    (tmp_path / "configs" / "strategy" / "shrink.yaml").write_text(YAML)
    return tmp_path


def train(project: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project / "site"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "engram.train", "strategy=shrink", "run.quiet=true",
               "logger=none", "benchmark.n_experiences=2", "training.epochs=1", *overrides]  # fmt: skip
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True,
                          timeout=DEADLINE_S)  # fmt: skip


def test_ones_own_strategy_trains_resumes_and_is_validated(project: Path) -> None:
    first = train(
        project, "store.path=split", "strategy.shrink.strength=0.5", "run.max_experiences=1"
    )
    assert first.returncode == 0, first.stderr[-2000:]
    with Store.open(project / "split") as store:
        assert store.head.meta["hparams"]["plugins"] == {"shrink": {"strength": 0.5}}
        anchors = store.load().state["plugins"]["shrink"]["anchors"]
        weights = store.load().model
        assert set(anchors) == set(weights)  # the plugin's state is in the store
        assert all(torch.equal(anchors[k], weights[k]) for k in anchors)  # anchored at v0001
    resumed = train(project, "store.path=split", "strategy.shrink.strength=0.5")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = train(project, "store.path=whole", "strategy.shrink.strength=0.5")
    assert whole.returncode == 0, whole.stderr[-2000:]
    with Store.open(project / "split") as a, Store.open(project / "whole") as b:
        left, right = a.load(), b.load()
        assert left.state["metrics"]["accuracy_matrix"] == right.state["metrics"]["accuracy_matrix"]
        for key, value in left.model.items():
            assert torch.equal(value, right.model[key]), key
        for key, value in left.state["plugins"]["shrink"]["anchors"].items():
            assert torch.equal(value, right.state["plugins"]["shrink"]["anchors"][key]), key

    bad = train(project, "store.path=bad", "strategy.shrink.strength=-1")
    assert bad.returncode == 2
    (line,) = bad.stderr.strip().splitlines()
    assert "strategy.shrink.strength" in line and ">= 0" in line
    assert not (project / "bad").exists()
