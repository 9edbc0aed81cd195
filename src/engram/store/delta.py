"""Compacted history: blob index entries that are delta-coded or served from a checkpoint.

A blob (a chunk of a tensor, named by the SHA-256 of its bytes) is stored in one of
three ways; its LMDB index entry says which (layout in :mod:`engram.store.format`):

* **plain** — its bytes in a pack file (the 32-byte entry of format version 1);
* **encoded** — in a pack file as a zstd frame of its bytes transformed against a
  *base* blob (another digest, typically the same tensor of the next version towards
  HEAD) or, for a *keyframe*, against nothing;
* **file** — a span of a checkpoint file that some version still names as its plain
  safetensors file (so a delta's base can be HEAD's weights without copying them).

The transform of an encoded blob, for element size ``k`` (1, 2, 4 or 8 bytes):

1. ``d = target - base`` elementwise as unsigned ``k``-byte integers (wrapping), then
   zigzag ``z = (d << 1) ^ (d >> (8k - 1))`` on the signed view: an SGD step moves a
   float32 by a few units of its last place, so ``z`` is a small integer whose high
   bytes are zero (sign, exponent and upper mantissa are unchanged). A keyframe skips
   this step (``z = target``).
2. Byte shuffle: the ``k`` bytes of every element are grouped by significance (all
   first bytes, then all second bytes, ...), so the mostly-zero planes form long runs.
3. zstd at level 1.

Decoding inverts each step exactly (integer arithmetic modulo ``2**(8k)``), so every
bit pattern — NaN payloads, -0.0, denormals — comes back as it went in.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import zstandard

from engram.errors import CorruptionError
from engram.store.format import CHUNK_BYTES
from engram.store.packs import _ENTRY, BlobLocation

# Restoring a version decodes at most this many deltas per chunk: a longer chain is cut
# by a keyframe, so restoring any version costs O(MAX_CHAIN) decodes, never O(history).
MAX_CHAIN = 16
# An encoding is kept only if it saves at least 1/8 of the bytes: below that the
# decode work on every restore is not worth the disk.
MIN_SAVING = 1 / 8
ZSTD_LEVEL = 1  # on SGD deltas, level 1 is both smaller and ~2x faster than level 3

CODEC_ZSTD = 1
_KIND_ENCODED = b"D"
_KIND_FILE = b"F"
# kind, codec, itemsize, has_base, pack, offset, stored nbytes, stored xxh3, nbytes
_ENCODED = struct.Struct("<cBBBQQQQQ")
_FILE = struct.Struct("<cQQQ")  # kind, offset, nbytes, xxh3; then the file name (UTF-8)
_FILE_NAME = re.compile(r"model-v\d+(-exp\d+)?\.safetensors")
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


@dataclass(frozen=True)
class EncodedBlob:
    """A blob stored as a zstd frame in a pack, delta-coded against ``base`` (or not)."""

    codec: int
    itemsize: int
    base: bytes | None  # 32-byte SHA-256 digest of the base blob; None: a keyframe
    pack: int
    offset: int
    stored_nbytes: int
    stored_xxh3: int
    nbytes: int  # of the decoded blob

    @property
    def stored(self) -> BlobLocation:
        return BlobLocation(self.pack, self.offset, self.stored_nbytes, self.stored_xxh3)

    def moved(self, location: BlobLocation) -> EncodedBlob:
        return replace(self, pack=location.pack, offset=location.offset)

    def encode(self) -> bytes:
        head = _ENCODED.pack(
            _KIND_ENCODED,
            self.codec,
            self.itemsize,
            self.base is not None,
            self.pack,
            self.offset,
            self.stored_nbytes,
            self.stored_xxh3,
            self.nbytes,
        )
        return head + (self.base or b"")


@dataclass(frozen=True)
class FileBlob:
    """A blob served from a span of a checkpoint file that a version still names."""

    file: str
    offset: int
    nbytes: int
    xxh3: int

    def encode(self) -> bytes:
        return _FILE.pack(_KIND_FILE, self.offset, self.nbytes, self.xxh3) + self.file.encode()


IndexEntry = BlobLocation | EncodedBlob | FileBlob


def decode_entry(raw: bytes | memoryview, digest: str) -> IndexEntry:
    """Parse a blob index entry (any of the three kinds), validating every field.

    Raises:
        CorruptionError: the entry is malformed.
    """
    raw = bytes(raw)
    if len(raw) == _ENTRY.size:
        return BlobLocation.decode(raw, digest)
    bad = CorruptionError(f"index entry of blob {digest[:12]} is malformed")
    if raw[:1] == _KIND_ENCODED and len(raw) in (_ENCODED.size, _ENCODED.size + 32):
        _, codec, itemsize, has_base, *rest = _ENCODED.unpack_from(raw)
        base = raw[_ENCODED.size :] or None
        blob = EncodedBlob(codec, itemsize, base, *rest)
        if (
            codec != CODEC_ZSTD
            or itemsize not in _UINT
            or has_base != (base is not None)
            or blob.nbytes > CHUNK_BYTES  # bounds what decoding allocates
            or blob.nbytes % itemsize
        ):
            raise bad
        return blob
    if raw[:1] == _KIND_FILE and len(raw) > _FILE.size:
        _, offset, nbytes, xxh3 = _FILE.unpack_from(raw)
        try:
            file = raw[_FILE.size :].decode("ascii")
        except UnicodeDecodeError:
            raise bad from None
        # never a path: no traversal out of checkpoints/
        if not _FILE_NAME.fullmatch(file) or nbytes > CHUNK_BYTES:
            raise bad
        return FileBlob(file, offset, nbytes, xxh3)
    raise bad


def itemsize_for(element_size: int, nbytes: int) -> int:
    """The transform's element size for a chunk of elements of ``element_size`` bytes."""
    k = min(element_size, 8)  # complex128 is two float64s
    return k if k in _UINT and nbytes % k == 0 else 1


def encode(target: memoryview | bytes, base: memoryview | bytes | None, itemsize: int) -> bytes:
    """The zstd frame of ``target`` transformed against ``base`` (None: a keyframe)."""
    t = np.frombuffer(target, dtype=_UINT[itemsize])
    if base is not None:
        d = (t - np.frombuffer(base, dtype=_UINT[itemsize])).view(_INT[itemsize])
        t = ((d << 1) ^ (d >> (8 * itemsize - 1))).view(_UINT[itemsize])
    planes = t.view(np.uint8).reshape(-1, itemsize).T  # (itemsize, n): bytes by significance
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(np.ascontiguousarray(planes))


def decode(
    stored: memoryview | bytes,
    base: memoryview | bytes | None,
    itemsize: int,
    nbytes: int,
    what: str,
) -> memoryview:
    """Invert :func:`encode`; returns a byte view of a new buffer.

    Raises:
        CorruptionError: the frame does not decompress to ``nbytes`` bytes.
    """
    try:
        planes = zstandard.ZstdDecompressor().decompress(stored, max_output_size=nbytes)
    except zstandard.ZstdError as e:
        raise CorruptionError(f"{what}: encoded blob does not decompress ({e})") from None
    if len(planes) != nbytes or (base is not None and len(base) != nbytes):
        raise CorruptionError(f"{what}: encoded blob decodes to the wrong size")
    # Un-shuffle: element = plane[k-1] << 8(k-1) | ... | plane[0]; shifts of contiguous
    # planes run ~2.5x faster than a strided (itemsize, n) -> (n, itemsize) byte copy.
    plane = np.frombuffer(planes, np.uint8).reshape(itemsize, -1)
    z = plane[itemsize - 1].astype(_UINT[itemsize])
    for i in range(itemsize - 2, -1, -1):
        z <<= 8
        z |= plane[i]
    if base is not None:  # un-zigzag, then add the base (in place, wrapping)
        sign = z & 1
        np.negative(sign, out=sign)
        z >>= 1
        z ^= sign
        z += np.frombuffer(base, dtype=_UINT[itemsize])
    return z.view(np.uint8).data


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes are in a safetensors file."""

    name: str
    dtype: str  # the store's dtype name
    shape: tuple[int, ...]
    offset: int
    nbytes: int


# safetensors' dtype names → the store's (codec.TORCH_DTYPES); what torch writes.
_ST_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32",
    "I64": "int64", "U16": "uint16", "U32": "uint32", "U64": "uint64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def checkpoint_spans(path: Path) -> tuple[list[TensorSpan], dict[str, str]]:
    """The tensors of a safetensors file, in file order, and its ``__metadata__``.

    Raises:
        CorruptionError: the header is malformed or names a dtype the store lacks.
    """
    what = f"checkpoint {path.name}"
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CorruptionError(f"{what}: header longer than the file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CorruptionError(f"{what} is missing") from None
    except (struct.error, ValueError) as e:
        raise CorruptionError(f"{what}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CorruptionError(f"{what}: malformed safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    spans = []
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            span = TensorSpan(
                name, _ST_DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + n + begin, end - begin
            )
        except (KeyError, TypeError, ValueError):
            raise CorruptionError(f"{what}: cannot compact tensor {name!r}") from None
        if not 0 <= span.offset <= span.offset + span.nbytes <= size:
            raise CorruptionError(f"{what}: tensor {name!r} lies outside the file")
        spans.append(span)
    spans.sort(key=lambda s: s.offset)  # the order safetensors' load_file returns
    return spans, metadata


class FileReader:
    """Read-only mmaps of checkpoint files serving :class:`FileBlob` entries."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._maps: dict[str, mmap.mmap | bytes] = {}

    def view(self, entry: FileBlob, digest: str) -> memoryview:
        data = self._maps.get(entry.file)
        if data is None:
            try:
                with open(self.directory / entry.file, "rb") as f:
                    data = (
                        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                        if os.fstat(f.fileno()).st_size
                        else b""
                    )
            except FileNotFoundError:
                raise CorruptionError(
                    f"blob {digest[:12]} lies in checkpoint {entry.file}, which is missing"
                ) from None
            self._maps[entry.file] = data
        end = entry.offset + entry.nbytes
        if end > len(data):
            raise CorruptionError(f"blob {digest[:12]} lies past the end of {entry.file}")
        return memoryview(data)[entry.offset : end]

    def forget(self, file: str) -> None:
        data = self._maps.pop(file, None)
        if isinstance(data, mmap.mmap):
            # BufferError: a view still exports it; it is unmapped when that view dies.
            with contextlib.suppress(BufferError):
                data.close()

    def close(self) -> None:
        for file in list(self._maps):
            self.forget(file)


def compaction_order(
    parents: dict[int, int | None], roots: list[int]
) -> list[tuple[int, int | None]]:
    """Each version with its *base*: its neighbour on the tree path towards the nearest root.

    History is a tree (parent links); ``roots`` (HEAD first) anchor it. Walking
    outwards from HEAD, a version's base is the version it was reached from: the child
    towards HEAD for HEAD's ancestors, the parent for versions on other branches. A
    version cut off from HEAD (its parent dropped by gc) hangs off the newest version
    of its own part of the tree, whose base is None. Bases come before the versions
    coded against them.
    """
    neighbours: dict[int, list[int]] = {v: [] for v in parents}
    for v, p in parents.items():
        if p is not None and p in neighbours:
            neighbours[v].append(p)
            neighbours[p].append(v)
    order: list[tuple[int, int | None]] = []
    seen: set[int] = set()
    for root in [*roots, *sorted(parents, reverse=True)]:
        if root in seen or root not in parents:
            continue
        seen.add(root)
        order.append((root, None))
        frontier = [root]
        while frontier:
            nxt = []
            for v in frontier:
                for w in sorted(neighbours[v], reverse=True):
                    if w not in seen:
                        seen.add(w)
                        order.append((w, v))
                        nxt.append(w)
            frontier = nxt
    return order
