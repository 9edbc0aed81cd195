"""The records a version references outside its own chunks, by kind: the registry.

A state array of a *reference kind* holds the ids of records kept in another LMDB
database, which the version needs as much as its own chunks. Every consumer asks this
registry rather than testing a tag: gc keeps what a kept version references, verify
checks it is there and sealed, push uploads it with the version, pull places it,
``engram ls/show/du/diff`` show it. A new kind of referenced record is one
registration here — its array tag, its database, what it is called — and the readers
and writers follow.

One kind is registered: a replay buffer's slot table (``__samples__``), the ids of the
sample records in the ``samples`` database (:mod:`engram.store.samples`). What stays
that kind's own: the sweep that deletes its unreferenced records and the counter its
ids come from (``SampleTable.sweep``, ``next_sample``, the gc fence); a second kind
would bring its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import lmdb

from engram.store import format as fmt
from engram.store.codec import TAG_SAMPLES, ArrayRecord


@dataclass(frozen=True)
class ReferenceKind:
    """An array tag whose values (1-d int64) are ids of records in ``database``."""

    tag: str  # the array record's tag in a manifest (engram.store.codec)
    database: bytes  # the LMDB database of the records it names
    noun: str  # what messages call one of those records ("replay sample")
    component: str  # its component in ``engram du``

    @staticmethod
    def key(record_id: int) -> bytes:
        """The LMDB key of record ``record_id`` (every kind's ids: big-endian uint64)."""
        return int(record_id).to_bytes(8, "big")


_KINDS: dict[str, ReferenceKind] = {}


def register(kind: ReferenceKind) -> ReferenceKind:
    """Make ``kind`` known to every consumer (see the module)."""
    if kind.database not in fmt.ALL_DBS:
        raise ValueError(f"{kind.tag}: no database {kind.database!r} in the store format")
    _KINDS[kind.tag] = kind
    return kind


def kind_of(record: ArrayRecord) -> ReferenceKind | None:
    """The reference kind of an array record (None: plain data)."""
    return _KINDS.get(record.kind)


def kinds() -> tuple[ReferenceKind, ...]:
    return tuple(_KINDS.values())


def referencing(
    records: Iterable[tuple[str, ArrayRecord]],
) -> list[tuple[str, ArrayRecord, ReferenceKind]]:
    """The ``(path, record)`` pairs of a version that reference other records, with
    their kind."""
    out = []
    for path, record in records:
        kind = kind_of(record)
        if kind is not None:
            out.append((path, record, kind))
    return out


def referenced_ids(
    blobs: object, txn: lmdb.Transaction, record: ArrayRecord, vid: int, path: str
) -> list[int]:
    """The ids a reference array of version ``vid`` holds (its chunks read and checked)."""
    return blobs.sample_ids(txn, record, vid, path)  # type: ignore[attr-defined]


SAMPLES = register(ReferenceKind(TAG_SAMPLES, fmt.DB_SAMPLES, "replay sample", "samples"))
