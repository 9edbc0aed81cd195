"""Pack files: where blob bytes live; LMDB holds the content-addressed index.

Why not the bytes in LMDB itself: LMDB copies every value into dirty pages it
allocates before writing them, and first-touch page faults are expensive on the VMs
we run on: 256 MiB as LMDB values wrote at 0.57x of a plain write+fsync, a pack file
at 1.0x (``benchmarks/lmdb_vs_packs.py``, docs/benchmarks.md). A pack is written
straight from tensor memory with one fsync, and read back through mmap as zero-copy
as an LMDB value.

A pack is ``blobs/pack-<id>.bin``: blobs concatenated, each starting at a multiple
of :data:`ALIGN`. It is only referenced once the LMDB transaction publishing its
index entries commits; a pack left by an interrupted commit is an orphan that
``gc`` removes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from engram.errors import CorruptionError
from engram.store.files import create_new, open_read
from engram.store.writeback import Writeback

ALIGN = 64
PACK_NAME = re.compile(r"pack-(\d{8,18})\.bin")
_ENTRY = struct.Struct("<QQQQ")  # pack id, offset, nbytes, xxh3
PLAIN_ENTRY_SIZE = _ENTRY.size  # the index entry of a plain blob (format 1)


def pack_name(pack_id: int) -> str:
    return f"pack-{pack_id:08d}.bin"


@dataclass(frozen=True)
class BlobLocation:
    """Where a blob's bytes are, as recorded in the LMDB index (32 bytes)."""

    pack: int
    offset: int
    nbytes: int
    xxh3: int

    def encode(self) -> bytes:
        return _ENTRY.pack(self.pack, self.offset, self.nbytes, self.xxh3)

    @classmethod
    def decode(cls, raw: bytes | memoryview, digest: str) -> BlobLocation:
        if len(raw) != _ENTRY.size:
            raise CorruptionError(f"index entry of blob {digest[:12]} is malformed")
        return cls(*_ENTRY.unpack(raw))


class PackWriter:
    """Appends blobs to a new pack file; nothing is visible until :meth:`finish`."""

    def __init__(self, directory: Path, pack_id: int) -> None:
        self.pack_id = pack_id
        self.path = directory / pack_name(pack_id)
        # An orphan with this id from an interrupted commit is replaced (never written
        # through, should the name be a link).
        self._fd = create_new(self.path)
        self.size = 0
        self._writeback = Writeback(self._fd)  # the disk starts while later blobs come

    def append(self, data: memoryview | bytes, xxh3: int) -> BlobLocation:
        pad = -self.size % ALIGN
        if pad:
            self._write_all(b"\0" * pad)
        location = BlobLocation(self.pack_id, self.size, len(data), xxh3)
        self._write_all(data)
        self._writeback.wrote(self.size)
        return location

    def _write_all(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
            self.size += written

    def finish(self) -> None:
        """fsync the pack; the caller fsyncs the directory."""
        try:
            os.fsync(self._fd)
        finally:
            self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class NewPack:
    """The pack file of one write, created on its first append (none if nothing is new).

    Used as a context: on success the pack is finished (fsynced; the caller fsyncs the
    directory), on an error it is removed.
    """

    def __init__(self, directory: Path, pack_id: int) -> None:
        self.directory = directory
        self.pack_id = pack_id
        self.writer: PackWriter | None = None

    @property
    def written(self) -> bool:
        return self.writer is not None

    def append(self, data: memoryview | bytes, xxh3: int) -> BlobLocation:
        if self.writer is None:
            self.writer = PackWriter(self.directory, self.pack_id)
        return self.writer.append(data, xxh3)

    def __enter__(self) -> NewPack:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self.writer is None:
            return
        if exc_type is not None:
            self.writer.abort()
            return
        try:
            self.writer.finish()
        except BaseException:
            self.writer.abort()
            raise


class MappedFiles:
    """Read-only mmaps of the files of one directory, opened on first use and kept
    until forgotten (pack files here; checkpoint files serving blobs in blobs.py)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._maps: dict[str, mmap.mmap | bytes] = {}

    def get(self, name: str) -> mmap.mmap | bytes:
        """The bytes of ``directory/name``.

        Raises:
            FileNotFoundError: there is no such file.
        """
        data = self._maps.get(name)
        if data is None:
            with open_read(self.directory / name) as f:  # never a link or a FIFO
                # mmap refuses an empty file
                empty = os.fstat(f.fileno()).st_size == 0
                data = b"" if empty else mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[name] = data
        return data

    def forget(self, name: str) -> None:
        """Drop a cached map (after the file was removed or rewritten)."""
        data = self._maps.pop(name, None)
        if isinstance(data, mmap.mmap):
            # BufferError: a view still exports this map; it is unmapped when that view dies.
            with contextlib.suppress(BufferError):
                data.close()

    def close(self) -> None:
        for name in list(self._maps):
            self.forget(name)


class PackReader:
    """Read-only mmaps of pack files, opened on first use and kept until :meth:`close`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files = MappedFiles(directory)

    def view(self, location: BlobLocation, digest: str) -> memoryview:
        """Zero-copy view of a blob's bytes.

        Raises:
            CorruptionError: the pack is missing or shorter than the index says.
        """
        name = pack_name(location.pack)
        try:
            data = self._files.get(name)
        except FileNotFoundError:
            raise CorruptionError(f"pack file {self.directory / name} is missing") from None
        end = location.offset + location.nbytes
        if end > len(data):
            raise CorruptionError(
                f"blob {digest[:12]} lies past the end of {name} (the pack file is truncated)"
            )
        return memoryview(data)[location.offset : end]

    def forget(self, pack_id: int) -> None:
        """Drop a cached map (after gc removed or rewrote the pack)."""
        self._files.forget(pack_name(pack_id))

    def close(self) -> None:
        self._files.close()
