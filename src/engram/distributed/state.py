"""What each rank contributes to a version, and what it gets back on resume.

A version of a data-parallel run holds rank 0's whole state (as a single-process run's)
plus ``state["ranks"]``: one *part* per other rank, ``{"rng", "plugins"}`` — its RNG
streams and every plugin's state (a replay buffer's shard; importances, all-reduced,
are bit-identical on every rank and stored once by content address). The model,
optimizer, clock, cursor and metrics are replicated: rank 0's are the job's.

Ranks other than 0 have no store, so their replay samples live in
:class:`LocalSamples` until a commit sends the new ones to rank 0, which appends them
to the store's sample table and tells each rank the ids they got.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from engram.errors import CorruptionError
from engram.store.codec import SampleIds, plain


class LocalSamples:
    """A rank's replay samples in memory, with :class:`~engram.store.SampleTable`'s
    ``append``/``read``: ids of committed samples are the store's (positive); a new
    sample has a provisional negative id until a commit gives it a store id.

    It also remembers which of the rank's tensors rank 0 did not hold the same at a
    commit (:attr:`whole`, paths of the part): they are sent whole from then on, the
    others as digests (:func:`engram.distributed.sync.commit`).
    """

    def __init__(self) -> None:
        self.records: dict[int, bytes] = {}
        self.store_id: dict[int, int] = {}  # provisional id -> store id, once committed
        self.whole: set[str] = set()
        self._next = -1

    def append(self, records: Sequence[bytes | memoryview]) -> list[int]:
        ids = list(range(self._next, self._next - len(records), -1))
        self._next -= len(records)
        for i, record in zip(ids, records, strict=True):
            self.records[i] = bytes(record)
        return ids

    def read(self, ids: Sequence[int] | torch.Tensor, record_size: int) -> np.ndarray:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        values = []
        for i in ids:
            value = self.records.get(i)
            if value is None or len(value) != record_size:
                raise CorruptionError(f"replay sample {i} of this rank is missing")
            values.append(value)
        return np.frombuffer(b"".join(values), np.uint8).reshape(len(ids), record_size)

    def load(self, ids: Sequence[int], records: Sequence[bytes]) -> None:
        """The committed samples this rank's restored state references (store ids)."""
        self.records = dict(zip(ids, records, strict=True))
        self.store_id = {}

    def stage(self, part: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """``part`` with every id rank 0 knows translated to its store id, and the
        records of the samples rank 0 has not seen (their provisional ids kept).
        Samples no longer referenced (evicted) are forgotten."""
        new: dict[int, bytes] = {}
        live: set[int] = set()

        def translate(ids: torch.Tensor) -> torch.Tensor:
            values = ids.tolist()
            live.update(values)
            out = []  # one tensor built at the end: an item assignment costs ~2 us
            for i in values:
                if i < 0 and i in self.store_id:
                    i = self.store_id[i]
                elif i < 0:
                    new[i] = self.records[i]
                out.append(i)
            return torch.tensor(out, dtype=torch.int64)

        staged = map_sample_ids(part, translate)
        self.records = {i: r for i, r in self.records.items() if i in live}
        self.store_id = {i: s for i, s in self.store_id.items() if i in live}
        return staged, records_tree(list(new), list(new.values()))

    def committed(self, provisional: torch.Tensor, store_ids: torch.Tensor) -> None:
        """Rank 0 wrote the staged new samples under ``store_ids``."""
        self.store_id.update(zip(provisional.tolist(), store_ids.tolist(), strict=True))


def records_tree(ids: list[int], records: list[bytes]) -> dict[str, torch.Tensor]:
    """Variable-size records as three tensors: ids, sizes, concatenated bytes."""
    data = b"".join(records)
    return {
        "ids": torch.tensor(ids, dtype=torch.int64),
        "sizes": torch.tensor([len(r) for r in records], dtype=torch.int64),
        "bytes": torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
        else torch.zeros(0, dtype=torch.uint8),
    }  # fmt: skip


def split_records(tree: dict[str, torch.Tensor]) -> tuple[list[int], list[bytes]]:
    data = tree["bytes"].numpy().tobytes()
    out, at = [], 0
    for size in tree["sizes"].tolist():
        out.append(data[at : at + size])
        at += size
    return tree["ids"].tolist(), out


def map_sample_ids(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``tree`` with every :class:`SampleIds` leaf replaced by ``fn(ids)`` (as SampleIds);
    its dicts and lists are new ones."""
    if isinstance(tree, SampleIds):
        return SampleIds.of(fn(tree.as_subclass(torch.Tensor)))
    if isinstance(tree, dict):
        return {k: map_sample_ids(v, fn) for k, v in tree.items()}
    # a sequence of scalars holds no ids: not walked item by item (Python's RNG state is
    # a tuple of 625 ints, in every rank's part)
    if isinstance(tree, list | tuple) and plain(tree):
        return list(tree) if isinstance(tree, list) else tree
    if isinstance(tree, list):
        return [map_sample_ids(v, fn) for v in tree]
    if isinstance(tree, tuple):
        return tuple(map_sample_ids(v, fn) for v in tree)
    return tree


def sample_ids_in(tree: Any) -> list[int]:
    """Every sample id a tree references, sorted, once each."""
    found: set[int] = set()

    def collect(ids: torch.Tensor) -> torch.Tensor:
        found.update(ids.tolist())
        return ids

    map_sample_ids(tree, collect)
    return sorted(found)
