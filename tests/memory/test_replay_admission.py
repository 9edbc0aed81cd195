"""A balanced buffer's admission costs what the minibatch changes, not the capacity
(issue 25): each key's slots are a sorted list changed in place, with an undo log for a
minibatch whose samples cannot be written; the victims are those the rule picked before
(the slot of rank ``int(u * n)`` of the largest key's sorted slots)."""

from __future__ import annotations

import bisect
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.memory.replay import ReplayBuffer
from engram.store import Store


def _batch(n: int, seed: int, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=gen), torch.randint(0, n_classes, (n,), generator=gen)


def _reference_slots(capacity: int, draws: list[tuple[int, float]]) -> list[int]:
    """The class-balanced rule on plain sorted lists (as engram picked before): the
    slot each offer took, -1 if it was not admitted."""
    seen, seen_per_key, size, key_slots, out = 0, {}, 0, {}, []
    for key, u in draws:
        seen += 1
        seen_per_key[key] = seen_per_key.get(key, 0) + 1
        if size < capacity:
            key_slots.setdefault(key, []).append(size)
            out.append(size)
            size += 1
            continue
        mine = len(key_slots.get(key, ()))
        if mine < capacity // len(seen_per_key):
            largest = max(key_slots, key=lambda k: (len(key_slots[k]), -k))
            victims = key_slots[largest]
            slot = victims.pop(min(int(u * len(victims)), len(victims) - 1))
            bisect.insort(key_slots.setdefault(key, []), slot)
            out.append(slot)
            continue
        j = int(u * seen_per_key[key])
        out.append(key_slots[key][j] if j < mine else -1)
    return out


def test_the_victims_are_those_the_rule_picked_before(tmp_path: Path) -> None:
    capacity, n_classes = 50, 7
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = ReplayBuffer(store, capacity, "class_balanced", seed=3)
        rng = torch.Generator().manual_seed(3)  # the buffer's admission stream
        draws, expected_slots = [], np.full(capacity, -1)
        for b in range(40):
            x, y = _batch(9, b, n_classes)
            x[:, 0] = torch.arange(b * 9, b * 9 + 9, dtype=torch.float32)  # item number
            u = torch.rand(9, dtype=torch.float64, generator=rng).tolist()
            draws += list(zip(y.tolist(), u, strict=True))
            buffer.add(x, y, experience=0)
        for item, slot in enumerate(_reference_slots(capacity, draws)):
            if slot >= 0:
                expected_slots[slot] = item
        stored = buffer.contents()["x"][:, 0].to(torch.int64).numpy()
        assert (stored == expected_slots).all()


def test_a_full_balanced_buffer_admits_without_copying_its_slot_lists(tmp_path: Path) -> None:
    """Before, a minibatch copied the slot list of each key it touched (O(capacity /
    keys) per minibatch); now it allocates what its own samples need."""
    capacity, n_classes = 200_000, 4
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = ReplayBuffer(store, capacity, "class_balanced", seed=0)
        x = torch.zeros(capacity, 2)
        y = torch.arange(capacity) % n_classes
        buffer.add(x, y, experience=0)  # full: 50,000 slots a key
        buffer.add(*_batch(32, 1, n_classes), experience=1)  # warm
        tracemalloc.start()
        try:
            buffer.add(*_batch(32, 2, n_classes), experience=1)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    one_list = 8 * capacity // n_classes  # a list of 50,000 slots: 400 KB of pointers
    assert peak < one_list / 4, f"admitting 32 samples allocated {peak} bytes"


class _FailingSamples:
    """The store's sample table, whose next append can be made to fail (a full disk)."""

    def __init__(self, table) -> None:
        self.table, self.fail = table, False

    def append(self, records):
        if self.fail:
            raise OSError(28, "No space left on device")
        return self.table.append(records)

    def read(self, ids, record_size):
        return self.table.read(ids, record_size)


@pytest.mark.parametrize("policy", ["class_balanced", "experience_balanced"])
def test_a_minibatch_that_cannot_be_written_changes_nothing(tmp_path: Path, policy: str) -> None:
    with Store.open(tmp_path / "s", mode="c") as store:
        samples = _FailingSamples(store.samples)
        buffer, twin = ReplayBuffer(samples, 30, policy), ReplayBuffer(store, 30, policy)
        for b in range(6):
            for each in (buffer, twin):
                each.add(*_batch(8, b, 5), experience=b)
        before = {k: list(v) for k, v in buffer.key_slots.items()}
        state = buffer.state_dict()
        samples.fail = True
        rng = buffer.admit_rng.get_state()
        with pytest.raises(OSError):
            buffer.add(*_batch(8, 99, 7), experience=9)  # new keys too
        assert {k: list(v) for k, v in buffer.key_slots.items()} == before
        assert buffer.size == state["slots"].numel() and buffer.seen == state["seen"]
        assert (buffer.slots[: buffer.size] == state["slots"].numpy()).all()
        samples.fail = False
        buffer.admit_rng.set_state(rng)  # the failed call drew; a retry draws the same
        for each in (buffer, twin):
            each.add(*_batch(8, 99, 7), experience=9)
        assert {k: list(v) for k, v in buffer.key_slots.items()} == {
            k: list(v) for k, v in twin.key_slots.items()
        }
        assert (buffer.slot_keys == twin.slot_keys).all()
