"""Two data-parallel ranks (a gloo group of two spawned processes on this host): the
model is broadcast once on the device it trains on, and under fp16 an overflow or a
non-finite loss on one rank only makes both ranks skip that step, alike (or, with
``nonfinite="stop"``, both stop).

Both cases share one pair of processes (each imports torch and Avalanche: seconds).
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from avalanche.core import SupervisedPlugin
from torch import nn

from helpers import two_ranks

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")

GLOO_TIMEOUT_S = 60.0  # a rank waiting on a peer that failed gives up
DEADLINE_S = 150.0  # for both ranks: a broken step fails the test, never hangs it
OVERFLOW_AT, NAN_AT = 2, 5  # training iterations; rank 1 only
INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's default init_scale


class Inject(SupervisedPlugin):
    """Multiplies the loss of the given iterations by a factor (before backward):
    ``1e38`` overflows the scaled gradients with a finite loss, ``nan`` makes the loss
    non-finite; records whether each of them left the weights unchanged."""

    engram_transient = ("_before", "factors", "unchanged")  # a test's hook, not memory

    def __init__(self, factors: dict[int, float]) -> None:
        super().__init__()
        self.factors = factors
        self.unchanged: dict[int, bool] = {}
        self._before: list[torch.Tensor] = []

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if (factor := self.factors.get(strategy.clock.train_iterations)) is not None:
            self._before = [p.detach().clone() for p in strategy.model.parameters()]
            strategy.loss = strategy.loss * factor

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if (i := strategy.clock.train_iterations) in self.factors:
            after = strategy.model.parameters()
            self.unchanged[i] = all(
                torch.equal(a, b) for a, b in zip(self._before, after, strict=True)
            )


class Placed(nn.Sequential):
    """Remembers the device it was last moved to (``None``: where it was built)."""

    placed_on: torch.device | None = None

    def to(self, device: torch.device | str, *args: Any, **kwargs: Any) -> Placed:
        self.placed_on = torch.device(device)  # the template moves it with .to(device)
        return super().to(device, *args, **kwargs)


def _rank_main(rank: int, root: str, results: Any) -> None:
    out: dict[str, Any] = {}
    try:
        from engram import distributed
        from engram.streams.digits import split_digits
        from engram.training import template

        torch.set_num_threads(1)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)  # this process's environment: no launcher here
        dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                                world_size=2, timeout=timedelta(seconds=GLOO_TIMEOUT_S))  # fmt: skip
        broadcast = template.broadcast_module
        seen = out["broadcast"] = []

        def recording(module: Placed, world: Any) -> None:
            seen.append((module.placed_on, {p.device for p in module.parameters()}))
            broadcast(module, world)

        template.broadcast_module = recording
        torch.manual_seed(rank)  # the ranks build different models: rank 0's must win
        model = Placed(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        factors = {OVERFLOW_AT: 1e38, NAN_AT: float("nan")} if rank == 1 else {}
        inject = Inject(factors)
        watch = Inject({OVERFLOW_AT: 1.0, NAN_AT: 1.0})  # records on either rank
        bench = split_digits(5)
        with template.DurableTemplate(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            store=Path(root) / "store", plugins=[inject, watch], train_epochs=2,
            precision="16-mixed", nonfinite="skip",
        ) as t:  # fmt: skip
            template.broadcast_module = broadcast
            out["device"] = t.device
            t.fit(bench.train_stream[:1], bench.test_stream[:1])
        out["unchanged"] = watch.unchanged
        out["skipped_updates"] = t.skipped_updates
        out["scale"] = t.numerics.scaler.get_scale()
        out["iterations"] = t.clock.train_iterations
        out["weights"] = {k: v.numpy().copy() for k, v in t.model.state_dict().items()}
        out["stop"] = _stop_case(rank, Path(root) / "stop", bench)
        distributed.shutdown()
    except BaseException:
        out["crash"] = traceback.format_exc()
    results.put((rank, out))


def _stop_case(rank: int, store: Path, bench: Any) -> tuple[str, str] | None:
    """``nonfinite="stop"``, a NaN loss on rank 1 only: what ``fit`` raised on this rank."""
    from engram.training.template import DurableTemplate

    model = nn.Sequential(nn.Linear(64, 10))
    inject = Inject({NAN_AT: float("nan")} if rank == 1 else {})
    try:
        with DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                             store=store, plugins=[inject], precision="16-mixed") as t:  # fmt: skip
            t.fit(bench.train_stream[:1], bench.test_stream[:1])
    except Exception as e:
        return type(e).__name__, str(e)
    return None


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("ranks")
    return [outcome for outcome, _ in two_ranks(_rank_main, str(root), DEADLINE_S)]


def test_the_model_is_broadcast_once_on_the_device_it_trains_on(ranks: list[dict]) -> None:
    for out in ranks:
        [(placed_on, devices)] = out["broadcast"]
        assert placed_on == out["device"]  # moved there before the broadcast (NCCL needs it)
        assert devices == {out["device"]}


def test_an_overflow_on_one_rank_makes_both_skip_and_the_weights_stay_identical(
    ranks: list[dict],
) -> None:
    for out in ranks:
        # both steps skipped on both ranks: the overflow by the scaler, the NaN loss by us
        assert out["unchanged"] == {OVERFLOW_AT: True, NAN_AT: True}
        assert out["skipped_updates"] == 1
        assert out["scale"] == INITIAL_SCALE / 4  # both scalers backed off twice
        assert out["iterations"] > NAN_AT + 5  # and trained on
    a, b = (out["weights"] for out in ranks)
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
        assert torch.isfinite(torch.from_numpy(a[key])).all(), key


def test_a_nan_loss_on_one_rank_stops_every_rank(ranks: list[dict]) -> None:
    (kind0, message0), (kind1, message1) = (out["stop"] for out in ranks)
    assert kind0 == kind1 == "NonFiniteError"
    assert f"iteration {NAN_AT}: the loss of another rank is not finite" in message0
    assert f"iteration {NAN_AT}: the loss is not finite (nan loss)" in message1
