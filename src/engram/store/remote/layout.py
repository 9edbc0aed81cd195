"""What a remote holds, object by object, and how each is encoded and checked.

Under the remote's prefix (docs/remote.md)::

    store.json                    {"format": 1, "store_id": ...}   written create-only once
    objects/<sha[:2]>/<sha256>    content-addressed, immutable: pack files, checkpoint and
                                  artifact files, and one *segment* per version
    versions/vNNNN-<h>.json       a version's *marker*, immutable (``h``: the first 16 hex
                                  of the marker's SHA-256), written create-only
    HEAD                          {"version", "marker", "sha256"}: moved by compare-and-swap
    refs/tags/<name>              {"format", "tag", "seq", "target": a ref[, "deleted"]}: a
                                  tag, moved (or deleted: a tombstone) by compare-and-swap
                                  (``seq`` counts its moves)
    gc.json                       {"format", "generation", "running"}: the remote gc's fence,
                                  moved by compare-and-swap (:mod:`~engram.store.remote.gc`)

A marker names its segment and its parent's marker by SHA-256, and HEAD names its
marker by SHA-256: from HEAD every byte a reader uses is checked against a hash written
before it (a Merkle chain), so a damaged or swapped object is refused, never used.

A *segment* holds a version's new LMDB records (its manifest, the index entries of the
blobs it adds, the replay samples it adds) and the names and hashes of the files they
need that are new on the remote. Bytes::

    b"ENGRAMS1" | uint64 LE header length | header (UTF-8 JSON) | record payloads

header: ``{"store_id", "version", "files": [[name, sha256, nbytes], ...],
"records": [[db, key_hex, nbytes], ...]}``, sorted, so a re-run writes the same bytes
(the same content address). Payloads are the records' plain bytes (unsealed): the
pulling store seals them as it writes them.

A marker of a version signed at commit also carries the version's signature record
(``signature``: the ``signature/<id>`` record of the meta database, as text): the
signature covers the manifest, so it needs no hash chain to be checked, and a marker
without one (an unsigned version, or a remote pushed by an older engram) is read as
unsigned. A deleted tag is a *tombstone*: its object stays, with ``"deleted": true``,
the target it named and the next ``seq`` (so a value never repeats), because S3 has no
conditional delete and a file:// remote's claims need the key to keep a value.

Everything read from a remote is untrusted: names are validated (a file name, never a
path), sizes bounded by the object read.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

from engram.errors import RemoteError
from engram.store import format as fmt
from engram.store.checkpoint import MAX_HEADER_BYTES
from engram.store.history import is_valid_tag_name
from engram.store.packs import PACK_NAME
from engram.store.values import version_name

LAYOUT_FORMAT = 1
STORE_KEY = "store.json"
HEAD_KEY = "HEAD"
VERSIONS_PREFIX = "versions/"
TAGS_PREFIX = "refs/tags/"
OBJECTS_PREFIX = "objects/"
GC_KEY = "gc.json"
# A signature record is ~130 bytes, more after `compact` (it adds the signed checkpoint's
# safetensors header): bounded by the largest header engram reads
MAX_SIGNATURE_BYTES = 2 * MAX_HEADER_BYTES
SEGMENT_MAGIC = b"ENGRAMS1"
_LENGTH = struct.Struct("<Q")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MARKER_KEY = re.compile(r"versions/v\d{4,18}-[0-9a-f]{16}\.json")
_OBJECT_KEY = re.compile(r"objects/([0-9a-f]{2})/([0-9a-f]{64})")
# The databases a segment may write, and their key sizes: never meta or refs (the
# pulling store sets HEAD and its counters itself).
RECORD_DBS = {"blobs": 32, "samples": 8, "versions": 8}


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def object_key(digest: str) -> str:
    return f"{OBJECTS_PREFIX}{digest[:2]}/{digest}"


def is_immutable_key(key: str) -> bool:
    """Whether ``key`` names an object or a marker (what a remote gc may collect)."""
    found = _OBJECT_KEY.fullmatch(key)
    return bool(_MARKER_KEY.fullmatch(key) or (found and found[2].startswith(found[1])))


def canonical(obj: Any) -> bytes:
    """JSON as the remote stores it: sorted keys, compact, so equal content is equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def is_local_file_name(name: object) -> bool:
    """A file a segment may name: a pack, checkpoint or artifact file name, never a path."""
    return isinstance(name, str) and bool(
        PACK_NAME.fullmatch(name)
        or fmt.CHECKPOINT_NAME.fullmatch(name)
        or fmt.ARTIFACT_NAME.fullmatch(name)
    )


def local_dir(name: str) -> str:
    """The store subdirectory a file of that name lives in."""
    return fmt.BLOB_DIR if PACK_NAME.fullmatch(name) else fmt.CHECKPOINT_DIR


def _bad(what: str, why: str) -> RemoteError:
    return RemoteError(
        f"remote {what} is damaged ({why}); it was not used: repair the remote "
        "(`engram verify` on the store it was pushed from, then push again)"
    )


# --------------------------------------------------------------------- refs


@dataclass(frozen=True)
class Ref:
    """A pointer to a marker: HEAD's value, and a marker's parent."""

    version: int
    marker: str  # its key
    sha256: str  # of its bytes

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "marker": self.marker, "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj: Any, what: str) -> Ref:
        if not (isinstance(obj, dict) and set(obj) == {"version", "marker", "sha256"}):
            raise _bad(what, "not a ref")
        vid, key, digest = obj["version"], obj["marker"], obj["sha256"]
        ok = (
            isinstance(vid, int)
            and not isinstance(vid, bool)
            and vid >= 0
            and isinstance(key, str)
            and _MARKER_KEY.fullmatch(key)
            and key.startswith(f"{VERSIONS_PREFIX}{version_name(vid)}-")
            and isinstance(digest, str)
            and _SHA256.fullmatch(digest)
            and key.endswith(f"-{digest[:16]}.json")
        )
        if not ok:
            raise _bad(what, "malformed ref")
        return cls(vid, key, digest)


def parse_head(data: bytes) -> Ref:
    try:
        obj = json.loads(data)
    except ValueError:
        raise _bad(HEAD_KEY, "not JSON") from None
    return Ref.from_json(obj, HEAD_KEY)


def tag_key(name: str) -> str:
    return TAGS_PREFIX + name


@dataclass(frozen=True)
class Tag:
    """A tag on the remote: the version (its marker's ref) it names. ``seq`` counts the
    tag's moves, so a value never repeats (a file:// remote's compare-and-swap needs it).
    ``deleted``: a tombstone (module docstring); ``target`` is the version it named."""

    name: str
    seq: int
    target: Ref
    deleted: bool = False

    def encode(self) -> bytes:
        obj = {"format": LAYOUT_FORMAT, "tag": self.name, "seq": self.seq,
               "target": self.target.to_json()}  # fmt: skip
        if self.deleted:  # a live tag's bytes are what engram wrote before tombstones
            obj["deleted"] = True
        return canonical(obj)

    @classmethod
    def decode(cls, data: bytes, name: str) -> Tag:
        key = tag_key(name)
        try:
            obj = json.loads(data)
            ok = isinstance(obj, dict) and obj.get("tag") == name and is_valid_tag_name(name)
            seq = obj["seq"] if ok else None
        except (ValueError, KeyError, TypeError):
            ok, seq = False, None
        deleted = obj.get("deleted", False) if ok else None
        if not ok or not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise _bad(key, "malformed tag")
        if not isinstance(deleted, bool):
            raise _bad(key, "malformed tag")
        if obj.get("format") != LAYOUT_FORMAT:
            raise RemoteError(
                f"remote tag {key} is in layout format {obj.get('format')!r}; upgrade engram "
                "to read it"
            )
        return cls(name, seq, Ref.from_json(obj.get("target"), key), deleted)


# ------------------------------------------------------------------ markers


@dataclass(frozen=True)
class Marker:
    """A version on the remote: what it is and where its segment is."""

    store_id: str
    version: int
    created_at: str  # with the id, what identifies a version across clones
    manifest_sha256: str  # of the manifest bytes as pushed
    parent: Ref | None
    segment_sha256: str
    segment_nbytes: int
    signature: bytes | None = None  # the version's signature record, if it was signed

    def encode(self) -> bytes:
        obj = {
            "format": LAYOUT_FORMAT,
            "store_id": self.store_id,
            "version": self.version,
            "created_at": self.created_at,
            "manifest_sha256": self.manifest_sha256,
            "parent": None if self.parent is None else self.parent.to_json(),
            "segment": {"sha256": self.segment_sha256, "nbytes": self.segment_nbytes},
        }
        if self.signature is not None:  # an unsigned version's marker: as before
            obj["signature"] = self.signature.decode()
        return canonical(obj)

    def ref(self) -> Ref:
        data = self.encode()
        digest = sha256(data)
        key = f"{VERSIONS_PREFIX}{version_name(self.version)}-{digest[:16]}.json"
        return Ref(self.version, key, digest)

    @classmethod
    def decode(cls, data: bytes, ref: Ref) -> Marker:
        """The marker ``ref`` names, checked against ``ref``'s hash first."""
        if sha256(data) != ref.sha256:
            raise _bad(ref.marker, "its SHA-256 differs from the one its referrer names")
        try:
            obj = json.loads(data)
            segment = obj["segment"]
            marker = cls(
                store_id=obj["store_id"],
                version=obj["version"],
                created_at=obj["created_at"],
                manifest_sha256=obj["manifest_sha256"],
                parent=None if obj["parent"] is None else Ref.from_json(obj["parent"], ref.marker),
                segment_sha256=segment["sha256"],
                segment_nbytes=segment["nbytes"],
                signature=_signature(obj.get("signature")),
            )
        except (ValueError, KeyError, TypeError):
            raise _bad(ref.marker, "malformed marker") from None
        if obj.get("format") != LAYOUT_FORMAT:
            raise RemoteError(
                f"remote marker {ref.marker} is in layout format {obj.get('format')!r}; "
                "upgrade engram to read it"
            )
        well_formed = (
            marker.version == ref.version
            and isinstance(marker.store_id, str)
            and isinstance(marker.created_at, str)
            and isinstance(marker.segment_nbytes, int)
            and all(
                isinstance(h, str) and _SHA256.fullmatch(h)
                for h in (marker.segment_sha256, marker.manifest_sha256)
            )
        )
        if not well_formed:
            raise _bad(ref.marker, "malformed marker")
        if marker.parent is not None and marker.parent.version >= marker.version:
            raise _bad(ref.marker, "its parent is not older")  # also: no cycle
        return marker


def _signature(text: Any) -> bytes | None:
    """A marker's signature record as the meta database holds it; the store checks
    what it says (:mod:`engram.store.signing`), this only that it is a JSON object."""
    if text is None:
        return None
    if not isinstance(text, str) or len(text) > MAX_SIGNATURE_BYTES:
        raise ValueError("signature")
    if not isinstance(json.loads(text), dict):
        raise ValueError("signature")
    return text.encode()


# ----------------------------------------------------------------- gc fence


@dataclass(frozen=True)
class Fence:
    """``gc.json``: how many remote gcs have started (``generation``) and whether the
    last one is still deleting (``running``). A push reads it before it looks at the
    remote and again before it moves HEAD: a change means a gc ran meanwhile, so the
    push checks that its objects are still there (:mod:`~engram.store.remote.gc`). Each
    write changes the value, so it never repeats (file:// claims need that)."""

    generation: int = 0
    running: bool = False

    def encode(self) -> bytes:
        return canonical(
            {"format": LAYOUT_FORMAT, "generation": self.generation, "running": self.running}
        )

    @classmethod
    def decode(cls, data: bytes) -> Fence:
        try:
            obj = json.loads(data)
            generation, running = obj["generation"], obj["running"]
        except (ValueError, KeyError, TypeError):
            raise _bad(GC_KEY, "malformed gc fence") from None
        if obj.get("format") != LAYOUT_FORMAT:
            raise RemoteError(
                f"remote {GC_KEY} is in layout format {obj.get('format')!r}; upgrade engram "
                "to read it"
            )
        if not (
            isinstance(generation, int)
            and not isinstance(generation, bool)
            and generation >= 0
            and isinstance(running, bool)
        ):
            raise _bad(GC_KEY, "malformed gc fence")
        return cls(generation, running)


# ----------------------------------------------------------------- segments


@dataclass(frozen=True)
class Segment:
    """A version's new records and the files they need (see the module docstring)."""

    store_id: str
    version: int
    files: tuple[tuple[str, str, int], ...]  # (name, sha256, nbytes)
    records: tuple[tuple[str, bytes, bytes], ...]  # (db, key, payload)

    def encode(self) -> bytes:
        files = sorted(self.files)
        records = sorted(self.records)
        header = canonical(
            {
                "store_id": self.store_id,
                "version": self.version,
                "files": [list(f) for f in files],
                "records": [[db, key.hex(), len(payload)] for db, key, payload in records],
            }
        )
        body = b"".join(payload for _, _, payload in records)
        return SEGMENT_MAGIC + _LENGTH.pack(len(header)) + header + body

    @classmethod
    def decode(cls, data: bytes, marker: Marker, key: str) -> Segment:
        """The segment ``marker`` names, checked against its hash first."""
        if len(data) != marker.segment_nbytes or sha256(data) != marker.segment_sha256:
            raise _bad(key, "its SHA-256 differs from the one its marker names")
        try:
            if data[: len(SEGMENT_MAGIC)] != SEGMENT_MAGIC:
                raise ValueError("magic")
            start = len(SEGMENT_MAGIC) + _LENGTH.size
            (length,) = _LENGTH.unpack_from(data, len(SEGMENT_MAGIC))
            header = json.loads(data[start : start + length])
            files = tuple((str(n), str(h), int(s)) for n, h, s in header["files"])
            offset, records = start + length, []
            for db, key_hex, nbytes in header["records"]:
                rkey = bytes.fromhex(key_hex)
                if RECORD_DBS.get(db) != len(rkey) or not (0 <= nbytes <= len(data) - offset):
                    raise ValueError("record")
                records.append((db, rkey, data[offset : offset + nbytes]))
                offset += nbytes
            if offset != len(data):
                raise ValueError("length")
        except (ValueError, KeyError, TypeError, struct.error):
            raise _bad(key, "malformed segment") from None
        for name, digest, nbytes in files:
            if not (is_local_file_name(name) and _SHA256.fullmatch(digest) and nbytes >= 0):
                raise _bad(key, f"bad file entry {name[:40]!r}")
        if header.get("store_id") != marker.store_id or header.get("version") != marker.version:
            raise _bad(key, "it belongs to another version")
        return cls(marker.store_id, marker.version, files, tuple(records))

    def manifest_payload(self) -> bytes | None:
        key = self.version.to_bytes(8, "big")
        return next((p for db, k, p in self.records if db == "versions" and k == key), None)
