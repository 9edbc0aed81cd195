"""A replay buffer whose samples live in the store's LMDB, written once each.

Works without Avalanche::

    with Store.open("runs/er", mode="c") as store:
        buffer = ReplayBuffer(store, capacity=2000, policy="reservoir", seed=0)
        buffer.add(x, y, experience=0)            # admits some of the minibatch
        batch = buffer.sample(128)                 # {"x", "y", "task", "experience"}
        store.commit({"replay": buffer.state_dict()})

Only the buffer's small state is versioned: policy, capacity, counters, RNG states and
the slot table (the sample id in each slot, a :class:`~engram.store.SampleIds`).
Samples keep their own dtype (uint8 images stay uint8). A resumed buffer continues
the same random streams: it is never re-seeded on load.

Policies:

* ``"reservoir"`` — Algorithm R over the whole stream: after N offers, every item is
  in the buffer with probability capacity / N.
* ``"class_balanced"`` / ``"experience_balanced"`` — the capacity is shared equally
  among the classes (experiences) seen so far: an item of an under-represented key
  evicts a random item of the largest key; otherwise it enters by reservoir sampling
  within its own key.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from sortedcontainers import SortedList

from engram.errors import EngramError
from engram.store import SampleIds, Store
from engram.store.codec import TORCH_DTYPES, dtype_name

Policy = Literal["reservoir", "class_balanced", "experience_balanced"]
#: How :meth:`ReplayBuffer.sample` draws: independent uniform picks, or passes through
#: the buffer in a fresh random order each (as Avalanche's replay loaders cycle).
Draw = Literal["with_replacement", "without_replacement"]
DRAWS = ("with_replacement", "without_replacement")
_HEADER = 24  # target, task, experience: three little-endian int64
_MIRROR_BYTES = 64 << 20  # a buffer whose records fit is also kept in memory, for sampling


def _finite_rows(t: torch.Tensor) -> torch.Tensor:
    """(B,) whether each row of ``t`` is finite (integer tensors always are)."""
    if not t.is_floating_point():
        return torch.ones(len(t), dtype=torch.bool)
    return torch.isfinite(t.reshape(len(t), -1)).all(dim=1)


class ReplayBufferError(EngramError, ValueError):
    """A sample does not fit the buffer (shape or dtype), or a bad argument."""


class ReplayBuffer:
    """Fixed-capacity replay memory backed by a store (see the module docstring)."""

    def __init__(
        self,
        store: Store | Any,
        capacity: int,
        policy: Policy = "reservoir",
        seed: int = 0,
        draw: Draw = "with_replacement",
    ):
        if capacity < 1:
            raise ReplayBufferError("capacity must be >= 1")
        if policy not in ("reservoir", "class_balanced", "experience_balanced"):
            raise ReplayBufferError(f"unknown policy {policy!r}")
        if draw not in DRAWS:
            raise ReplayBufferError(f"draw must be one of {', '.join(DRAWS)}, not {draw!r}")
        self.draw = draw
        # without_replacement: the slots still to draw in this pass (a permutation of
        # range(_order_size) consumed from the front); a new pass once it is used up or
        # the buffer's size changed
        self._order = np.zeros(0, dtype=np.int64)
        self._order_size = 0
        # where the samples are written: the store's table, or (a data-parallel rank
        # without the store) anything with the same append/read
        self.samples = store.samples if isinstance(store, Store) else store
        self.capacity = capacity
        self.policy = policy
        self.seed = seed
        self.seen = 0
        self.seen_per_key: dict[int, int] = {}
        self.size = 0
        self.slots = np.full(capacity, -1, dtype=np.int64)  # sample id per slot
        self.slot_keys = np.full(capacity, -1, dtype=np.int64)  # class/experience per slot
        # balanced policies: each key's slots, sorted (a victim is picked by its rank)
        self.key_slots: dict[int, SortedList] = {}
        self.schema: dict[str, Any] | None = None
        self.admit_rng = torch.Generator().manual_seed(seed)
        self.sample_rng = torch.Generator().manual_seed(seed + 1)
        # An in-memory copy of the buffered records, by slot (not state: the store's are
        # the records; this saves a read per sampled minibatch), when it fits _MIRROR_BYTES.
        self._mirror: np.ndarray | None = None
        self._mirrored = np.zeros(capacity, dtype=bool)

    def hparams(self) -> dict[str, Any]:
        out = {"capacity": self.capacity, "policy": self.policy, "seed": self.seed}
        if self.draw != "with_replacement":  # stores written before draw existed: unchanged
            out["draw"] = self.draw
        return out

    def __len__(self) -> int:
        return self.size

    # ------------------------------------------------------------- admission

    def add(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        experience: int,
        task: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
    ) -> int:
        """Offer a minibatch; returns how many of its items entered the buffer.

        Items whose inputs or logits are not finite (the outputs of a minibatch that
        ``training.nonfinite=skip`` skipped) are not offered: nothing diverged enters
        the memory a later version commits (engram.training.guard).

        Raises:
            ReplayBufferError: shapes or dtypes differ from the buffer's (nothing changes).
        """
        x, y = x.detach().cpu(), y.detach().cpu()
        task = torch.zeros(len(x), dtype=torch.int64) if task is None else task.detach().cpu()
        logits = None if logits is None else logits.detach().cpu()
        schema = self._check(x, y, task, logits)
        finite = _finite_rows(x) & (_finite_rows(logits) if logits is not None else True)
        if not bool(finite.all()):
            x, y, task = x[finite], y[finite], task[finite]
            logits = None if logits is None else logits[finite]
        n = len(x)
        keys = (y if self.policy == "class_balanced" else torch.full((n,), experience)).tolist()
        draws = torch.rand(n, dtype=torch.float64, generator=self.admit_rng).tolist()
        # 1. decide every item's slot (a later item of the batch may take the slot an
        #    earlier one just got: that one is never written); the balanced policies'
        #    slot lists change in place and are put back if the samples cannot be written.
        plan = _Admission(self)
        try:
            for item, (key, u) in enumerate(zip(keys, draws, strict=True)):
                plan.offer(item, key, u)
            order = sorted(plan.decisions.items(), key=lambda kv: kv[1][0])
            rows = self._records(x, y, task, logits, experience, [i for _, (i, _) in order])
            ids = self.samples.append([row.tobytes() for row in rows])
        except BaseException:
            plan.undo()
            raise
        # 2. adopt the plan
        self.schema = schema
        mirror = self._mirror_array()
        for (slot, (_, key)), sample_id, row in zip(order, ids, rows, strict=True):
            self.slots[slot] = sample_id
            self.slot_keys[slot] = key
            if mirror is not None:
                mirror[slot] = row
                self._mirrored[slot] = True
        self.size, self.seen, self.seen_per_key = plan.size, plan.seen, plan.seen_per_key
        return len(order)

    def _check(self, x, y, task, logits) -> dict[str, Any]:
        n = len(x)
        if y.shape != (n,) or task.shape != (n,):
            raise ReplayBufferError(f"y and task must have shape ({n},), not {tuple(y.shape)}")
        if logits is not None and len(logits) != n:
            raise ReplayBufferError("logits must have one row per sample")
        schema = {
            "x_dtype": dtype_name(x.dtype),
            "x_shape": list(x.shape[1:]),
            "logits_dtype": None if logits is None else dtype_name(logits.dtype),
            "logits_shape": None if logits is None else list(logits.shape[1:]),
        }
        if self.schema is not None and schema != self.schema:
            diff = [
                f"{k} {schema[k]} (buffer: {self.schema[k]})"
                for k in schema
                if schema[k] != self.schema[k]
            ]
            raise ReplayBufferError("sample does not fit the replay buffer: " + ", ".join(diff))
        return schema

    @staticmethod
    def _records(x, y, task, logits, experience: int, items: list[int]) -> np.ndarray:
        """The records of ``items``, one row each: header (y, task, experience as
        little-endian int64), then the raw bytes of x and of the logits."""
        index = torch.tensor(items, dtype=torch.int64)
        header = np.empty((len(items), 3), dtype="<i8")
        header[:, 0] = y[index].to(torch.int64).numpy()
        header[:, 1] = task[index].to(torch.int64).numpy()
        header[:, 2] = experience
        parts = [header.view(np.uint8), _raw(x[index])]
        if logits is not None:
            parts.append(_raw(logits[index]))
        return np.concatenate(parts, axis=1)

    def _record_size(self) -> int:
        schema = self.schema
        x_bytes = _nbytes(schema["x_dtype"], schema["x_shape"])
        if schema["logits_dtype"] is None:
            return _HEADER + x_bytes
        return _HEADER + x_bytes + _nbytes(schema["logits_dtype"], schema["logits_shape"])

    def _mirror_array(self) -> np.ndarray | None:
        if self._mirror is None and self.schema is not None:
            size = self._record_size()
            if self.capacity * size <= _MIRROR_BYTES:
                self._mirror = np.zeros((self.capacity, size), dtype=np.uint8)
        return self._mirror

    # -------------------------------------------------------------- sampling

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        """A minibatch drawn with the buffer's own RNG: uniformly with replacement, or
        (``draw="without_replacement"``) the next ``batch_size`` slots of a random pass
        through the buffer, a new pass starting where one ends."""
        if not self.size:
            raise ReplayBufferError("the replay buffer is empty")
        if self.draw == "with_replacement":
            picks = torch.randint(self.size, (batch_size,), generator=self.sample_rng).numpy()
        else:
            picks = self._next_in_order(batch_size)
        mirror = self._mirror_array()
        if mirror is None:
            return self.read(self.slots[picks].tolist())
        missing = np.unique(picks[~self._mirrored[picks]])
        if len(missing):  # e.g. after load_state_dict: read once from the store
            mirror[missing] = self.samples.read(self.slots[missing].tolist(), self._record_size())
            self._mirrored[missing] = True
        return self._parse(mirror[picks])

    def _next_in_order(self, n: int) -> np.ndarray:
        if self._order_size != self.size:
            self._order = np.zeros(0, dtype=np.int64)  # admitted since: start a new pass
            self._order_size = self.size
        parts, wanted = [], n
        while wanted:
            if not len(self._order):
                self._order = torch.randperm(self.size, generator=self.sample_rng).numpy()
            take = self._order[:wanted]
            self._order = self._order[wanted:]
            parts.append(take)
            wanted -= len(take)
        return np.concatenate(parts)

    def read(self, sample_ids: list[int]) -> dict[str, torch.Tensor]:
        """Records by sample id, stacked: x, y, task, experience (and logits)."""
        return self._parse(self.samples.read(sample_ids, self._record_size()))

    def _parse(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Records ``(B, record size)`` as tensors: x, y, task, experience (and logits)."""
        schema = self.schema
        x_dtype = TORCH_DTYPES[schema["x_dtype"]]
        x_bytes = _nbytes(schema["x_dtype"], schema["x_shape"])
        l_bytes = rows.shape[1] - _HEADER - x_bytes
        if l_bytes:
            l_dtype = TORCH_DTYPES[schema["logits_dtype"]]
        b = len(rows)
        header = torch.from_numpy(rows[:, :_HEADER].copy()).view(torch.int64)  # (B, 3)
        x = torch.from_numpy(rows[:, _HEADER : _HEADER + x_bytes].copy())
        out = {
            "x": x.view(x_dtype).reshape(b, *schema["x_shape"]),
            "y": header[:, 0].clone(),
            "task": header[:, 1].clone(),
            "experience": header[:, 2].clone(),
        }
        if l_bytes:
            logits = torch.from_numpy(rows[:, _HEADER + x_bytes :].copy())
            out["logits"] = logits.view(l_dtype).reshape(b, *schema["logits_shape"])
        return out

    def contents(self) -> dict[str, torch.Tensor]:
        """Every buffered sample, in slot order."""
        return self.read(self.slots[: self.size].tolist()) if self.size else {}

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "hparams": self.hparams(),
            "seen": self.seen,
            "seen_per_key": {str(k): v for k, v in self.seen_per_key.items()},
            "slots": SampleIds.of(torch.from_numpy(self.slots[: self.size].copy())),
            "slot_keys": torch.from_numpy(self.slot_keys[: self.size].copy()),
            "schema": self.schema,
            "admit_rng": self.admit_rng.get_state(),
            "sample_rng": self.sample_rng.get_state(),
            **self._order_state(),
        }

    def _order_state(self) -> dict[str, Any]:
        if self.draw == "with_replacement":
            return {}
        return {"order": torch.from_numpy(self._order.copy()), "order_size": self._order_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["hparams"] != self.hparams():
            raise ReplayBufferError(
                f"stored replay buffer has {state['hparams']}, this one {self.hparams()}"
            )
        self.seen = state["seen"]
        self.seen_per_key = {int(k): v for k, v in state["seen_per_key"].items()}
        slots, keys = state["slots"].numpy(), state["slot_keys"].numpy()
        self.size = len(slots)
        self.slots[:] = -1
        self.slot_keys[:] = -1
        self.slots[: self.size] = slots
        self.slot_keys[: self.size] = keys
        self.key_slots = {}
        if self.policy != "reservoir" and len(keys):
            order = np.argsort(keys, kind="stable")  # by key, each key's slots ascending
            starts = np.flatnonzero(np.diff(keys[order], prepend=keys[order][0] - 1))
            for part in np.split(order, starts[1:]):
                self.key_slots[int(keys[part[0]])] = SortedList(part.tolist())
        self.schema = state["schema"]
        self._mirror = None
        self._mirrored[:] = False
        self.admit_rng.set_state(state["admit_rng"])
        self.sample_rng.set_state(state["sample_rng"])
        if "order" in state:  # a shard dealt anew (repartition) has none: a new pass
            self._order = state["order"].numpy().astype(np.int64, copy=True)
            self._order_size = int(state["order_size"])
        else:
            self._order, self._order_size = np.zeros(0, dtype=np.int64), 0


class _Admission:
    """One minibatch's admission decisions. The counters are copies; the balanced
    policies' slot lists are the buffer's own, changed in place with an undo log (a
    copy of a key's list per minibatch cost O(capacity / keys): 0.8 ms a sample at a
    million slots), put back by :meth:`undo`."""

    def __init__(self, buffer: ReplayBuffer) -> None:
        self.buffer = buffer
        self.size = buffer.size
        self.seen = buffer.seen
        self.seen_per_key = dict(buffer.seen_per_key)
        self.decisions: dict[int, tuple[int, int]] = {}  # slot -> (item, key)
        self._log: list[tuple[int, int, bool]] = []  # (key, slot, added), oldest first
        self._created: list[int] = []  # keys this minibatch gave a slot list

    def slots_of(self, key: int) -> SortedList:
        slots = self.buffer.key_slots.get(key)
        if slots is None:
            slots = self.buffer.key_slots[key] = SortedList()
            self._created.append(key)
        return slots

    def count(self, key: int) -> int:
        return len(self.buffer.key_slots.get(key, ()))

    def _add(self, key: int, slot: int) -> None:
        self.slots_of(key).add(slot)
        self._log.append((key, slot, True))

    def _pop(self, key: int, rank: int) -> int:
        slot = self.slots_of(key).pop(rank)
        self._log.append((key, slot, False))
        return slot

    def undo(self) -> None:
        """Put the buffer's slot lists back as they were before this minibatch."""
        lists = self.buffer.key_slots
        for key, slot, added in reversed(self._log):
            if added:
                lists[key].remove(slot)
            else:
                lists[key].add(slot)
        for key in self._created:
            del lists[key]
        self._log, self._created = [], []

    def offer(self, item: int, key: int, u: float) -> None:
        capacity, balanced = self.buffer.capacity, self.buffer.policy != "reservoir"
        self.seen += 1
        self.seen_per_key[key] = self.seen_per_key.get(key, 0) + 1
        if self.size < capacity:
            slot = self.size
            self.size += 1
            if balanced:
                self._add(key, slot)
        elif not balanced:
            j = int(u * self.seen)  # Algorithm R: uniform in [0, seen - 1]
            if j >= capacity:
                return
            slot = j
        else:
            slot = self._balanced_slot(key, u)
            if slot is None:
                return
        self.decisions[slot] = (item, key)

    def _balanced_slot(self, key: int, u: float) -> int | None:
        mine = self.count(key)
        if mine < self.buffer.capacity // len(self.seen_per_key):
            largest = max(self.buffer.key_slots, key=lambda k: (self.count(k), -k))
            victims = self.count(largest)
            slot = self._pop(largest, min(int(u * victims), victims - 1))
            # Each key's slots stay sorted: the order is then a function of the slot
            # table alone, as rebuilt by load_state_dict, and a resumed run picks the
            # same victims.
            self._add(key, slot)
            return slot
        j = int(u * self.seen_per_key[key])  # reservoir sampling within this key
        return self.slots_of(key)[j] if j < mine else None


def _raw(t: torch.Tensor) -> np.ndarray:
    """A ``(B, ...)`` tensor's rows as raw bytes, ``(B, nbytes per row)`` uint8."""
    row = t[0].numel() * t.element_size() if len(t) else 0
    return t.contiguous().view(torch.uint8).reshape(len(t), row).numpy()


def _nbytes(dtype: str, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * TORCH_DTYPES[dtype].itemsize
