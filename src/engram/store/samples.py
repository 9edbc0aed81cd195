"""Replay samples: small records written once, keyed by a store-wide sample id.

A replay buffer's bytes are not versioned state: each admitted sample is written
once, immediately, to the ``samples`` LMDB database under an id from a counter that
never goes back (not after a rollback, not after gc). A version references samples
through a :class:`SampleIds` tensor in its state (the buffer's slot table), so
committing a buffer costs its slot table, rolling back restores an older table whose
samples are still there, and ``gc`` deletes the samples no kept version references.

A record is raw bytes whose layout a buffer's schema gives (the store does not
interpret them): reading a minibatch is one LMDB read transaction and one
``b"".join`` of zero-copy values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import lmdb
import numpy as np

from engram.errors import CorruptionError
from engram.store import format as fmt
from engram.store.env import Env

if TYPE_CHECKING:
    import torch

_NEXT = b"next_sample"


def sample_key(sample_id: int) -> bytes:
    return int(sample_id).to_bytes(8, "big")


class SampleTable:
    """The ``samples`` database of a store (use it as ``store.samples``).

    Writes are buffered in memory (at most 32 MiB) until :meth:`flush`, or until
    ``Store.commit`` writes them in the transaction that publishes a version: a sample
    only has to be durable once a version references it, and sharing the commit's synced
    transaction costs far less than one transaction per minibatch (or per commit). Ids
    are reserved from the store's counter in blocks, so they stay unique across
    processes and crashes (an id reserved but never flushed is simply unused).
    """

    _BLOCK = 4096
    _MAX_PENDING_BYTES = 32 * 1024 * 1024  # memory bound: flush earlier than the commit

    def __init__(self, env: Env) -> None:
        self._env = env
        self._pending: dict[int, bytes] = {}
        self._pending_bytes = 0
        self._next = self._limit = 0  # the reserved, not yet used block [next, limit)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the records not yet written (they are written by the next flush)."""
        return self._pending_bytes

    def _reserve(self, n: int) -> int:
        if self._limit - self._next < n:
            block = max(n, self._BLOCK)

            def bump(txn: lmdb.Transaction) -> int:
                first = self._env.counter(txn, _NEXT, default=1)
                self._env.set_counter(txn, _NEXT, first + block)
                return first

            self._next = self._env.write(bump)
            self._limit = self._next + block
        first = self._next
        self._next += n
        return first

    def append(self, records: Sequence[bytes | memoryview]) -> list[int]:
        """Add records; returns their new ids (consecutive, never reused).

        They are readable at once and durable after the next :meth:`flush` (every
        commit flushes first).
        """
        records = [bytes(r) for r in records]
        if not records:
            return []
        first = self._reserve(len(records))
        ids = list(range(first, first + len(records)))
        self._pending.update(zip(ids, records, strict=True))
        self._pending_bytes += sum(len(r) for r in records)
        if self._pending_bytes > self._MAX_PENDING_BYTES:
            self.flush()
        return ids

    def flush(self) -> int:
        """Write pending records in one transaction; returns how many."""
        items = self.pending_items()
        if not items:
            return 0
        self._env.write(
            lambda txn: self.put(txn, items),
            reserve=sum(len(r) for _, r in items) + 64 * len(items),
        )
        self.forget(items)
        return len(items)

    def pending_items(self) -> list[tuple[int, bytes]]:
        """The records not yet written, ``(id, record)`` by id: for :meth:`put`."""
        return sorted(self._pending.items())

    def put(self, txn: lmdb.Transaction, items: list[tuple[int, bytes]]) -> None:
        """Write ``items`` (from :meth:`pending_items`) inside the caller's ``txn``;
        once it committed, :meth:`forget` them. Safe to re-run in a retried ``txn``."""
        self._env.put_sorted(txn, fmt.DB_SAMPLES, ((sample_key(i), r) for i, r in items))

    def forget(self, items: list[tuple[int, bytes]]) -> None:
        """Drop written ``items`` from the pending records (they are in the database)."""
        for sample_id, record in items:
            if self._pending.pop(sample_id, None) is not None:
                self._pending_bytes -= len(record)

    def read(self, ids: Sequence[int] | torch.Tensor, record_size: int) -> np.ndarray:
        """The records of ``ids``, in order, as a ``(len(ids), record_size)`` uint8 array.

        Raises:
            CorruptionError: a sample is missing or has another size.
        """
        import torch  # only to read samples: keeps the inspection commands light

        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        pending = self._pending
        get = self._env.get
        with self._env.read() as txn:
            values = [
                pending[i] if i in pending else get(txn, fmt.DB_SAMPLES, sample_key(i)) for i in ids
            ]
            for sample_id, value in zip(ids, values, strict=True):
                if value is None or len(value) != record_size:
                    what = "missing" if value is None else f"{len(value)} bytes, not {record_size}"
                    where = self._env.path
                    raise CorruptionError(f"replay sample {sample_id} in {where} is {what}")
            joined = b"".join(values)  # the one copy out of the map
        return np.frombuffer(joined, dtype=np.uint8).reshape(len(ids), record_size)

    def read_records(self, ids: Sequence[int]) -> list[bytes]:
        """The records of ``ids`` as they are, whatever their sizes (a data-parallel
        resume sends each rank the samples its buffer shard references).

        Raises:
            CorruptionError: a sample is missing.
        """
        pending, get = self._pending, self._env.get
        out = []
        with self._env.read() as txn:
            for i in ids:
                value = pending[i] if i in pending else get(txn, fmt.DB_SAMPLES, sample_key(i))
                if value is None:
                    raise CorruptionError(f"replay sample {i} in {self._env.path} is missing")
                out.append(bytes(value))
        return out

    def __len__(self) -> int:
        with self._env.read() as txn:
            return self._env.count(txn, fmt.DB_SAMPLES) + len(self._pending)

    def sweep(self, txn: lmdb.Transaction, live: set[int]) -> int:
        """Inside ``txn``, delete every sample whose id is not in ``live``; returns how many."""
        keys = self._env.keys(txn, fmt.DB_SAMPLES)
        dead = [key for key in keys if int.from_bytes(key, "big") not in live]
        for key in dead:
            self._env.delete(txn, fmt.DB_SAMPLES, key)
        return len(dead)


__all__ = ["SampleTable", "sample_key"]
