"""Training curves: recorded per minibatch and epoch, persisted, shown in TensorBoard."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import scenario

from engram.store import Store


def test_every_minibatch_and_epoch_is_recorded_with_the_version(tmp_path: Path) -> None:
    scenario.run("er", tmp_path / "s")
    with Store.open(tmp_path / "s") as store:
        curves = store.load().state["plugins"]["curves"]
    # 3 experiences x 2 epochs x 9 minibatches
    assert curves["losses"].dtype == torch.float32 and curves["losses"].shape == (54,)
    assert torch.isfinite(curves["losses"]).all()
    epochs = curves["epochs"]
    assert epochs.shape == (6, 6)
    assert epochs[:, 0].tolist() == [0, 0, 1, 1, 2, 2] and epochs[:, 1].tolist() == [0, 1] * 3
    assert epochs[:, 2].tolist() == [0, 9, 18, 27, 36, 45]  # each epoch's first iteration
    for k in range(6):  # the epoch's mean loss is the mean of its minibatches' losses
        assert torch.isclose(epochs[k, 3], curves["losses"][9 * k : 9 * k + 9].double().mean())
    assert ((epochs[:, 4] > 0) & (epochs[:, 4] <= 1)).all() and (epochs[:, 5] == 0.1).all()
    assert curves["open"]["first"] == -1  # no epoch left open at an experience's end


def test_tensorboard_shows_loss_accuracy_lr_and_evaluation_on_the_iteration_axis(
    tmp_path: Path,
) -> None:
    from engram.train import train
    from helpers import scalars
    from test_train import config

    train(config(tmp_path / "s", "benchmark.n_experiences=5", "run.max_experiences=2"))
    train(config(tmp_path / "s", "benchmark.n_experiences=5"))  # resumed: history rewritten
    tags = scalars(tmp_path / "s" / "tb")
    assert len(tags["train/loss"]) >= 5 * 8  # ~270 samples an experience, batch 32, 1 epoch
    steps = [s for s, _ in tags["train/loss"]]
    assert steps == list(range(len(steps)))  # every minibatch once, in order
    assert [s for s, _ in tags["train/lr"]] == [s for s, _ in tags["train/accuracy"]]
    assert len(tags["train/lr"]) == 5 and all(abs(v - 0.05) < 1e-7 for _, v in tags["train/lr"])
    ends = [s for s, _ in tags["eval/exp0"]]
    assert len(ends) == 5 and ends[-1] == len(steps) and ends == sorted(ends)
    assert [v for _, v in tags["eval/exp0"]] == [v for _, v in tags["accuracy/exp0"]]
