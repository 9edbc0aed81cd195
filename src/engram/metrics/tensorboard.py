"""TensorBoard review of forgetting, written from the accuracy matrix the store persists.

Per (trained-on i, evaluated-on j): ``accuracy/exp{j}`` at step i (one curve per test
experience, so forgetting shows as a falling curve); ``metrics/average_accuracy``,
``metrics/forgetting``, ``metrics/bwt`` and ``metrics/fwt`` at step i; an
``accuracy_matrix`` heatmap;
``store/commit_seconds`` and ``store/version_bytes``; and the run's hyperparameters with
its final metrics in the HParams dashboard (in the store's run itself: one run per store).

On the iteration axis (from :class:`~engram.metrics.curves.TrainingCurves`, persisted
with the run): ``train/loss`` per minibatch; ``train/loss_epoch``, ``train/accuracy``
and ``train/lr`` per epoch, at the epoch's first iteration; ``eval/exp{j}`` when each
experience ends, so evaluation over time lines up with the loss. One directory per
store (``<store>/tb``): ``tensorboard --logdir runs`` shows every store as one run,
side by side.

A resumed run rewrites the history from the persisted matrix (older events are purged),
so the dashboard after a restart shows exactly what an uninterrupted run would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engram.metrics.forgetting import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)


class ForgettingWriter:
    def __init__(self, log_dir: Path | str, initial: list[float] | None = None) -> None:
        """``initial``: accuracies of the untrained model per test experience (for FWT)."""
        from torch.utils.tensorboard import SummaryWriter

        self.initial = initial
        # purge_step=0: events of earlier processes are hidden; history is rewritten below.
        self.writer = SummaryWriter(str(log_dir), purge_step=0)

    def history(self, matrix: list[list[float]], version_bytes: list[int] | None = None) -> None:
        """Write every row of ``matrix`` (once at start: the persisted history).

        ``version_bytes[i]``: what experience i's version wrote (from the store). Commit
        durations are not persisted, so they are only plotted by the run that measured them.
        """
        for i in range(len(matrix)):
            nbytes = version_bytes[i] if version_bytes and i < len(version_bytes) else None
            self.experience(matrix[: i + 1], nbytes=nbytes)

    def curves(self, losses: Any, epochs: list[list[float]], matrix: list[list[float]]) -> None:
        """Write the persisted training curves (once at start, like :meth:`history`):
        at most :data:`MAX_HISTORY_POINTS` loss points (TensorBoard samples its charts
        anyway), every epoch row, and evaluation at each finished experience's end."""
        stride = max(1, -(-len(losses) // MAX_HISTORY_POINTS))
        for step in range(0, len(losses), stride):
            self.writer.add_scalar("train/loss", float(losses[step]), step)
        for row in epochs:
            self._epoch_row(row)
        ends = experience_ends(epochs, len(losses))
        for i, row in enumerate(matrix):
            if i in ends:
                self._eval(row, ends[i])

    def epoch(self, losses: Any, row: list[float]) -> None:
        """Write one finished epoch: its minibatch losses and its row (live)."""
        first = int(row[2])
        for k, loss in enumerate(losses.tolist()):
            self.writer.add_scalar("train/loss", loss, first + k)
        self._epoch_row(row)

    def _epoch_row(self, row: list[float]) -> None:
        _, _, first, loss, accuracy, lr = row
        self.writer.add_scalar("train/loss_epoch", loss, int(first))
        self.writer.add_scalar("train/accuracy", accuracy, int(first))
        self.writer.add_scalar("train/lr", lr, int(first))

    def _eval(self, row: list[float], iteration: int) -> None:
        for j, accuracy in enumerate(row):
            self.writer.add_scalar(f"eval/exp{j}", accuracy, iteration)

    def experience(
        self,
        matrix: list[list[float]],
        commit_seconds: float | None = None,
        nbytes: int | None = None,
        iteration: int | None = None,
    ) -> None:
        """Write the metrics after experience ``len(matrix) - 1`` (``iteration``: the
        training iterations so far, for ``eval/exp{j}``)."""
        step = len(matrix) - 1
        if iteration is not None:
            self._eval(matrix[-1], iteration)
        for j, accuracy in enumerate(matrix[-1]):
            self.writer.add_scalar(f"accuracy/exp{j}", accuracy, step)
        self.writer.add_scalar("metrics/average_accuracy", average_accuracy(matrix), step)
        self.writer.add_scalar("metrics/forgetting", forgetting(matrix), step)
        self.writer.add_scalar("metrics/bwt", backward_transfer(matrix), step)
        self.writer.add_scalar("metrics/fwt", forward_transfer(matrix, self.initial), step)
        if commit_seconds is not None:
            self.writer.add_scalar("store/commit_seconds", commit_seconds, step)
        if nbytes is not None:
            self.writer.add_scalar("store/version_bytes", nbytes, step)
        self.writer.add_figure("accuracy_matrix", heatmap(matrix), step)
        self.writer.flush()

    def hparams(self, hparams: dict[str, Any], matrix: list[list[float]]) -> None:
        if not matrix:
            return
        final = {
            "hparam/average_accuracy": average_accuracy(matrix),
            "hparam/forgetting": forgetting(matrix),
            "hparam/bwt": backward_transfer(matrix),
            "hparam/fwt": forward_transfer(matrix, self.initial),
        }
        flat = {
            k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in hparams.items()
        }
        # In the store's own run, not in a sub-run as SummaryWriter.add_hparams would
        # (that makes each store two runs in the run list): the same summaries, our writer.
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        writer = self.writer._get_file_writer()
        for summary in hparams_summaries(flat, final):
            writer.add_summary(summary)
        for name, value in final.items():
            self.writer.add_scalar(name, value, len(matrix) - 1)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


MAX_HISTORY_POINTS = 20_000


def experience_ends(epochs: list[list[float]], iterations: int) -> dict[int, int]:
    """Experience → the iteration count when its last epoch ended."""
    ends: dict[int, int] = {}
    for k, row in enumerate(epochs):
        following = int(epochs[k + 1][2]) if k + 1 < len(epochs) else iterations
        ends[int(row[0])] = following
    return ends


# Cells are labelled up to this many experiences a side; beyond, the labels would be
# unreadable and drawing them (and a figure grown to fit them) made each experience's
# figure cost O(experiences^2): 20 s at 100 experiences. The figure's size is capped too.
MAX_LABELLED = 12


def heatmap(matrix: list[list[float]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(matrix), max(len(r) for r in matrix)
    grid = [list(r) + [float("nan")] * (cols - len(r)) for r in matrix]  # ragged: blank
    side = min(max(rows, cols), MAX_LABELLED)
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * side, 1 + 0.65 * side))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
    if max(rows, cols) <= MAX_LABELLED:
        for i in range(rows):
            for j in range(len(matrix[i])):
                # viridis is light from ~0.6 up: dark text there, white text on dark cells
                color = "black" if matrix[i][j] >= 0.6 else "white"
                ax.text(j, i, f"{matrix[i][j]:.2f}", ha="center", va="center", fontsize=9,
                        color=color)  # fmt: skip
        ax.set_xticks(range(cols))
        ax.set_yticks(range(rows))
    else:  # colours only: the scale beside them
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("evaluated on experience")
    ax.set_ylabel("after training experience")
    fig.tight_layout()
    return fig
