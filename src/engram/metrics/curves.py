"""Training curves, persisted with the run so TensorBoard shows them whole after a resume.

:class:`TrainingCurves` is a plugin of ``engram-train``'s template: it records the loss of
every training minibatch and, per epoch, the mean loss, the training accuracy (on the
minibatch as trained: with replay, the replayed samples count too) and the learning
rate. Its state is committed with every version like any plugin's (a float32 tensor of
losses, 4 bytes per iteration, and one row per epoch), so after a restart
:class:`~engram.metrics.tensorboard.ForgettingWriter` rewrites the curves of the whole
lineage, and a run killed mid-epoch shows the minibatches it trained again once, not
twice. Losses are read from the device once per epoch, not per minibatch. A minibatch
whose loss was not finite (skipped by ``training.nonfinite=skip``; counted in the
version's ``meta["skipped_updates"]``) is left out of the curve: a committed curve is
finite, as every committed tensor is (engram.training.guard).
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin

# epoch rows: experience, epoch, first iteration, mean loss, accuracy, learning rate
EPOCH_FIELDS = ("experience", "epoch", "iteration", "loss", "accuracy", "lr")


class TrainingCurves(SupervisedPlugin):
    """Per-iteration loss and per-epoch loss, accuracy and learning rate (see module)."""

    engram_name = "curves"

    def __init__(self) -> None:
        super().__init__()
        self.losses = torch.zeros(0, dtype=torch.float32)  # every trained minibatch
        self.epochs: list[list[float]] = []
        self._pending: list[torch.Tensor] = []  # this epoch's losses, still on the device
        self._correct: torch.Tensor | int = 0
        self._seen = 0
        self._first: int | None = None  # global index of the open epoch's first iteration
        self.on_epoch: Any = None  # called with (losses, row) when an epoch ends

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        loss, out, y = strategy.loss, strategy.mb_output, strategy.mb_y
        if self._first is None:
            self._first = len(self.losses)
        self._pending.append(loss.detach().float().reshape(()))
        if isinstance(out, torch.Tensor) and out.dim() == 2 and len(out) == len(y):
            self._correct = self._correct + (out.detach().argmax(dim=1) == y).sum()
            self._seen += len(y)
        if strategy.cursor.iteration + 1 >= len(strategy.dataloader.batch_sampler):
            self._close_epoch(strategy)  # before the template's commit at the epoch's end

    def _flush(self) -> torch.Tensor:
        """This epoch's losses so far, appended to :attr:`losses` (one device read)."""
        new = torch.stack(self._pending).cpu() if self._pending else self.losses[:0]
        new = new[torch.isfinite(new)]  # skipped minibatches (see the module docstring)
        self.losses = torch.cat([self.losses, new])
        self._pending = []
        return new

    def _close_epoch(self, strategy: Any) -> None:
        start = self._first if self._first is not None else len(self.losses)
        self._flush()
        epoch_losses = self.losses[start:]
        correct = int(self._correct)
        row = [
            float(strategy.cursor.experience),
            float(strategy.cursor.epoch),
            float(start),
            float(epoch_losses.mean()) if len(epoch_losses) else float("nan"),
            correct / self._seen if self._seen else float("nan"),
            float(strategy.optimizer.param_groups[0]["lr"]),
        ]
        self.epochs.append(row)
        self._correct, self._seen, self._first = 0, 0, None
        if self.on_epoch is not None:
            self.on_epoch(epoch_losses, row)

    def state_dict(self) -> dict[str, Any]:
        self._flush()  # a mid-epoch commit: what the epoch trained so far is kept
        return {
            "losses": self.losses.clone(),
            "epochs": torch.tensor(self.epochs, dtype=torch.float64).reshape(-1, 6),
            "open": {
                "first": -1 if self._first is None else self._first,
                "correct": int(self._correct),
                "seen": self._seen,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = state["losses"].float().clone()
        self.epochs = [list(map(float, row)) for row in state["epochs"].tolist()]
        self._pending = []
        opened = state["open"]  # the epoch in progress: its iterations so far are in losses
        self._first = None if opened["first"] < 0 else opened["first"]
        self._correct, self._seen = opened["correct"], opened["seen"]

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        pass  # rows close on the epoch's last iteration (see after_training_iteration)
