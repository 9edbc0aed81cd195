"""The commit guard (engram.training.guard): no version holds a non-finite tensor of any
kind, or weights that blew up while staying finite; options that underflow float32 are
refused before anything is created."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from engram.errors import ConfigError, NonFiniteError
from engram.metrics.curves import TrainingCurves
from engram.store import Store
from engram.train import train
from engram.training.guard import estimator_problems, nonfinite_paths, oversized

TINY = ["training.epochs=1", "run.quiet=true", "logger=none"]


def config(store: Path, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[f"store.path={store}", *TINY, *overrides])


def test_nonfinite_paths_finds_every_kind_of_value() -> None:
    state = {
        "optimizer": {"state": {0: {"exp_avg": torch.tensor([1.0, float("inf")])}}},
        "plugins": {"si": {"importance": [torch.zeros(2), torch.tensor([float("nan")])]}},
        "numpy": np.array([np.nan]),
        "half": torch.tensor([float("inf")], dtype=torch.float16),
        "lr": float("nan"),
        "ints": torch.tensor([1, 2]),
        "fine": torch.ones(3, dtype=torch.bfloat16),
        "empty": torch.zeros(0),
    }
    assert nonfinite_paths(state) == [
        "optimizer/state/0/exp_avg", "plugins/si/importance/1", "numpy", "half", "lr",
    ]  # fmt: skip
    assert nonfinite_paths(state, exempt=("numpy", "lr")) == [
        "optimizer/state/0/exp_avg", "plugins/si/importance/1", "half",
    ]  # fmt: skip


def test_oversized_names_the_weights_beyond_the_bound() -> None:
    weights = {"a": torch.tensor([1.0, -2e6]), "b": torch.ones(2), "n": torch.tensor([7])}
    assert oversized(weights, 1e6) == [("a", 2e6)]
    assert oversized(weights, None) == []


class NaNImportance:
    """A user's plugin whose importances turn NaN after the first experience."""

    engram_name = "importance"

    def __init__(self) -> None:
        self.importance = torch.zeros(3)
        self.experiences = 0

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.experiences += 1
        if self.experiences == 2:
            self.importance = self.importance / 0.0  # 0/0: what a zero eps gives

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance = state["importance"]

    def __getattr__(self, name: str) -> Any:  # every other Avalanche hook: nothing
        if name.startswith("before_") or name.startswith("after_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def test_a_plugin_state_that_is_not_finite_is_never_committed(tmp_path: Path) -> None:
    from engram.streams.digits import split_digits
    from engram.training.template import DurableTemplate

    bench = split_digits(5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    refused = pytest.raises(
        NonFiniteError, match=r"non-finite values in the state \(plugins/importance/importance\)"
    )
    with DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         store=tmp_path / "s", plugins=[NaNImportance()]) as template, refused:  # fmt: skip
        template.fit(bench.train_stream[:2], bench.test_stream[:2])
    with Store.open(tmp_path / "s") as store:
        assert [v.meta["experience"] for v in store.versions()] == [0]  # experience 1: refused
        assert store.verify().ok


def test_a_finite_blow_up_of_the_weights_is_never_committed(tmp_path: Path) -> None:
    # lr 1e30: weights of ~1e29 after one step, finite in float32
    with pytest.raises(NonFiniteError, match=r"weights beyond the bound .*max_abs_weight"):
        train(config(tmp_path / "s", "optimizer.lr=1e30", "training.commit_every_iterations=1"))
    with Store.open(tmp_path / "s") as store:
        assert store.head is None


def test_the_bound_can_be_turned_off(tmp_path: Path) -> None:
    # lr 20 makes weights of ~10-100: beyond a bound of 1, within the default
    with pytest.raises(NonFiniteError, match="beyond the bound"):
        train(config(tmp_path / "a", "optimizer.lr=20", "training.max_abs_weight=1",
                     "run.max_experiences=1"))  # fmt: skip
    train(config(tmp_path / "b", "optimizer.lr=20", "training.max_abs_weight=null",
                 "run.max_experiences=1"))  # fmt: skip
    with Store.open(tmp_path / "b") as store:
        assert store.head.meta["experience"] == 0


def test_a_diverged_sklearn_estimator_is_never_committed(tmp_path: Path) -> None:
    with pytest.raises(
        NonFiniteError, match=r"beyond the bound .* in .*(coef_|intercept_) \(\de\+(29|30)\)"
    ):
        train(config(tmp_path / "s", "model=sgd_classifier", "+model.args.learning_rate=constant",
                     "+model.args.eta0=1e30"))  # fmt: skip
    with Store.open(tmp_path / "s") as store:
        assert store.head is None


def test_estimator_problems_walks_pipelines_and_lists() -> None:
    from sklearn.linear_model import SGDClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
    pipe = make_pipeline(StandardScaler(), SGDClassifier(random_state=0)).fit(x, y)
    assert estimator_problems(pipe, 1e6) is None
    pipe.steps[1][1].coef_[0, 0] = np.nan
    assert estimator_problems(pipe, 1e6) == "non-finite values in steps/1/1/coef_"
    mlp = MLPClassifier(hidden_layer_sizes=(4,), max_iter=5, random_state=0).fit(x, y)
    mlp.coefs_[1][0, 0] = 5e6
    assert "coefs_/1 (5e+06)" in estimator_problems(mlp, 1e6)


def test_nonfinite_skip_leaves_the_skipped_minibatch_out_of_the_committed_curve(
    tmp_path: Path,
) -> None:
    from engram.streams.digits import split_digits
    from engram.training.template import DurableTemplate

    class NaNOnce(torch.nn.Module):
        calls = 0

        def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            loss = torch.nn.functional.cross_entropy(output, target)
            return loss * float("nan") if self.calls == 3 else loss

    bench = split_digits(5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    with DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         store=tmp_path / "s", criterion=NaNOnce(), nonfinite="skip",
                         plugins=[TrainingCurves()]) as template:  # fmt: skip
        template.fit(bench.train_stream[:1], bench.test_stream[:1])
        trained = template.clock.train_iterations
    with Store.open(tmp_path / "s") as store:
        assert store.head.meta["skipped_updates"] == 1
        curves = store.load().state["plugins"]["curves"]
    assert len(curves["losses"]) == trained - 1 and bool(torch.isfinite(curves["losses"]).all())
    assert bool(torch.isfinite(curves["epochs"]).all())


@pytest.mark.parametrize("option", ["strategy=si strategy.si.eps=1e-50",
                                    "strategy=avalanche.si strategy.avalanche_si.eps=1e-40",
                                    "strategy=lwf strategy.lwf.temperature=1e-45"])  # fmt: skip
def test_options_that_underflow_float32_are_refused(tmp_path: Path, option: str) -> None:
    with pytest.raises(ConfigError, match=r"must be a number >= 1.2e-38 \(smaller ones are 0"):
        train(config(tmp_path / "s", *option.split()))
    assert not (tmp_path / "s").exists()


def test_an_underflowing_option_is_one_line_exit_2(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engram.train", f"store.path={tmp_path / 's'}", *TINY,
         "strategy=si", "strategy.si.eps=1e-50"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "engram-train: error: strategy.si.eps must be a number >= 1.2e-38 (smaller ones are 0 "
        "in float32), not 1e-50"
    ]


def test_a_matrix_of_numbers_is_checked_row_by_row() -> None:
    from engram.training import guard

    matrix = [[0.5] * 100 for _ in range(100)]
    matrix[7][3] = float("nan")
    tree = {"metrics": {"accuracy_matrix": matrix, "skipped_updates": 0}}
    assert guard.nonfinite_paths(tree) == ["metrics/accuracy_matrix/7"]
    # one array per row, not one value per cell (the matrix grows with the stream squared)
    assert len(list(guard._arrays(tree, ""))) == 100
