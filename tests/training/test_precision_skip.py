"""fp16 with ``nonfinite="skip"`` on CPU (torch's CPU GradScaler): a skipped step still
ends the scaler's step, so the steps after it train; a gradient overflow alone is the
scaler's to skip, not counted as a skipped update."""

from __future__ import annotations

from pathlib import Path

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from engram.training.template import DurableTemplate

INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's default init_scale


class Inject(SupervisedPlugin):
    """Multiplies the loss of the given training iterations (before backward) by a
    factor: ``1e38`` overflows the scaled gradients with a finite loss, ``nan`` makes the
    loss itself non-finite. Records which iterations left the weights unchanged."""

    engram_transient = ("_before", "factors", "unchanged")  # a test's hook, not memory

    def __init__(self, factors: dict[int, float]) -> None:
        super().__init__()
        self.factors = factors
        self.unchanged: dict[int, bool] = {}
        self._before: list[torch.Tensor] = []

    def before_backward(self, strategy, **kwargs) -> None:
        factor = self.factors.get(strategy.clock.train_iterations)
        if factor is not None:
            self._before = [p.detach().clone() for p in strategy.model.parameters()]
            strategy.loss = strategy.loss * factor

    def after_update(self, strategy, **kwargs) -> None:
        i = strategy.clock.train_iterations
        if i in self.factors:
            after = list(strategy.model.parameters())
            self.unchanged[i] = all(
                torch.equal(a, b) for a, b in zip(self._before, after, strict=True)
            )


def fit(store: Path, factors: dict[int, float]) -> tuple[DurableTemplate, Inject]:
    from engram.streams.digits import split_digits

    bench = split_digits(5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    inject = Inject(factors)
    with DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                         store=store, plugins=[inject], train_epochs=2, precision="16-mixed",
                         nonfinite="skip", commit_every_iterations=5) as t:  # fmt: skip
        t.fit(bench.train_stream[:2], bench.test_stream[:2])
    return t, inject


def test_fp16_skips_a_nonfinite_loss_and_trains_on_afterwards(tmp_path: Path) -> None:
    t, inject = fit(tmp_path / "s", {3: float("nan")})
    assert inject.unchanged == {3: True}
    assert t.skipped_updates == 1
    assert t.clock.train_iterations > 3 + 5  # several steps after the skip
    # the scaler ended the skipped step: the NaN gradients lowered its scale once
    assert t.numerics.scaler.get_scale() == INITIAL_SCALE / 2
    for p in t.model.parameters():
        assert bool(torch.isfinite(p).all())


def test_fp16_leaves_a_gradient_overflow_to_the_scaler(tmp_path: Path) -> None:
    t, inject = fit(tmp_path / "s", {3: 1e38, 7: float("nan")})
    assert inject.unchanged == {3: True, 7: True}
    assert t.skipped_updates == 1  # the NaN loss; the overflow is the scaler's own skip
    assert t.numerics.scaler.get_scale() == INITIAL_SCALE / 4
