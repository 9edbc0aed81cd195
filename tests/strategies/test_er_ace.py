"""ER-ACE: the asymmetric cross-entropy against hand-computed values and Avalanche's
``ACECriterion``, the loss the template trains on, and ``strategy=er_ace`` end to end
(it beats naive fine-tuning by far and resumes bit-identically)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from hydra import compose, initialize_config_module
from torch import nn

from engram.memory.replay import ReplayBuffer
from engram.metrics.forgetting import average_accuracy
from engram.store import Store
from engram.strategies.er_ace import ERACEPlugin, ace_loss
from engram.train import train
from engram.training.template import DurableTemplate
from trees import assert_same_tree


def ce(logits: list[float], target: int) -> float:
    """Cross-entropy of one sample, by hand."""
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


OUT_IN = [[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 1.0, 2.0], [1.0, -2.0, 0.0, 0.5]]
Y_IN = [3, 1, 3]  # classes 1 and 3 are present, 0 and 2 are masked out
OUT_MEM = [[0.5, 0.0, 2.0, 1.0], [1.0, 1.0, -1.0, 0.0]]
Y_MEM = [0, 2]  # over all four classes, also those the incoming minibatch lacks


def masked_by_hand() -> float:
    """The incoming part: each sample's cross-entropy over classes 1 and 3 alone."""
    pairs = zip(OUT_IN, Y_IN, strict=True)
    return sum(ce([row[1], row[3]], [1, 3].index(y)) for row, y in pairs) / 3


def test_the_loss_is_a_hand_computed_value() -> None:
    out_in = torch.tensor(OUT_IN, requires_grad=True)
    loss = ace_loss(out_in, torch.tensor(Y_IN), torch.tensor(OUT_MEM), torch.tensor(Y_MEM))
    replayed = sum(ce(row, y) for row, y in zip(OUT_MEM, Y_MEM, strict=True)) / 2
    assert loss.item() == pytest.approx((masked_by_hand() + replayed) / 2, rel=1e-6)
    loss.backward()
    assert torch.equal(out_in.grad[:, [0, 2]], torch.zeros(3, 2))  # absent classes: masked
    assert (out_in.grad[:, [1, 3]] != 0).all()


def test_with_an_empty_buffer_it_is_the_masked_cross_entropy_alone() -> None:
    loss = ace_loss(torch.tensor(OUT_IN), torch.tensor(Y_IN))
    assert loss.item() == pytest.approx(masked_by_hand(), rel=1e-6)
    full = F.cross_entropy(torch.tensor(OUT_IN), torch.tensor(Y_IN))
    assert abs(loss.item() - full.item()) > 0.1  # the masking matters here


def test_it_equals_avalanches_ace_criterion() -> None:
    from avalanche.training import ACECriterion

    g = torch.Generator().manual_seed(0)
    out_in, out_mem = torch.randn(32, 10, generator=g), torch.randn(16, 10, generator=g)
    y_in = torch.randint(4, 7, (32,), generator=g)  # a few classes of ten
    y_mem = torch.randint(0, 10, (16,), generator=g)
    ours = ace_loss(out_in, y_in, out_mem, y_mem)
    torch.testing.assert_close(ours, ACECriterion()(out_in, y_in, out_mem, y_mem))


class Recorder(SupervisedPlugin):
    """Notes the loss the template is about to back-propagate, with its outputs."""

    engram_transient = ("steps",)  # a test's hook, not memory

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.steps.append((strategy.loss.detach().clone(), strategy.mb_output.detach().clone(),
                           strategy.mb_y.clone()))  # fmt: skip


class AddOne(SupervisedPlugin):
    """A loss term added before ER-ACE's hook runs (as a penalty plugin would)."""

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        strategy.loss += 1.0


@pytest.fixture(scope="module")
def streams():
    from engram.streams.digits import split_digits

    bench = split_digits(5)
    return bench.train_stream[:2], bench.test_stream[:2]


def trained_steps(store: Path, streams, plugins: list[Any]) -> list[tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    recorder = Recorder()
    with DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                         store=store, plugins=[*plugins, recorder], name="er_ace") as t:  # fmt: skip
        t.fit(*streams)
    return recorder.steps


@pytest.mark.parametrize("before", [False, True], ids=["alone", "after_another_term"])
def test_the_template_trains_on_the_ace_loss(tmp_path: Path, streams, before: bool) -> None:
    extra = 1.0 if before else 0.0
    plugins = [AddOne()] if before else []
    steps = trained_steps(tmp_path / "s", streams, [*plugins, ERACEPlugin(batch_size_mem=8)])
    (loss, out, y), *replaying = steps
    assert len(out) == 32  # the first step: an empty buffer, no replay
    assert loss.item() == pytest.approx(ace_loss(out, y).item() + extra, rel=1e-6)
    assert len(replaying) > 10
    for loss, out, y in replaying:
        n = len(out) - 8  # the incoming samples, then the 8 replayed
        expected = ace_loss(out[:n], y[:n], out[n:], y[n:]).item() + extra
        assert loss.item() == pytest.approx(expected, rel=1e-6)
    # the second experience replays classes its minibatches lack (their logits unmasked)
    assert any(set(y[-8:].tolist()) - set(y[:-8].tolist()) for _, _, y in replaying)


# ------------------------------------------------------------------------ end to end


def config(store: Path, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[f"store.path={store}", "training.epochs=1",
                                           "run.quiet=true", "logger=none", *overrides])  # fmt: skip


def test_er_ace_beats_naive_on_split_digits_by_far(tmp_path: Path) -> None:
    naive = average_accuracy(train(config(tmp_path / "naive", "strategy=naive")))
    er_ace = average_accuracy(train(config(tmp_path / "er_ace", "strategy=er_ace")))
    assert er_ace > naive + 0.3, (er_ace, naive)


def final(path: Path) -> tuple[Any, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """HEAD's accuracy matrix, weights, ER-ACE state and buffer contents."""
    with Store.open(path) as store:
        snap = store.load()
        state = snap.state["plugins"]["er_ace"]
        buffer = ReplayBuffer(store, **state["hparams"])
        buffer.load_state_dict(state)
        contents = buffer.contents()
    return snap.state["metrics"]["accuracy_matrix"], dict(snap.model), state, contents


def test_a_run_split_across_calls_ends_bit_identical(tmp_path: Path) -> None:
    whole = train(config(tmp_path / "whole", "strategy=er_ace"))
    first = train(config(tmp_path / "split", "strategy=er_ace", "run.max_experiences=2"))
    assert len(first) == 2
    assert train(config(tmp_path / "split", "strategy=er_ace")) == whole
    matrix_a, weights_a, state_a, contents_a = final(tmp_path / "whole")
    matrix_b, weights_b, state_b, contents_b = final(tmp_path / "split")
    assert matrix_a == matrix_b == whole
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert len(contents_a["y"]) == 200  # the buffer is full
    assert_same_tree(contents_a, contents_b, "buffer contents")
    # counters, RNG streams, slot keys; the slots' sample ids are the store's own (a
    # reopened store starts a new id range), their contents are compared above
    del state_a["slots"], state_b["slots"]
    assert_same_tree(state_a, state_b, "buffer state")
