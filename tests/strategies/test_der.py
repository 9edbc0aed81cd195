"""DER++'s buffer minibatches share the training minibatch's forward when the model has
no batch statistics (one forward of 3n rows, the same training as three forwards), and
get their own forwards when it has; the template's criterion and metrics see the
training rows only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from engram.strategies import der
from engram.strategies.der import DERPlugin, fusable
from engram.training.template import DurableTemplate


class Seen(SupervisedPlugin):
    """After DER's hooks: the rows the loss is taken over, and the loss's parts."""

    engram_transient = ("rows",)  # a test's hook, not memory

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, int, int]] = []

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.rows.append((len(strategy.mb_x), len(strategy.mb_y), len(strategy.mb_output)))


@pytest.fixture(scope="module")
def streams():
    from engram.streams.digits import split_digits

    bench = split_digits(5)
    return bench.train_stream[:2], bench.test_stream[:2]


def trained(store: Path, streams, model: nn.Module) -> tuple[dict[str, torch.Tensor], list, int]:
    """The weights after two experiences of DER++; in the second, the rows each step's
    loss saw and the training forwards run."""
    calls = [0]  # forwards in training mode (not admission's or evaluation's)
    model.register_forward_hook(lambda m, *_: calls.__setitem__(0, calls[0] + m.training))
    seen = Seen()
    plugin = DERPlugin(mem_size=64, alpha=0.1, beta=0.5, seed=2)
    with DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                         store=store, plugins=[plugin, seen], name="der") as t:  # fmt: skip
        t.train(streams[0][0])  # the buffer is empty at first: no replay
        before, seen.rows = calls[0], []
        t.train(streams[0][1])  # every step replays
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        seen.rows,
        calls[0] - before,
    )


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))


def test_one_forward_trains_as_three(tmp_path: Path, streams, monkeypatch) -> None:
    fused, rows, forwards = trained(tmp_path / "fused", streams, mlp())
    steps = len(rows)
    assert steps > 5 and forwards == steps
    monkeypatch.setattr(der, "fusable", lambda model: False)
    apart, rows_apart, forwards_apart = trained(tmp_path / "apart", streams, mlp())
    assert forwards_apart == 3 * steps
    assert rows == rows_apart
    assert all(r == (r[0],) * 3 for r in rows)  # the criterion's rows: training ones only
    assert fused.keys() == apart.keys()
    for k in fused:  # the same loss; only float rounding of a wider matmul differs
        torch.testing.assert_close(fused[k], apart[k], rtol=1e-4, atol=1e-5)


def test_a_model_with_batch_norm_keeps_a_forward_per_minibatch(tmp_path: Path, streams) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    assert not fusable(model) and fusable(mlp())
    _, rows, forwards = trained(tmp_path / "bn", streams, model)
    assert forwards == 3 * len(rows) > 15
