"""Sealed LMDB records: every value engram writes to LMDB carries its own checksum.

LMDB checks nothing: a flipped bit in a page is returned as data. Tensor chunks and
checkpoint files have content hashes, but manifests, refs, counters, blob-index entries
and replay samples had none (format 1 and 2). From format 3 on, each value is

    payload || XXH3-64(database name || 0x00 || key || payload)   (8 bytes, little-endian)

so a damaged value — or a value moved under another key or into another database — is
reported (:class:`~engram.errors.CorruptionError` naming the database and key), never
used. Reading strips the seal without copying (a memoryview of the payload).
"""

from __future__ import annotations

import xxhash

from engram.errors import CorruptionError

SEAL_BYTES = 8


def _digest(db: bytes, key: bytes, payload: bytes | memoryview) -> bytes:
    h = xxhash.xxh3_64()
    h.update(db)
    h.update(b"\0")
    h.update(key)
    h.update(payload)
    return h.intdigest().to_bytes(SEAL_BYTES, "little")


def seal(db: bytes, key: bytes, payload: bytes | memoryview) -> bytes:
    """The value to store for ``payload`` under ``key`` in database ``db``."""
    return bytes(payload) + _digest(db, key, payload)


def unseal(db: bytes, key: bytes, value: bytes | memoryview) -> memoryview:
    """The payload of a sealed value; raises CorruptionError if the seal does not match."""
    view = memoryview(value)
    if len(view) < SEAL_BYTES:
        raise CorruptionError(f"{_where(db, key)}: record is shorter than its checksum")
    payload, stored = view[:-SEAL_BYTES], view[-SEAL_BYTES:]
    if _digest(db, key, payload) != stored:
        raise CorruptionError(f"{_where(db, key)}: record fails its checksum")
    return payload


def _where(db: bytes, key: bytes) -> str:
    name = db.decode("ascii", "replace")
    if name in ("versions", "samples") and len(key) == 8:
        number = int.from_bytes(key, "big")
        shown = f"v{number:04d}" if name == "versions" else f"sample {number}"
    elif all(32 < b < 127 for b in key):
        shown = key.decode("ascii")
    else:
        shown = key.hex()[:24]
    return f"LMDB record {name}/{shown}"
