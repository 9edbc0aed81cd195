"""LMDB's two meta pages, read with plain ``read`` calls before LMDB maps anything: the
truncation check every open runs (:func:`check_not_truncated`; a truncated ``data.mdb``
would be a SIGBUS once mapped). Below both :mod:`engram.store.env` (which opens) and
:mod:`engram.store.untrusted` (which verifies in a child).

The meta page layout (LMDB 0.9, ``mdb.c``, 64-bit builds; both meta pages share it):
a 16-byte page header (``mp_pgno`` u64, ``mp_pad`` u16, ``mp_flags`` u16 with
``P_META`` 0x08, 4 bytes of bounds), then ``MDB_meta``: ``mm_magic`` u32
(0xBEEFC0DE), ``mm_version`` u32 (1), ``mm_address`` u64, ``mm_mapsize`` u64,
``mm_dbs[2]`` (48 bytes each: ``md_pad`` u32, which in the free-page database's
record is the page size, ``md_flags`` u16, ``md_depth`` u16, five u64), ``mm_last_pg``
u64, ``mm_txnid`` u64. Meta page 0 is at offset 0, meta page 1 one page further.
Native byte order; engram stores are little-endian (x86-64, arm64).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.errors import CorruptionError
from engram.store import format as fmt
from engram.store.files import open_read

DATA_FILE = "data.mdb"

_MDB_MAGIC = 0xBEEFC0DE
_MDB_DATA_VERSION = 1
_P_META = 0x08
_PAGE_HEADER = struct.Struct("<QHH")  # mp_pgno, mp_pad, mp_flags
_META_HEAD = struct.Struct("<II")  # mm_magic, mm_version (right after the 16-byte header)
_PSIZE_AT = 16 + 24  # md_pad of mm_dbs[FREE_DBI]
_LAST_PG_AT = 16 + 24 + 2 * 48  # mm_last_pg, then mm_txnid
_META_BYTES = _LAST_PG_AT + 16


@dataclass(frozen=True)
class _Meta:
    page_size: int
    last_page: int
    txnid: int


def _read_meta(f: Any, offset: int) -> _Meta | None:
    """The meta page at ``offset``, or None if it is not a valid LMDB meta page."""
    f.seek(offset)
    raw = f.read(_META_BYTES)
    if len(raw) < _META_BYTES:
        return None
    _, _, flags = _PAGE_HEADER.unpack_from(raw, 0)
    magic, version = _META_HEAD.unpack_from(raw, 16)
    if not flags & _P_META or magic != _MDB_MAGIC or version != _MDB_DATA_VERSION:
        return None
    (page_size,) = struct.unpack_from("<I", raw, _PSIZE_AT)
    last_page, txnid = struct.unpack_from("<QQ", raw, _LAST_PG_AT)
    if not (512 <= page_size <= 1 << 16 and page_size & (page_size - 1) == 0):
        return None
    return _Meta(page_size, last_page, txnid)


def _has_data_files(store_root: Path) -> bool:
    for sub in (fmt.BLOB_DIR, fmt.CHECKPOINT_DIR):
        directory = store_root / sub
        if directory.is_dir() and any(p.is_file() for p in directory.iterdir()):
            return True
    return False


def _truncation(lmdb_dir: Path) -> str | None:
    """Why ``lmdb_dir``'s data.mdb cannot be what LMDB last committed (None: it can)."""
    truncated = f"store {lmdb_dir.parent} is truncated: {DATA_FILE}"
    restore = "restore it from a complete copy"
    try:
        with open_read(lmdb_dir / DATA_FILE) as f:  # a FIFO would block: refused
            size = os.fstat(f.fileno()).st_size
            first = _read_meta(f, 0)
            # LMDB finds meta page 1 with meta page 0's page size; if page 0 is damaged,
            # try the OS page size (what LMDB created the file with).
            second = _read_meta(f, first.page_size if first else os.sysconf("SC_PAGE_SIZE"))
    except FileNotFoundError:
        size = 0
    except OSError:  # unreadable: LMDB's own open reports it
        return None
    if size == 0:
        # LMDB starts an empty or missing file afresh: right for a store whose creation
        # was cut short, fatal for one whose packs and checkpoints it would orphan.
        if _has_data_files(lmdb_dir.parent):
            return f"{truncated} is empty or missing but the store has data files; {restore}"
        return None
    metas = [m for m in (first, second) if m is not None]
    if not metas and size < 2 * os.sysconf("SC_PAGE_SIZE"):
        return f"{truncated} has {size} bytes, less than LMDB's two meta pages; {restore}"
    if not metas:
        return f"store {lmdb_dir.parent} is corrupt: no valid LMDB meta page; {restore}"
    newest = max(metas, key=lambda m: m.txnid)
    needed = max(2, newest.last_page + 1) * newest.page_size
    if size < needed:
        return (
            f"{truncated} has {size} bytes, LMDB's last committed transaction needs {needed}; "
            f"{restore}"
        )
    return None


def check_not_truncated(lmdb_dir: Path) -> None:
    """Refuse a ``data.mdb`` shorter than its newest committed transaction needs.

    Reads only the two meta pages, with ``read`` (no mapping, no LMDB call), so it is
    safe on any file. A missing or empty ``data.mdb`` passes when the store has no
    pack or checkpoint file (LMDB then starts it afresh: a creation cut short).

    Raises:
        CorruptionError: the file is truncated, shorter than two pages, or has no
            valid meta page; the message says to restore a complete copy.
    """
    why = _truncation(lmdb_dir)
    if why is not None:
        # A writer in another process grows the file before it publishes the meta page
        # that needs it; a second look tells a race with its pwrite from a truncation.
        why = _truncation(lmdb_dir)
    if why is not None:
        raise CorruptionError(why)
