"""A replaced Avalanche buffer writes only its new samples (issue 25).

Avalanche's storage policies replace a buffer's dataset whenever they change it: the
new one subsets the concatenation of the experience's data and the old buffer. The
adapter's ``BufferSamples`` reuses the records of the samples that came from a buffer
it saved or loaded and reads and writes only the others; what it stores must be exactly
what reading the whole buffer through its eval transforms gives.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset,
)
from avalanche.training.storage_policy import ClassBalancedBuffer, ReservoirSamplingBuffer

from engram.store import Store
from engram.strategies.avalanche_state.samples import (
    BufferSamples,
    _materialize,
    policy_in,
    policy_out,
    read_samples,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _Shift:
    """An eval transform (a named class: the groups compare transforms by identity)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + 100.0


def _experience(n: int, seed: int, transformed: bool) -> types.SimpleNamespace:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    groups = {"train": (None, None), "eval": (_Shift(), None)} if transformed else None
    dataset = _make_taskaware_tensor_classification_dataset(
        x, y, task_labels=seed, targets=y.tolist(), transform_groups=groups
    )
    return types.SimpleNamespace(dataset=dataset)


def _groups(policy):
    return (
        [policy] if isinstance(policy, ReservoirSamplingBuffer) else policy.buffer_groups.values()
    )


def _check_stored(store: Store, state: dict, dataset) -> None:
    """The records of ``state`` are the dataset's samples, read whole."""
    x, y, t = read_samples(store.samples, state)
    ex, ey, et = _materialize(dataset)
    assert torch.equal(x, ex) and torch.equal(y, ey) and torch.equal(t, et)


@pytest.mark.parametrize("transformed", [False, True], ids=["plain", "eval-transform"])
@pytest.mark.parametrize("policy_class", [ReservoirSamplingBuffer, ClassBalancedBuffer])
def test_a_replaced_buffer_writes_only_its_new_samples(
    tmp_path: Path, transformed: bool, policy_class
) -> None:
    with Store.open(tmp_path / "store", mode="c") as store:
        samples = BufferSamples(types.SimpleNamespace(samples=store.samples))
        policy = policy_class(60)
        written_before = 0
        for e in range(4):
            policy.post_adapt(None, _experience(50, e, transformed))
            with samples.writing():
                state = policy_out(policy, samples)
            written = len(store.samples)
            buffers = list(_groups(policy))
            new = written - written_before
            kept = sum(len(b.buffer) for b in buffers)
            for group, key in zip(buffers, _group_states(state), strict=True):
                _check_stored(store, key["buffer"], group.buffer)
            if e == 0:
                assert new == kept  # the first buffer: every sample is new
            else:  # only the samples of experience e (the rest were written before)
                assert new == sum(int((b.buffer.targets_task_labels[i]) == e)
                                  for b in buffers for i in range(len(b.buffer)))  # fmt: skip
                assert new < kept
            written_before = written


def _group_states(state: dict) -> list[dict]:
    return [state] if "groups" not in state else list(state["groups"].values())


def test_a_resumed_buffer_reuses_the_loaded_records(tmp_path: Path) -> None:
    """After a resume the buffer is the loaded dataset: its next replacement writes
    only the new experience's samples, and what it stores is still the buffer."""
    with Store.open(tmp_path / "store", mode="c") as store:
        strategy = types.SimpleNamespace(samples=store.samples)
        policy = ReservoirSamplingBuffer(60)
        policy.post_adapt(None, _experience(50, 0, True))
        first = BufferSamples(strategy)
        with first.writing():
            state = policy_out(policy, first)
        resumed_policy, resumed = ReservoirSamplingBuffer(60), BufferSamples(strategy)
        policy_in(resumed_policy, state, resumed)
        before = len(store.samples)
        resumed_policy.post_adapt(None, _experience(50, 1, True))
        with resumed.writing():
            after = policy_out(resumed_policy, resumed)
        buffer = resumed_policy.buffer
        from_new = sum(int(buffer.targets_task_labels[i]) == 1 for i in range(len(buffer)))
        assert len(store.samples) - before == from_new < len(buffer)
        _check_stored(store, after["buffer"], buffer)
