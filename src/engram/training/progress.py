"""A progress bar per experience (minibatches across its epochs), on stderr when it is a
terminal. Off a terminal (Hydra's job log, CI, ``nohup``) no bar is drawn: carriage-return
frames would fill the file, and the runner's line per experience says what happened."""

from __future__ import annotations

from typing import Any

from avalanche.core import SupervisedPlugin


class ProgressBar(SupervisedPlugin):
    engram_transient = ("bar",)  # drawn anew after a restart

    def __init__(self) -> None:
        super().__init__()
        self.bar: Any = None

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        from tqdm import tqdm

        if self.bar is None:
            per_epoch = len(strategy.dataloader.batch_sampler)
            done = strategy.cursor.epoch * per_epoch + strategy.cursor.iteration
            self.bar = tqdm(
                total=strategy.train_epochs * per_epoch,
                initial=done,
                desc=f"experience {strategy.cursor.experience}",
                unit="batch",
                leave=False,
                disable=None,  # tqdm's auto: drawn only when stderr is a terminal
            )
        self.bar.set_postfix(epoch=strategy.cursor.epoch)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
