"""The versioned, crash-safe store: LMDB for state, safetensors for model weights.

Typical use::

    from engram.store import Store

    with Store.open("runs/demo", mode="c") as store:          # create or open, take the lock
        v = store.commit({"ewc": {"fisher": fisher}}, model=net, meta={"experience": 0})
    with Store.open("runs/demo") as store:                    # read-only, no lock
        snap = store.load()                                   # HEAD; or "v0003", 3, a tag
        net.load_state_dict(snap.model)

The on-disk format and the commit protocol are specified in :mod:`engram.store.format`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lmdb
import numpy as np
import torch

from engram import __version__
from engram.errors import (
    CommitError,
    CorruptionError,
    EncodingError,
    EngramError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreFormatError,
    StoreNotFoundError,
    VersionNotFoundError,
)
from engram.store import format as fmt
from engram.store.checkpoint import (
    CheckpointInfo,
    check_file,
    fsync_dir,
    prepare_weights,
    read_checkpoint,
    weights_digest,
    write_checkpoint,
)
from engram.store.codec import (
    NUMPY_DTYPES,
    TAG_MAP,
    TAG_NDARRAY,
    TAG_SAMPLES,
    TAG_TENSOR,
    TORCH_DTYPES,
    ArrayRecord,
    array_from_bytes,
    checksum,
    decode_tree,
    encode_tree,
    iter_array_records,
)
from engram.store.delta import (
    CODEC_ZSTD,
    MAX_CHAIN,
    MIN_SAVING,
    EncodedBlob,
    FileBlob,
    FileReader,
    IndexEntry,
    checkpoint_spans,
    compaction_order,
    decode,
    decode_entry,
    encode,
    itemsize_for,
)
from engram.store.lock import WriterLock
from engram.store.packs import ALIGN, PACK_NAME, BlobLocation, PackReader, PackWriter, pack_name
from engram.store.samples import SampleTable, sample_key

Mode = Literal["r", "w", "c"]
VersionSpec = int | str | None

_INITIAL_MAP_SIZE = 1 << 30  # address space only: the file grows as pages are used
_LOAD_TRIES = 4
_MAX_GROWTHS = 24  # each at least doubles the map: 2**24 GiB is more than any disk
_TAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,127}")
_VERSION_NAME = re.compile(r"v?(\d{1,18})")
_HEAD_ANCESTOR = re.compile(r"HEAD~(\d{1,9})")
_CHECKPOINT_NAME = re.compile(r"model-v\d+(-exp\d+)?\.safetensors")
# What an interrupted checkpoint write leaves: our temp name, or safetensors' own temp
# file (its save_file writes `.tmpXXXXXX` and renames it into place).
_CHECKPOINT_LEFTOVER = re.compile(
    r"model-v\d+(-exp\d+)?\.safetensors|\.model-v\d+.*\.tmp-\d+|\.tmp[A-Za-z0-9]{6,}"
)


def is_valid_tag_name(name: object) -> bool:
    """Whether :meth:`Store.tag` accepts ``name`` (checked before a run, e.g. gate.promote)."""
    return (
        isinstance(name, str)
        and _TAG_NAME.fullmatch(name) is not None
        and name != "HEAD"
        and _VERSION_NAME.fullmatch(name) is None
    )


@dataclass(frozen=True)
class VersionInfo:
    """Summary of one committed version."""

    id: int
    parent: int | None
    created_at: str
    message: str
    meta: dict[str, Any]
    nbytes: int  # logical bytes of the state and the checkpoint
    new_bytes: int  # bytes this commit actually wrote (new blobs + checkpoint)
    checkpoint: str | None  # None: no model, or its weights were compacted
    tags: tuple[str, ...] = ()
    compacted: bool = False  # model weights delta-coded in the blob store (no plain file)

    @property
    def name(self) -> str:
        return version_name(self.id)


@dataclass(frozen=True)
class Snapshot:
    """A loaded version: its summary, the committed state, and the model weights."""

    version: VersionInfo
    state: dict[str, Any]
    model: dict[str, torch.Tensor] | None


@dataclass(frozen=True)
class Problem:
    """One integrity problem found by :meth:`Store.verify`."""

    version: int | None
    where: str
    message: str

    def __str__(self) -> str:
        at = version_name(self.version) if self.version is not None else "store"
        return f"{at} {self.where}: {self.message}"


@dataclass
class VerifyReport:
    """Result of :meth:`Store.verify`; truthy when nothing is wrong."""

    versions: list[int] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class GcReport:
    """What :meth:`Store.gc` removed."""

    versions: tuple[int, ...]
    blobs: int
    blob_bytes: int
    files: tuple[str, ...]
    samples: int = 0  # replay samples no kept version references any more


@dataclass(frozen=True)
class CompactReport:
    """What :meth:`Store.compact` did."""

    versions: tuple[int, ...]  # versions whose blobs and weights were (newly) delta-coded
    blobs: int  # blobs written encoded (or, for weights leaving their file, plain)
    raw_bytes: int  # their size decoded
    stored_bytes: int  # their size as written
    files: tuple[str, ...]  # checkpoint and pack files removed


@dataclass(frozen=True)
class _Chunk:
    """One chunk of a version's tensor, as compaction sees it."""

    digest: bytes
    nbytes: int
    xxh3: int
    itemsize: int
    source: FileBlob | None  # where the bytes are when the blob index lacks them


_INLINE_HASH_BYTES = 4 << 20  # a state up to this size is hashed in the committing thread


def _write_checkpoint_durably(directory: Path, file: str, *args: Any) -> CheckpointInfo:
    """:func:`write_checkpoint`, then an fsync of its directory (the new name)."""
    info = write_checkpoint(directory, file, *args)
    fsync_dir(directory)
    return info


def version_name(version_id: int) -> str:
    return f"v{version_id:04d}"


def _vkey(version_id: int) -> bytes:
    return version_id.to_bytes(8, "big")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Store:
    """A versioned store of continual-learning state and model checkpoints.

    Open it with :meth:`Store.open`. One process may hold it for writing (``mode="w"``
    or ``"c"``); any number may read it (``mode="r"``), also while a writer commits.
    A ``Store`` is not thread-safe and must not be used across ``fork()``.
    """

    def __init__(self, path: Path, mode: Mode, lock: WriterLock | None, map_size: int) -> None:
        self.path = path
        self.mode = mode
        self._lock = lock
        self._pid = os.getpid()
        self._env: lmdb.Environment | None = None
        self._map_size = map_size
        self._packs = PackReader(path / fmt.BLOB_DIR)
        self._files = FileReader(path / fmt.CHECKPOINT_DIR)
        self.samples = SampleTable(self)
        self._open_env()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        mode: Mode = "r",
        *,
        lock_timeout: float = 0.0,
        map_size: int = _INITIAL_MAP_SIZE,
    ) -> Store:
        """Open a store.

        Args:
            path: the store directory.
            mode: ``"r"`` read-only (no lock), ``"w"`` read-write (the store must exist),
                ``"c"`` read-write, creating the store if the path is missing or empty.
            lock_timeout: seconds to wait for another writer to finish.
            map_size: initial LMDB map size; it grows by itself as needed.

        Raises:
            StoreNotFoundError, NotAStoreError, StoreLockedError, StoreFormatError.
        """
        if mode not in ("r", "w", "c"):
            raise ValueError(f"mode must be 'r', 'w' or 'c', not {mode!r}")
        root = Path(path).expanduser()
        lmdb_dir = root / fmt.LMDB_DIR
        if root.exists() and not root.is_dir():
            raise NotAStoreError(f"{root} is a file, not an engram store directory")
        if not lmdb_dir.is_dir():
            if mode != "c":
                if not root.exists():
                    raise StoreNotFoundError(
                        f"no store at {root}; open it with mode='c' to create one"
                    )
                raise NotAStoreError(f"{root} is not an engram store (it has no {fmt.LMDB_DIR}/)")
            ours = {fmt.LMDB_DIR, fmt.BLOB_DIR, fmt.CHECKPOINT_DIR, fmt.LOCK_FILE, *fmt.RUN_DIRS}
            # Names of ours may be there: a creation cut short, or one racing with us
            # (the writer lock below then decides who proceeds).
            if root.exists() and any(p.name not in ours for p in root.iterdir()):
                raise NotAStoreError(
                    f"{root} exists, is not empty and is not an engram store; "
                    "choose a new or empty directory"
                )
            root.mkdir(parents=True, exist_ok=True)
            lmdb_dir.mkdir(exist_ok=True)
        lock = None
        if mode != "r":
            lock = WriterLock(root / fmt.LOCK_FILE)
            lock.acquire(lock_timeout)
            for sub in (fmt.CHECKPOINT_DIR, fmt.BLOB_DIR):  # a creation cut short lacks them
                (root / sub).mkdir(exist_ok=True)
        try:
            return cls(root, mode, lock, map_size)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def _open_env(self) -> None:
        writable = self.mode != "r"
        try:
            self._env = lmdb.open(
                str(self.path / fmt.LMDB_DIR),
                subdir=True,
                readonly=not writable,
                create=writable,
                map_size=self._map_size,
                max_dbs=8,
                meminit=False,
                max_readers=1024,
            )
        except lmdb.Error as e:
            if "already open in this process" in str(e):
                raise EngramError(
                    f"store {self.path} is already open in this process (LMDB allows one "
                    "handle per process); use that Store object, or read from another process"
                ) from None
            raise NotAStoreError(f"{self.path} is not a readable engram store: {e}") from e
        try:
            if writable:
                self._env.reader_check()  # clear reader slots of dead processes
                with self._env.begin(write=True) as txn:
                    self._dbs = {n: self._env.open_db(n, txn=txn, create=True) for n in fmt.ALL_DBS}
                    if txn.get(b"format_version", db=self._dbs[fmt.DB_META]) is None:
                        self._init_meta(txn)
            else:
                # py-lmdb opens (and commits) its own read transaction here; a handle
                # opened inside ours would die with it.
                for _ in range(_MAX_GROWTHS):
                    try:
                        self._dbs = {n: self._env.open_db(n, create=False) for n in fmt.ALL_DBS}
                        break
                    except lmdb.MapResizedError:  # a writer grew the map meanwhile
                        self._env.set_mapsize(0)
            with self._read() as txn:
                self._check_meta(txn)
        except lmdb.Error as e:
            self._env.close()
            raise NotAStoreError(f"{self.path} is not a valid engram store: {e}") from e
        except BaseException:
            self._env.close()
            raise

    def _init_meta(self, txn: lmdb.Transaction) -> None:
        db = self._dbs[fmt.DB_META]
        # A store says format 2 only once compact() wrote something format 1 lacks.
        txn.put(b"format_version", str(fmt.PLAIN_FORMAT_VERSION).encode(), db=db)
        txn.put(b"store_id", uuid.uuid4().hex.encode(), db=db)
        txn.put(b"created_at", _now().encode(), db=db)
        txn.put(b"next_version", b"1", db=db)
        txn.put(b"next_pack", b"1", db=db)

    def _check_meta(self, txn: lmdb.Transaction) -> None:
        db = self._dbs[fmt.DB_META]
        raw = txn.get(b"format_version", db=db)
        try:
            version = int(bytes(raw).decode("ascii"))
            self.store_id = bytes(txn.get(b"store_id", db=db)).decode("ascii")
            int(bytes(txn.get(b"next_version", db=db)))
            int(bytes(txn.get(b"next_pack", db=db)))
        except (TypeError, ValueError, UnicodeDecodeError) as e:
            raise StoreFormatError(f"{self.path} has malformed store metadata ({e})") from None
        if version > fmt.FORMAT_VERSION:
            raise StoreFormatError(
                f"store {self.path} was written in format version {version}, newer than the "
                f"{fmt.FORMAT_VERSION} this engram {__version__} reads; upgrade engram"
            )

    def close(self) -> None:
        """Close the LMDB environment and release the writer lock."""
        try:
            if self._env is not None and self.mode != "r" and os.getpid() == self._pid:
                self.samples.flush()
        finally:
            if self._env is not None:
                self._env.close()
                self._env = None
            self._packs.close()
            self._files.close()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Releases the writer lock of a store that was never closed; not in a forked child.
        try:
            if self._pid == os.getpid():
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, mode={self.mode!r})"

    # ------------------------------------------------------------ transactions

    def _check_usable(self) -> lmdb.Environment:
        if self._env is None:
            raise EngramError(f"store {self.path} is closed")
        if os.getpid() != self._pid:
            raise EngramError(
                f"store {self.path} was opened in process {self._pid} and cannot be used after "
                "fork(); open it again in the child process"
            )
        return self._env

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        env = self._check_usable()
        try:
            txn = env.begin(buffers=True)
        except lmdb.MapResizedError:  # another process grew the map: adopt its size
            env.set_mapsize(0)
            txn = env.begin(buffers=True)
        try:
            yield txn
        finally:
            txn.abort()

    def _write(self, work: Callable[[lmdb.Transaction], Any], reserve: int = 0) -> Any:
        """Run ``work`` in one write transaction, growing the map until it fits.

        ``work`` must be safe to re-run: it is retried from scratch after a MapFullError.
        """
        env = self._check_usable()
        if self.mode == "r":
            raise ReadOnlyStoreError(f"store {self.path} was opened read-only; use mode='w'")
        self._ensure_room(env, reserve)
        for _ in range(_MAX_GROWTHS):
            try:
                with env.begin(write=True) as txn:
                    return work(txn)
            except lmdb.MapFullError:
                self._grow(env, max(reserve, env.info()["map_size"]))
            except lmdb.MapResizedError:
                env.set_mapsize(0)
        raise OSError(f"LMDB map of {self.path} still full after {_MAX_GROWTHS} growths")

    def _ensure_room(self, env: lmdb.Environment, reserve: int) -> None:
        info = env.info()
        used = (info["last_pgno"] + 1) * env.stat()["psize"]
        if used + reserve * 1.25 + (16 << 20) > info["map_size"]:
            self._grow(env, reserve)

    def _grow(self, env: lmdb.Environment, extra: int) -> None:
        info = env.info()
        used = (info["last_pgno"] + 1) * env.stat()["psize"]
        target = max(2 * info["map_size"], used + int(extra * 1.5) + (64 << 20))
        env.set_mapsize(-(-target // (1 << 20)) * (1 << 20))

    # ------------------------------------------------------------------ refs

    def _ref(self, txn: lmdb.Transaction, key: bytes) -> int | None:
        raw = txn.get(key, db=self._dbs[fmt.DB_REFS])
        if raw is None:
            return None
        try:
            return int(bytes(raw).decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise CorruptionError(f"store {self.path}: ref {key.decode()!r} is malformed") from None

    def _resolve(self, txn: lmdb.Transaction, spec: VersionSpec) -> int:
        if spec is None or spec == "HEAD":
            head = self._ref(txn, fmt.HEAD_REF)
            if head is None:
                raise VersionNotFoundError(
                    f"store {self.path} has no HEAD (no versions yet, or HEAD was reset by a "
                    "failed gate); name a version or tag"
                )
            return head
        if isinstance(spec, bool) or not isinstance(spec, int | str):
            raise TypeError(
                f"a version is an int id, 'vNNNN', 'HEAD', 'HEAD~N' or a tag, not {spec!r}"
            )
        if isinstance(spec, int):
            vid = spec
        elif m := _VERSION_NAME.fullmatch(spec):
            vid = int(m.group(1))
        elif m := _HEAD_ANCESTOR.fullmatch(spec):
            vid = self._resolve(txn, "HEAD")
            seen = {vid}
            for _ in range(int(m.group(1))):
                parent = self._manifest(txn, vid).get("parent")
                if parent is None:
                    raise VersionNotFoundError(f"{spec}: {version_name(vid)} has no parent")
                if parent in seen:
                    raise CorruptionError(
                        f"store {self.path}: the parents of {version_name(vid)} form a cycle "
                        f"(through {version_name(parent)}); run `engram verify {self.path} --all`"
                    )
                if txn.get(_vkey(parent), db=self._dbs[fmt.DB_VERSIONS]) is None:
                    raise VersionNotFoundError(
                        f"{spec}: the parent of {version_name(vid)}, {version_name(parent)}, is "
                        f"not in store {self.path} (deleted by gc); name the version instead"
                    )
                seen.add(parent)
                vid = parent
        else:
            tagged = self._ref(txn, fmt.TAG_PREFIX + spec.encode())
            if tagged is None:
                tags = ", ".join(sorted(self._tags(txn))) or "none"
                raise VersionNotFoundError(
                    f"no version or tag {spec!r} in store {self.path} (tags: {tags}); "
                    "list versions with Store.versions() or `engram ls`"
                )
            vid = tagged
        if txn.get(_vkey(vid), db=self._dbs[fmt.DB_VERSIONS]) is None:
            raise VersionNotFoundError(f"version {version_name(vid)} is not in store {self.path}")
        return vid

    def _tags(self, txn: lmdb.Transaction) -> dict[str, int]:
        tags = {}
        with txn.cursor(db=self._dbs[fmt.DB_REFS]) as cur:
            if cur.set_range(fmt.TAG_PREFIX):
                for key, _ in cur:
                    key = bytes(key)
                    if not key.startswith(fmt.TAG_PREFIX):
                        break
                    tags[key[len(fmt.TAG_PREFIX) :].decode()] = self._ref(txn, key)
        return tags

    def _manifest(self, txn: lmdb.Transaction, vid: int) -> dict[str, Any]:
        raw = txn.get(_vkey(vid), db=self._dbs[fmt.DB_VERSIONS])
        if raw is None:
            raise VersionNotFoundError(f"version {version_name(vid)} is not in store {self.path}")
        try:
            manifest = json.loads(bytes(raw))
        except (ValueError, RecursionError) as e:
            raise CorruptionError(
                f"{version_name(vid)}: manifest is not valid JSON ({e})"
            ) from None
        _check_manifest(manifest, vid)
        return manifest

    # --------------------------------------------------------------- reading

    @property
    def head(self) -> VersionInfo | None:
        """The current version, or None for an empty store."""
        with self._read() as txn:
            vid = self._ref(txn, fmt.HEAD_REF)
            return None if vid is None else self._info(txn, vid, self._tags(txn))

    def info(self, version: VersionSpec = "HEAD") -> VersionInfo:
        """Summary of one version."""
        with self._read() as txn:
            return self._info(txn, self._resolve(txn, version), self._tags(txn))

    def manifest(self, version: VersionSpec = "HEAD") -> dict[str, Any]:
        """The raw manifest (JSON object) of a version."""
        with self._read() as txn:
            return self._manifest(txn, self._resolve(txn, version))

    def versions(self) -> list[VersionInfo]:
        """Every version in the store, oldest first."""
        with self._read() as txn:
            tags = self._tags(txn)
            with txn.cursor(db=self._dbs[fmt.DB_VERSIONS]) as cur:
                ids = [int.from_bytes(bytes(k), "big") for k in cur.iternext(values=False)]
            return [self._info(txn, vid, tags) for vid in ids]

    def tags(self) -> dict[str, int]:
        """Tag name → version id."""
        with self._read() as txn:
            return self._tags(txn)

    def _info(self, txn: lmdb.Transaction, vid: int, tags: dict[str, int]) -> VersionInfo:
        m = self._manifest(txn, vid)
        ckpt = m["checkpoint"]
        return VersionInfo(
            id=vid,
            parent=m["parent"],
            created_at=m["created_at"],
            message=m["message"],
            meta=m["meta"],
            nbytes=m["nbytes"],
            new_bytes=m["new_bytes"],
            checkpoint=None if ckpt is None else ckpt["file"],
            tags=tuple(sorted(name for name, t in tags.items() if t == vid)),
            compacted=m.get("model") is not None,
        )

    def checkpoint_path(self, version: VersionSpec = "HEAD") -> Path | None:
        """Path of a version's plain safetensors checkpoint file.

        None if the version has no model weights or if :meth:`compact` delta-coded
        them (its :attr:`VersionInfo.compacted` is then true): read those with
        ``load(version, state=False).model``, or write a plain file with
        :meth:`export_checkpoint`. HEAD always has its plain file.
        """
        ckpt = self.manifest(version)["checkpoint"]
        return None if ckpt is None else self.path / fmt.CHECKPOINT_DIR / ckpt["file"]

    def export_checkpoint(
        self, version: VersionSpec, path: str | os.PathLike[str]
    ) -> CheckpointInfo | None:
        """Write a version's model weights to ``path`` as a plain safetensors file.

        For a compacted version this rebuilds the file it had: the same tensors, bit
        for bit, and the same safetensors metadata (the header's key order may differ).
        None if the version has no model.
        """
        snap = self.load(version, state=False)
        if snap.model is None:
            return None
        manifest = self.manifest(snap.version.id)
        if manifest.get("model") is not None:
            metadata = manifest["model"]["metadata"]
        else:
            _, metadata = checkpoint_spans(self.path / fmt.CHECKPOINT_DIR / snap.version.checkpoint)
        dest = Path(path)
        digest = weights_digest(snap.model)
        info = write_checkpoint(dest.parent, dest.name, snap.model, metadata, digest)
        fsync_dir(dest.parent)
        return info

    def load(
        self,
        version: VersionSpec = "HEAD",
        *,
        state: bool = True,
        model: bool = True,
        verify: bool = False,
    ) -> Snapshot:
        """Load a version's state and model weights.

        Every chunk and the checkpoint file are checked against their XXH3 checksum;
        ``verify=True`` also re-checks their SHA-256 content hashes.

        Args:
            version: an int id, ``"v0007"``, ``"HEAD"``, ``"HEAD~1"`` or a tag.
            state: load the committed state mapping.
            model: load the model weights from the checkpoint file.
            verify: also re-check SHA-256 digests (slower).

        Raises:
            VersionNotFoundError: no such version.
            CorruptionError: stored bytes do not match their hashes (names version and key).
        """
        for _ in range(_LOAD_TRIES - 1):
            written = self._check_usable().info()["last_txnid"]
            try:
                return self._load(version, state, model, verify)
            except CorruptionError:
                # A concurrent gc may have moved or dropped packs after our snapshot of
                # the index was taken: another try sees the new index (or no such
                # version). With no write since the read began, the bytes really are
                # damaged: one more full read would fail the same way.
                if self._check_usable().info()["last_txnid"] == written:
                    raise
        return self._load(version, state, model, verify)

    def _load(self, version: VersionSpec, state: bool, model: bool, verify: bool) -> Snapshot:
        with self._read() as txn:
            vid = self._resolve(txn, version)
            manifest = self._manifest(txn, vid)
            info = self._info(txn, vid, self._tags(txn))
            loaded_state: dict[str, Any] = {}
            if state:
                _check_memory(sum(r.nbytes for r in iter_array_records(manifest["state"])), vid)
                loaded_state = decode_tree(
                    manifest["state"],
                    lambda record, path: self._read_array(txn, record, vid, path, verify),
                )
            compacted = manifest.get("model")
            if model and compacted is not None:
                weights = decode_tree(
                    compacted["tensors"],
                    lambda record, path: self._read_array(txn, record, vid, f"model{path}", verify),
                )
                return Snapshot(info, loaded_state, weights)
        weights = None
        if model and manifest["checkpoint"] is not None:
            ckpt = CheckpointInfo(**manifest["checkpoint"])
            weights = read_checkpoint(
                self.path / fmt.CHECKPOINT_DIR / ckpt.file,
                ckpt,
                verify=verify,
                what=f"{self.path} {version_name(vid)}",
            )
        return Snapshot(info, loaded_state, weights)

    def _blob(self, txn: lmdb.Transaction, digest: str) -> memoryview | bytes | None:
        """A blob's bytes (zero-copy unless delta-coded), or None if the index lacks it."""
        raw = txn.get(bytes.fromhex(digest), db=self._dbs[fmt.DB_BLOBS])
        if raw is None:
            return None
        return self._entry_bytes(txn, decode_entry(raw, digest), digest)

    def _entry_bytes(
        self, txn: lmdb.Transaction, entry: IndexEntry, digest: str, hops: int = 0
    ) -> memoryview | bytes:
        if isinstance(entry, BlobLocation):
            return self._packs.view(entry, digest)
        if isinstance(entry, FileBlob):
            return self._files.view(entry, digest)
        stored = self._packs.view(entry.stored, digest)
        if checksum(stored) != entry.stored_xxh3:
            raise CorruptionError(f"encoded blob {digest[:12]} fails its checksum")
        base = None
        if entry.base is not None:
            if hops >= MAX_CHAIN:
                raise CorruptionError(
                    f"blob {digest[:12]}: delta chain longer than {MAX_CHAIN} (or cyclic)"
                )
            base_digest = entry.base.hex()
            raw = txn.get(entry.base, db=self._dbs[fmt.DB_BLOBS])
            if raw is None:
                raise CorruptionError(
                    f"blob {digest[:12]}: its delta base {base_digest[:12]} is missing"
                )
            base = self._entry_bytes(txn, decode_entry(raw, base_digest), base_digest, hops + 1)
        return decode(stored, base, entry.itemsize, entry.nbytes, f"blob {digest[:12]}")

    def _read_array(
        self, txn: lmdb.Transaction, record: ArrayRecord, vid: int, path: str, verify: bool
    ) -> torch.Tensor | np.ndarray:
        views = []
        for digest, size, check in record.chunks:
            try:
                view = self._blob(txn, digest)
                problem = _chunk_problem(view, digest, size, check, verify)
            except CorruptionError as e:
                problem = str(e)
            if problem:
                raise CorruptionError(
                    f"store {self.path} {version_name(vid)}: tensor {path!r} is corrupted "
                    f"({problem}); run verify and roll back to a good version"
                )
            views.append(view)
        raw = torch.empty(record.nbytes, dtype=torch.uint8)
        dest = raw.numpy()
        offset = 0
        for view in views:
            dest[offset : offset + len(view)] = np.frombuffer(view, dtype=np.uint8)
            offset += len(view)
        return array_from_bytes(record, raw)

    # --------------------------------------------------------------- writing

    def commit(
        self,
        state: Mapping[str, Any] | None = None,
        model: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
        *,
        message: str = "",
        meta: Mapping[str, Any] | None = None,
    ) -> VersionInfo:
        """Commit a new version and move HEAD to it, all or nothing.

        Args:
            state: nested mapping of tensors, numpy arrays and JSON scalars (a plugin's
                ``state_dict()``, an optimizer's, RNG states, counters...).
            model: the model (its ``state_dict()`` is saved) or a mapping of its weights,
                written as a plain safetensors checkpoint file.
            message: a human-readable description of the version.
            meta: JSON-able metadata (clock, config, metrics summary). An int
                ``meta["experience"]`` names the checkpoint file and, with
                ``meta["strategy"]``, is copied into the file's safetensors metadata.

        Returns:
            The new version's summary (its ``id`` is the new version id).

        Raises:
            EncodingError: the state holds a value that cannot be stored.
            CommitError: an I/O error (e.g. disk full); HEAD still names the previous version.
        """
        self._check_usable()
        if self.mode == "r":
            raise ReadOnlyStoreError(f"store {self.path} was opened read-only; use mode='w'")
        if state is not None and not isinstance(state, Mapping):
            raise EncodingError(f"state must be a mapping, not {type(state).__qualname__}")
        meta = dict(meta or {})
        try:
            json.dumps(meta, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise EncodingError(f"meta must be JSON-serializable: {e}") from None
        tree, pending = encode_tree(dict(state or {}))
        weights = None
        if model is not None:
            weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
            weights = prepare_weights(weights)
        try:
            return self._commit(tree, pending, weights, message, meta)
        except (OSError, lmdb.Error) as e:
            head = self._reopen_after_failure()
            raise CommitError(
                f"commit to {self.path} failed: {e}. HEAD is still "
                f"{version_name(head) if head is not None else '(empty)'}; "
                "free disk space or fix the error, then commit again"
            ) from e

    def _commit(self, tree, pending, weights, message, meta) -> VersionInfo:
        # Replay samples this version may reference must be durable no later than it:
        # they go into the transaction that publishes it (one synced transaction, not
        # two). A wrapped table (a background committer's, shared by two threads) is
        # flushed on its own, under its lock.
        samples = self.samples if isinstance(self.samples, SampleTable) else None
        if samples is None:
            self.samples.flush()
        sample_items = samples.pending_items() if samples is not None else []
        meta_db = self._dbs[fmt.DB_META]
        with self._read() as txn:
            vid = int(bytes(txn.get(b"next_version", db=meta_db)))
            pack_id = int(bytes(txn.get(b"next_pack", db=meta_db)))
            parent = self._ref(txn, fmt.HEAD_REF)
        created_at = _now()
        ckpt = None
        if weights is not None:
            digest = weights_digest(weights)
            ckpt = self._parent_checkpoint_if_same(parent, digest)
        for p in pending:
            p.record["chunks"] = []  # filled in chunk order by _write_pack
        pieces = [
            (p, p.raw[off : off + fmt.CHUNK_BYTES])
            for p in pending
            for off in range(0, len(p.raw), fmt.CHUNK_BYTES)
        ]
        # Hashing, file writes and fsyncs all release the GIL: (1) and (2) overlap. One
        # worker more than cores: the checkpoint job mostly waits on its write and fsync.
        # A small state is hashed in this thread: each worker started costs a GIL
        # hand-off (up to the 5 ms switch interval), more than hashing a few MiB.
        inline = sum(len(view) for _, view in pieces) <= _INLINE_HASH_BYTES
        workers = 1 if inline else (os.cpu_count() or 1) + 1
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # (2) the checkpoint file, durably, under its final name (unless shared).
            ckpt_job = None
            if weights is not None and ckpt is None:
                file = f"model-{version_name(vid)}"
                if _is_count(meta.get("experience")):
                    file += f"-exp{meta['experience']}"
                ckpt_job = pool.submit(
                    _write_checkpoint_durably,
                    self.path / fmt.CHECKPOINT_DIR,
                    file + ".safetensors",
                    weights,
                    self._checkpoint_metadata(vid, parent, created_at, meta),
                    digest,
                )
            # (1) content-address every chunk; append those the store lacks to a pack.
            if inline:
                hashes = [_done(_hash_chunk(view)) for _, view in pieces]
            else:
                hashes = [pool.submit(_hash_chunk, view) for _, view in pieces]
            index, new_bytes = self._write_pack(pieces, hashes, pack_id)
            if index:  # a new pack file: its directory entry, while the checkpoint's runs
                fsync_dir(self.path / fmt.BLOB_DIR)
            if ckpt_job is not None:
                ckpt = ckpt_job.result()
                new_bytes += ckpt.nbytes
        state_bytes = sum(len(p.raw) for p in pending)
        manifest = {
            "format_version": fmt.PLAIN_FORMAT_VERSION,
            "engram_version": __version__,
            "store_id": self.store_id,
            "id": vid,
            "parent": parent,
            "created_at": created_at,
            "message": message,
            "meta": meta,
            "state": tree,
            "checkpoint": None if ckpt is None else ckpt.to_json(),
            "nbytes": state_bytes + (ckpt.nbytes if ckpt else 0),
            "new_bytes": new_bytes,
        }
        payload = json.dumps(manifest, separators=(",", ":")).encode()

        # (3) one transaction makes the version visible: pending replay samples, index,
        # manifest, HEAD, counters.
        def publish(txn: lmdb.Transaction) -> None:
            if sample_items:
                samples.put(txn, sample_items)
            for digest, entry in index:
                txn.put(digest, entry, db=self._dbs[fmt.DB_BLOBS])
            txn.put(_vkey(vid), payload, db=self._dbs[fmt.DB_VERSIONS])
            txn.put(fmt.HEAD_REF, str(vid).encode(), db=self._dbs[fmt.DB_REFS])
            txn.put(b"next_version", str(vid + 1).encode(), db=meta_db)
            if index:
                txn.put(b"next_pack", str(pack_id + 1).encode(), db=meta_db)

        sample_bytes = sum(len(r) + 64 for _, r in sample_items)
        self._write(publish, reserve=len(payload) + 64 * len(index) + sample_bytes)
        if sample_items:
            samples.forget(sample_items)
        return self.info(vid)

    def _write_pack(
        self, pieces: list, hashes: list[Future], pack_id: int
    ) -> tuple[list[tuple[bytes, bytes]], int]:
        """Append each chunk the store lacks to pack ``pack_id`` as soon as it is hashed.

        Fills in the chunk lists of the pending records; returns the new index entries
        and the bytes written. The pack is fsynced; nothing refers to it yet.
        """
        index: list[tuple[bytes, bytes]] = []
        written: set[bytes] = set()
        new_bytes = 0
        writer = None
        with self._read() as txn:
            try:
                for (pending, view), job in zip(pieces, hashes, strict=True):
                    digest, check = job.result()
                    pending.record["chunks"].append([digest.hex(), len(view), check])
                    if digest in written or txn.get(digest, db=self._dbs[fmt.DB_BLOBS]):
                        continue
                    written.add(digest)
                    if writer is None:
                        writer = PackWriter(self.path / fmt.BLOB_DIR, pack_id)
                    index.append((digest, writer.append(view, check).encode()))
                    new_bytes += len(view)
                if writer is not None:
                    writer.finish()
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
        return index, new_bytes

    def _parent_checkpoint_if_same(self, parent: int | None, digest: str) -> CheckpointInfo | None:
        """The parent's checkpoint if it holds exactly these weights (and is still there)."""
        if parent is None:
            return None
        with self._read() as txn:
            ckpt = self._manifest(txn, parent)["checkpoint"]
        if ckpt is None or ckpt["weights"] != digest:
            return None
        path = self.path / fmt.CHECKPOINT_DIR / ckpt["file"]
        if not path.is_file() or path.stat().st_size != ckpt["nbytes"]:
            return None
        return CheckpointInfo(**ckpt)

    def _checkpoint_metadata(self, vid: int, parent: int | None, created_at: str, meta: dict):
        out = {
            "format": "engram",
            "engram_version": __version__,
            "store_id": self.store_id,
            "version": version_name(vid),
            "parent": "" if parent is None else version_name(parent),
            "created_at": created_at,
        }
        for key in ("experience", "strategy"):
            if key in meta and isinstance(meta[key], int | str) and not isinstance(meta[key], bool):
                out[key] = str(meta[key])
        return out

    def _reopen_after_failure(self) -> int | None:
        """After a failed write, LMDB's environment may be unusable: reopen it."""
        try:
            if self._env is not None:
                self._env.close()
            self._open_env()
            with self._read() as txn:
                return self._ref(txn, fmt.HEAD_REF)
        except EngramError:
            return None

    def tag(self, name: str, version: VersionSpec = "HEAD") -> VersionInfo:
        """Point tag ``name`` at a version (moving it if it exists)."""
        if (
            not isinstance(name, str)
            or not _TAG_NAME.fullmatch(name)
            or name == "HEAD"
            or (_VERSION_NAME.fullmatch(name))
        ):
            raise ValueError(
                f"invalid tag name {name!r}: use letters, digits, '.', '_' or '-', starting with "
                "a letter or '_', not 'HEAD' and not a version name like 'v0003'"
            )
        with self._read() as txn:
            vid = self._resolve(txn, version)
        self._write(
            lambda txn: txn.put(
                fmt.TAG_PREFIX + name.encode(), str(vid).encode(), db=self._dbs[fmt.DB_REFS]
            )
        )
        return self.info(vid)

    def untag(self, name: str) -> None:
        """Remove a tag (the version stays)."""
        if not self._write(
            lambda txn: txn.delete(fmt.TAG_PREFIX + name.encode(), db=self._dbs[fmt.DB_REFS])
        ):
            raise VersionNotFoundError(f"no tag {name!r} in store {self.path}")

    def rollback(self, version: VersionSpec | None) -> VersionInfo | None:
        """Move HEAD to an older (or any) version; later versions stay until ``gc``.

        The next commit's parent is that version, so history becomes a tree.
        ``rollback(None)`` resets HEAD: the store keeps its versions (reachable by name
        and tag) but has no current one, and the next commit starts a new root.
        """
        if version is None:
            self._write(lambda txn: txn.delete(fmt.HEAD_REF, db=self._dbs[fmt.DB_REFS]))
            return None
        with self._read() as txn:
            vid = self._resolve(txn, version)
        self._write(lambda txn: txn.put(fmt.HEAD_REF, str(vid).encode(), db=self._dbs[fmt.DB_REFS]))
        return self.info(vid)

    # -------------------------------------------------------------- integrity

    def verify(self, version: VersionSpec = "HEAD", *, all: bool = False) -> VerifyReport:
        """Re-hash what a version (or, with ``all=True``, the whole store) references.

        Checks every manifest's structure, every referenced chunk's presence, size,
        SHA-256 and XXH3, and every checkpoint file's size and hashes. A delta-coded
        chunk (also a compacted version's weights) is decoded through its chain and
        the result checked against the SHA-256 and XXH3 of the original bytes, so
        every stored delta and every base it needs is checked too. With ``all=True``
        it also re-hashes every indexed blob, referenced or not.
        Never raises for corruption: it is reported in :attr:`VerifyReport.problems`.
        """
        report = VerifyReport()
        checked: set[str] = set()
        rooted: set[int] = set()
        with self._read() as txn:
            ids = self._version_ids(txn) if all else [self._resolve(txn, version)]
            for vid in ids:
                report.versions.append(vid)
                self._verify_version(txn, vid, report, checked)
                self._verify_ancestry(txn, vid, report, rooted)
            if all:
                self._verify_index(txn, report, checked)
        return report

    def _version_ids(self, txn: lmdb.Transaction) -> list[int]:
        with txn.cursor(db=self._dbs[fmt.DB_VERSIONS]) as cur:
            return [int.from_bytes(bytes(k), "big") for k in cur.iternext(values=False)]

    def _verify_version(
        self, txn: lmdb.Transaction, vid: int, report: VerifyReport, checked: set[str]
    ) -> None:
        try:
            manifest = self._manifest(txn, vid)
            records = _version_records(manifest)
        except (CorruptionError, StoreFormatError) as e:
            report.problems.append(Problem(vid, "manifest", str(e)))
            return
        for path, record in records:
            for digest, size, check in record.chunks:
                if digest in checked:
                    continue
                try:
                    problem = _chunk_problem(self._blob(txn, digest), digest, size, check, True)
                except CorruptionError as e:
                    problem = str(e)
                if problem:
                    report.problems.append(Problem(vid, path, problem))
                else:
                    checked.add(digest)
                    report.blobs += 1
                    report.bytes += size
            if record.kind == TAG_SAMPLES and not any(p.version == vid for p in report.problems):
                ids = self._read_array(txn, record, vid, path, verify=False).tolist()
                missing = [
                    i for i in ids if txn.get(sample_key(i), db=self._dbs[fmt.DB_SAMPLES]) is None
                ]
                if missing:
                    report.problems.append(
                        Problem(
                            vid, path, f"{len(missing)} replay samples missing, e.g. {missing[0]}"
                        )
                    )
        if manifest["checkpoint"] is not None and manifest["checkpoint"]["file"] not in checked:
            ckpt = CheckpointInfo(**manifest["checkpoint"])
            try:
                check_file(self.path / fmt.CHECKPOINT_DIR / ckpt.file, ckpt, what=version_name(vid))
                report.bytes += ckpt.nbytes
                checked.add(ckpt.file)  # shared by versions whose weights did not change
            except CorruptionError as e:
                report.problems.append(Problem(vid, ckpt.file, str(e)))

    def _verify_ancestry(
        self, txn: lmdb.Transaction, vid: int, report: VerifyReport, rooted: set[int]
    ) -> None:
        """The parent chain of ``vid`` reaches a root: no missing parent, no cycle.
        ``rooted`` holds versions already known to reach one (shared across a verify)."""
        chain, child = [vid], vid
        while child not in rooted:
            try:
                parent = self._manifest(txn, child)["parent"]
            except EngramError:
                return  # reported with that version's manifest
            if parent is None:
                break
            if parent in chain:
                why = "names itself as parent" if parent == child else "is in a cycle of parents"
                report.problems.append(Problem(vid, "parent", f"{version_name(child)} {why}"))
                return
            if txn.get(_vkey(parent), db=self._dbs[fmt.DB_VERSIONS]) is None:
                report.problems.append(
                    Problem(vid, "parent", f"{version_name(child)}'s parent "
                            f"{version_name(parent)} is not in the store")  # fmt: skip
                )
                return
            chain.append(parent)
            child = parent
        rooted.update(chain)

    def _verify_index(self, txn: lmdb.Transaction, report: VerifyReport, checked: set[str]):
        with txn.cursor(db=self._dbs[fmt.DB_BLOBS]) as cur:
            for key, entry in cur:
                digest = bytes(key).hex()
                if digest in checked:
                    continue
                try:
                    location = decode_entry(entry, digest)
                    view = self._entry_bytes(txn, location, digest)
                    check = None if isinstance(location, EncodedBlob) else location.xxh3
                    problem = _chunk_problem(view, digest, location.nbytes, check, True)
                except CorruptionError as e:
                    problem = str(e)
                if problem:
                    report.problems.append(Problem(None, f"blob {digest[:12]}", problem))
                else:
                    report.blobs += 1
                    report.bytes += location.nbytes

    def gc(self, *, keep_last: int | None = None, drop: Iterable[VersionSpec] = ()) -> GcReport:
        """Delete unreachable data; with ``keep_last``, also old versions.

        Never deletes HEAD, a tagged version, or anything a kept version references,
        including every base blob a kept version's delta chains need (a dropped
        version's blobs stay as long as a kept version is coded against them; weights
        served from a dropped version's checkpoint file are copied into a pack first).
        Collects packs and checkpoint files left by interrupted commits, and rewrites
        packs that are mostly garbage so their space is returned to the file system.

        Args:
            keep_last: keep only the ``keep_last`` newest versions (plus HEAD and tagged
                ones). ``None`` keeps every version.
            drop: versions to delete as well (never HEAD or a tagged version: that
                raises ``ValueError``).

        Raises:
            CorruptionError: a kept manifest is unreadable (gc deletes nothing then).
        """
        if keep_last is not None and keep_last < 0:
            raise ValueError("keep_last must be >= 0")
        with self._read() as txn:
            ids = self._version_ids(txn)
            pinned = set(self._tags(txn).values())
            head = self._ref(txn, fmt.HEAD_REF)
            if head is not None:
                pinned.add(head)
            kept = set(ids) if keep_last is None else pinned | set(ids[len(ids) - keep_last :])
            dropping = {self._resolve(txn, v) for v in drop}
            if dropping & pinned:
                names = ", ".join(version_name(v) for v in sorted(dropping & pinned))
                raise ValueError(f"cannot drop {names}: HEAD and tagged versions are kept")
        kept -= dropping
        return self._collect(kept, repack_at=0.5, sweep_samples=True)

    def _collect(self, kept: set[int], *, repack_at: float, sweep_samples: bool) -> GcReport:
        """Drop versions not in ``kept`` and everything no kept version needs.

        A pack whose garbage (bytes no index entry needs) is at least ``repack_at`` of
        its size is rewritten with only its live blobs.
        """
        blob_dir = self.path / fmt.BLOB_DIR
        with self._read() as txn:
            ids = self._version_ids(txn)
            kept &= set(ids)
            live: set[bytes] = set()
            live_files: set[str] = set()
            live_samples: set[int] = set()
            def parent_of(vid: int) -> int | None:
                try:
                    return self._manifest(txn, vid)["parent"]
                except EngramError:  # a dropped version's unreadable manifest: no ancestor
                    return None

            relink = _relinks(kept, set(ids) - kept, parent_of)
            for vid in kept:
                manifest = self._manifest(txn, vid)
                records = iter_array_records(manifest["state"])
                for record in records:
                    if record.kind == TAG_SAMPLES:
                        refs = self._read_array(txn, record, vid, "sample ids", verify=False)
                        live_samples.update(refs.tolist())
                if manifest.get("model") is not None:
                    records += iter_array_records(manifest["model"]["tensors"])
                for record in records:
                    live.update(bytes.fromhex(c[0]) for c in record.chunks)
                if manifest["checkpoint"] is not None:
                    live_files.add(manifest["checkpoint"]["file"])
            entries: dict[bytes, IndexEntry] = {}
            with txn.cursor(db=self._dbs[fmt.DB_BLOBS]) as cur:
                for key, entry in cur:
                    key = bytes(key)
                    entries[key] = decode_entry(entry, key.hex())
            # The bases of live delta-coded blobs are live too, transitively.
            stack = [d for d in live if d in entries]
            while stack:
                entry = entries[stack.pop()]
                if isinstance(entry, EncodedBlob) and entry.base and entry.base not in live:
                    live.add(entry.base)
                    stack.append(entry.base)
            next_pack = int(bytes(txn.get(b"next_pack", db=self._dbs[fmt.DB_META])))
        dropped = tuple(sorted(set(ids) - kept))
        dead = [key for key in entries if key not in live]
        dead_bytes = sum(entries[key].nbytes for key in dead)
        # Weights served from a file no kept version names move into a pack.
        rehome = [
            (key, entry)
            for key, entry in entries.items()
            if key in live and isinstance(entry, FileBlob) and entry.file not in live_files
        ]
        live_by_pack: dict[int, list[tuple[bytes, IndexEntry, BlobLocation]]] = {}
        for key in live:
            entry = entries.get(key)
            location = entry.stored if isinstance(entry, EncodedBlob) else entry
            if isinstance(location, BlobLocation):
                live_by_pack.setdefault(location.pack, []).append((key, entry, location))
        repack = {}
        for pack, items in live_by_pack.items():
            try:
                size = (blob_dir / pack_name(pack)).stat().st_size
            except FileNotFoundError:
                continue  # verify reports it; nothing to rewrite
            garbage = size - sum(-(-loc.nbytes // ALIGN) * ALIGN for _, _, loc in items)
            if garbage > ALIGN and garbage >= repack_at * size:
                repack[pack] = items
        moved: list[tuple[bytes, bytes]] = []
        if repack or rehome:
            writer = PackWriter(blob_dir, next_pack)
            try:
                for items in repack.values():
                    for key, entry, location in items:
                        view = self._packs.view(location, key.hex())
                        new = writer.append(view, location.xxh3)
                        if isinstance(entry, EncodedBlob):
                            moved.append((key, entry.moved(new).encode()))
                        else:
                            moved.append((key, new.encode()))
                for key, entry in rehome:
                    view = self._files.view(entry, key.hex())
                    moved.append((key, writer.append(view, entry.xxh3).encode()))
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            fsync_dir(blob_dir)

        def sweep(txn: lmdb.Transaction) -> int:
            for vid, parent in relink.items():  # the tree stays a tree: see _relinks
                manifest = self._manifest(txn, vid)
                manifest["parent"] = parent
                payload = json.dumps(manifest, separators=(",", ":")).encode()
                txn.put(_vkey(vid), payload, db=self._dbs[fmt.DB_VERSIONS])
            for vid in dropped:
                txn.delete(_vkey(vid), db=self._dbs[fmt.DB_VERSIONS])
            for key in dead:
                txn.delete(key, db=self._dbs[fmt.DB_BLOBS])
            for key, entry in moved:
                txn.put(key, entry, db=self._dbs[fmt.DB_BLOBS])
            if moved:
                txn.put(b"next_pack", str(next_pack + 1).encode(), db=self._dbs[fmt.DB_META])
            return self.samples.sweep(txn, live_samples) if sweep_samples else 0

        samples_gone = self._write(sweep, reserve=96 * len(moved) + 4096 * len(relink))
        # Only now, with the index committed, may files go: first packs nothing references.
        referenced = (set(live_by_pack) - set(repack)) | ({next_pack} if moved else set())
        removed = []
        for file in sorted(os.listdir(blob_dir)):
            m = PACK_NAME.fullmatch(file)
            if m and int(m.group(1)) not in referenced:
                self._packs.forget(int(m.group(1)))
                (blob_dir / file).unlink(missing_ok=True)
                removed.append(f"{fmt.BLOB_DIR}/{file}")
        for file in sorted(os.listdir(self.path / fmt.CHECKPOINT_DIR)):
            if _CHECKPOINT_LEFTOVER.fullmatch(file) and file not in live_files:
                self._files.forget(file)
                (self.path / fmt.CHECKPOINT_DIR / file).unlink(missing_ok=True)
                removed.append(f"{fmt.CHECKPOINT_DIR}/{file}")
        return GcReport(dropped, len(dead), dead_bytes, tuple(removed), samples_gone)

    # -------------------------------------------------------------- compaction

    def compact(self, *, tagged: bool = False) -> CompactReport:
        """Delta-code the history so it costs a small multiple of one version on disk.

        Every version except HEAD (and, unless ``tagged=True``, tagged versions) is
        rewritten: its model weights move from their plain safetensors file into the
        blob store and the file is deleted; each changed chunk of its weights and
        state is stored as a zstd frame of its difference to the same chunk of its
        *base* — its neighbour towards HEAD in the history tree (the child on HEAD's
        lineage). Unchanged chunks are shared by content address, as always. HEAD's
        file and blobs stay plain, so restoring HEAD is as fast as before; any
        version still restores bit-exactly through :meth:`load`. Chains are cut by
        keyframes after :data:`~engram.store.delta.MAX_CHAIN` deltas.

        Crash-safe: new blobs are written to a new pack first, then one LMDB
        transaction swaps index entries and manifests, then old files are removed (as
        :meth:`gc` does). Call it again after more commits: the previous HEAD is then
        compacted too. Replay samples are never touched.

        Args:
            tagged: compact tagged versions too (by default they keep a plain file).
        """
        self._check_usable()
        if self.mode == "r":
            raise ReadOnlyStoreError(f"store {self.path} was opened read-only; use mode='w'")
        ckpt_dir = self.path / fmt.CHECKPOINT_DIR
        with self._read() as txn:
            head = self._ref(txn, fmt.HEAD_REF)
            if head is None:
                return CompactReport((), 0, 0, 0, ())
            manifests = {vid: self._manifest(txn, vid) for vid in self._version_ids(txn)}
            tags = self._tags(txn)
            plain = {head} if tagged else {head, *tags.values()}
            order = compaction_order(
                {v: m["parent"] for v, m in manifests.items()}, [head, *sorted(plain)]
            )
            files_of = {v: m["checkpoint"]["file"] for v, m in manifests.items() if m["checkpoint"]}
            staying_files = {files_of[v] for v in plain if v in files_of}
            spans: dict[str, tuple[list, dict[str, str]]] = {
                file: checkpoint_spans(ckpt_dir / file) for file in set(files_of.values())
            }
            tables = {v: self._chunk_table(txn, m, spans, vid=v) for v, m in manifests.items()}
            current: dict[bytes, IndexEntry] = {}

            def entry_of(digest: bytes) -> IndexEntry | None:
                if digest in pending:
                    return pending[digest]
                if digest not in current:
                    raw = txn.get(digest, db=self._dbs[fmt.DB_BLOBS])
                    current[digest] = None if raw is None else decode_entry(raw, digest.hex())
                return current[digest]

            def original(chunk: _Chunk) -> memoryview | bytes:
                """The chunk's bytes through the index as it was before this compaction."""
                raw = txn.get(chunk.digest, db=self._dbs[fmt.DB_BLOBS])
                if raw is not None:
                    return self._blob(txn, chunk.digest.hex())
                return self._files.view(chunk.source, chunk.digest.hex())

            # A chunk a plain version references keeps its form; if it is served from a
            # file that goes away, it is served from a staying file or copied plain.
            staying_source: dict[bytes, FileBlob] = {}
            plain_digests: set[bytes] = set()
            for v in plain:
                for chunk in tables[v].values():
                    plain_digests.add(chunk.digest)
                    if chunk.source is not None and chunk.source.file in staying_files:
                        staying_source.setdefault(chunk.digest, chunk.source)
            pending: dict[bytes, IndexEntry] = {}
            chunk_of: dict[bytes, _Chunk] = {}
            writer: PackWriter | None = None
            next_pack = int(bytes(txn.get(b"next_pack", db=self._dbs[fmt.DB_META])))
            stats = [0, 0, 0]  # blobs, raw bytes, stored bytes

            def store_bytes(chunk: _Chunk, data: Any, base: bytes | None, itemsize: int):
                nonlocal writer
                if writer is None:
                    writer = PackWriter(self.path / fmt.BLOB_DIR, next_pack)
                if itemsize == 0:  # plain
                    pending[chunk.digest] = writer.append(data, chunk.xxh3)
                else:
                    loc = writer.append(data, checksum(data))
                    pending[chunk.digest] = EncodedBlob(
                        CODEC_ZSTD, itemsize, base, loc.pack, loc.offset, len(data), loc.xxh3,
                        chunk.nbytes,
                    )  # fmt: skip
                stats[0] += 1
                stats[1] += chunk.nbytes
                stats[2] += len(data)

            def keep_servable(chunk: _Chunk) -> None:
                entry = entry_of(chunk.digest)
                gone = entry is None or (
                    isinstance(entry, FileBlob) and entry.file not in staying_files
                )
                if not gone:
                    return
                if chunk.digest in staying_source:
                    pending[chunk.digest] = staying_source[chunk.digest]
                else:
                    store_bytes(chunk, original(chunk), None, 0)

            def chain_depth(digest: bytes) -> int | None:
                """Deltas to decode for ``digest`` now; None past MAX_CHAIN or cyclic."""
                for depth in range(MAX_CHAIN + 1):
                    entry = entry_of(digest)
                    if not (isinstance(entry, EncodedBlob) and entry.base is not None):
                        return depth
                    digest = entry.base
                return None

            def compact_chunk(chunk: _Chunk, base: _Chunk | None) -> None:
                entry = entry_of(chunk.digest)
                if isinstance(entry, EncodedBlob):
                    return  # compacted before
                data = original(chunk)
                best, best_base = encode(data, None, chunk.itemsize), None
                if base is not None and base.nbytes == chunk.nbytes:
                    depth = chain_depth(base.digest)
                    if (
                        depth is not None
                        and depth < MAX_CHAIN
                        and not self._chain_has(entry_of, base.digest, chunk.digest)
                    ):
                        if entry_of(base.digest) is None:  # a plain version's file span
                            keep_servable(base)
                        delta = encode(data, original(base), chunk.itemsize)
                        if len(delta) < len(best):
                            best, best_base = delta, base.digest
                if len(best) <= (1 - MIN_SAVING) * chunk.nbytes:
                    store_bytes(chunk, best, best_base, chunk.itemsize)
                else:
                    keep_servable(chunk)

            compacted: list[int] = []
            try:
                for v, b in order:
                    if v in plain:
                        continue
                    if not tables[v] and manifests[v]["checkpoint"] is None:
                        continue
                    base_table = tables[b] if b is not None else {}
                    for where, chunk in tables[v].items():
                        if chunk.digest in chunk_of:
                            continue
                        chunk_of[chunk.digest] = chunk
                        if chunk.digest in plain_digests:
                            keep_servable(chunk)
                        else:
                            compact_chunk(chunk, base_table.get(where))
                    if manifests[v]["checkpoint"] is not None or any(
                        chunk.digest in pending for chunk in tables[v].values()
                    ):
                        compacted.append(v)
                for v in plain:  # HEAD's state decodes no delta (it may after a rollback)
                    for chunk in tables[v].values():
                        if isinstance(entry_of(chunk.digest), EncodedBlob):
                            store_bytes(chunk, bytes(original(chunk)), None, 0)
                        else:
                            keep_servable(chunk)
                with txn.cursor(db=self._dbs[fmt.DB_BLOBS]) as cur:
                    coded = [
                        bytes(key)
                        for key, raw in cur
                        if len(raw) != 32 and bytes(raw[:1]) == b"D"  # EncodedBlob entries
                    ]
                self._cut_long_chains([*pending, *coded], entry_of, chunk_of, original, store_bytes)
                if writer is not None:
                    writer.finish()
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
        if writer is not None:
            fsync_dir(self.path / fmt.BLOB_DIR)
        new_manifests = {}
        for v in compacted:
            m = manifests[v]
            if m["checkpoint"] is None:
                continue
            file = m["checkpoint"]["file"]
            table = tables[v]
            tensors = []
            for span in spans[file][0]:
                chunks = [
                    [c.digest.hex(), c.nbytes, c.xxh3]
                    for i in range(-(-span.nbytes // fmt.CHUNK_BYTES))
                    for c in [table[f"model/{span.name}#{i}"]]
                ]
                record = {"dtype": span.dtype, "shape": list(span.shape), "chunks": chunks}
                tensors.append([span.name, {TAG_TENSOR: record}])
            new_manifests[v] = dict(
                m,
                format_version=fmt.FORMAT_VERSION,
                checkpoint=None,
                model={
                    "file": file,
                    "weights": m["checkpoint"]["weights"],
                    "metadata": spans[file][1],
                    "tensors": {TAG_MAP: tensors},
                },
            )
        payloads = {
            v: json.dumps(m, separators=(",", ":")).encode() for v, m in new_manifests.items()
        }

        def swap(txn: lmdb.Transaction) -> None:
            for digest, entry in pending.items():
                txn.put(digest, entry.encode(), db=self._dbs[fmt.DB_BLOBS])
            for v, payload in payloads.items():
                txn.put(_vkey(v), payload, db=self._dbs[fmt.DB_VERSIONS])
            meta_db = self._dbs[fmt.DB_META]
            if writer is not None:
                txn.put(b"next_pack", str(next_pack + 1).encode(), db=meta_db)
            if pending or payloads:
                txn.put(b"format_version", str(fmt.FORMAT_VERSION).encode(), db=meta_db)

        if pending or payloads:
            self._write(swap, reserve=128 * len(pending) + sum(len(p) for p in payloads.values()))
        report = self._collect(set(manifests), repack_at=0.25, sweep_samples=False)
        return CompactReport(tuple(sorted(compacted)), *stats, report.files)

    @staticmethod
    def _chain_has(entry_of: Callable, start: bytes, target: bytes) -> bool:
        """Whether ``target`` is on the delta chain from ``start`` (coding against it
        would make a cycle)."""
        digest: bytes | None = start
        for _ in range(MAX_CHAIN + 2):
            if digest is None:
                return False
            if digest == target:
                return True
            entry = entry_of(digest)
            digest = entry.base if isinstance(entry, EncodedBlob) else None
        return True

    def _cut_long_chains(self, digests, entry_of, chunk_of, original, store_bytes) -> None:
        """Re-encode as a keyframe every blob whose delta chain would exceed MAX_CHAIN.

        Chains grow when a base that was stored as is (a former HEAD's weights) is
        itself delta-coded; each blob's depth is settled after its base's, so a cut
        shortens the chains of everything coded against it.
        """
        depth: dict[bytes, int] = {}

        def cut(node: bytes) -> None:
            entry = entry_of(node)
            chunk = chunk_of.get(node) or _Chunk(node, entry.nbytes, 0, entry.itemsize, None)
            data = bytes(original(chunk))
            frame = encode(data, None, entry.itemsize)
            if len(frame) < len(data):
                store_bytes(chunk, frame, None, entry.itemsize)
            else:
                store_bytes(dataclasses.replace(chunk, xxh3=checksum(data)), data, None, 0)

        for start in digests:
            path: list[bytes] = []
            on_path: set[bytes] = set()
            digest = start
            while digest not in depth:
                entry = entry_of(digest)
                if not (isinstance(entry, EncodedBlob) and entry.base is not None):
                    depth[digest] = 0
                elif digest in on_path:  # a cycle: cut it here
                    cut(digest)
                    depth[digest] = 0
                else:
                    path.append(digest)
                    on_path.add(digest)
                    digest = entry.base
            d = depth[digest]
            for node in reversed(path):
                if node in depth:  # the point where a cycle was cut
                    d = depth[node]
                    continue
                d += 1
                if d > MAX_CHAIN:
                    cut(node)
                    d = 0
                depth[node] = d

    def _chunk_table(
        self, txn: lmdb.Transaction, manifest: dict, spans: dict, *, vid: int
    ) -> dict[str, _Chunk]:
        """Every chunk of a version's state and weights, keyed ``path#index``."""
        table: dict[str, _Chunk] = {}
        for path, record in _version_records(manifest):
            size = _element_size(record)
            for i, (digest, nbytes, check) in enumerate(record.chunks):
                table[f"{path}#{i}"] = _Chunk(
                    bytes.fromhex(digest), nbytes, check, itemsize_for(size, nbytes), None
                )
        if manifest["checkpoint"] is not None:
            file = manifest["checkpoint"]["file"]
            size_of = {name: t.itemsize for name, t in TORCH_DTYPES.items()}
            view = self._files.view(
                FileBlob(file, 0, manifest["checkpoint"]["nbytes"], 0), f"{vid}"
            )
            for span in spans[file][0]:
                for i, off in enumerate(range(0, span.nbytes, fmt.CHUNK_BYTES)):
                    n = min(fmt.CHUNK_BYTES, span.nbytes - off)
                    piece = view[span.offset + off : span.offset + off + n]
                    digest, check = _hash_chunk(piece)
                    table[f"model/{span.name}#{i}"] = _Chunk(
                        digest,
                        n,
                        check,
                        itemsize_for(size_of[span.dtype], n),
                        FileBlob(file, span.offset + off, n, check),
                    )
        return table


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def _hash_chunk(view: np.ndarray) -> tuple[bytes, int]:
    return hashlib.sha256(view).digest(), checksum(view)


def _chunk_problem(
    view: Any, digest: str, size: int, check: int | None, verify: bool
) -> str | None:
    if view is None:
        return f"chunk {digest[:12]} is missing"
    if len(view) != size:
        return f"chunk {digest[:12]} has {len(view)} bytes, expected {size}"
    if check is not None and checksum(view) != check:
        return f"chunk {digest[:12]} fails its checksum"
    if verify and hashlib.sha256(view).hexdigest() != digest:
        return f"chunk {digest[:12]} fails its SHA-256 content hash"
    return None


def _version_records(manifest: dict) -> list[tuple[str, ArrayRecord]]:
    """(path, record) of every array of a version: its state, then compacted weights."""
    records: list[tuple[str, ArrayRecord]] = []
    decode_tree(manifest["state"], lambda r, path: records.append((path, r)))
    if manifest.get("model") is not None:
        decode_tree(
            manifest["model"]["tensors"], lambda r, path: records.append((f"model{path}", r))
        )
    return records


def _element_size(record: ArrayRecord) -> int:
    if record.kind == TAG_NDARRAY:
        return NUMPY_DTYPES[record.dtype].itemsize
    return TORCH_DTYPES[record.dtype].itemsize


def _relinks(
    kept: set[int], dropped: set[int], parent_of: Callable[[int], int | None]
) -> dict[int, int | None]:
    """New parents for kept versions whose parent is dropped: the nearest kept ancestor
    (None when every ancestor goes), so ``HEAD~N``, diffs and rollbacks keep working
    after mid-experience versions are pruned. A parent that is already missing (a store
    pruned by an older engram) is left as it is: ``verify`` reports it."""
    out: dict[int, int | None] = {}
    for vid in kept:
        parent, seen = parent_of(vid), {vid}
        if parent not in dropped:
            continue
        while parent in dropped and parent not in seen:  # a cycle ends the walk
            seen.add(parent)
            parent = parent_of(parent)
        out[vid] = None if parent in seen else parent
    return out


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_manifest(m: Any, vid: int) -> None:
    def bad(why: str) -> CorruptionError:
        return CorruptionError(f"{version_name(vid)}: malformed manifest: {why}")

    if not isinstance(m, dict):
        raise bad("not a JSON object")
    fv = m.get("format_version")
    if not isinstance(fv, int) or isinstance(fv, bool):
        raise bad("format_version missing")
    if fv > fmt.FORMAT_VERSION:
        raise StoreFormatError(
            f"{version_name(vid)} was written in format version {fv}; upgrade engram to read it"
        )
    if m.get("id") != vid:
        raise bad(f"id {m.get('id')!r} does not match its key")
    parent = m.get("parent")
    if parent is not None and not _is_count(parent):
        raise bad("parent must be a version id or null")
    for key, typ in (("created_at", str), ("message", str), ("meta", dict)):
        if not isinstance(m.get(key), typ):
            raise bad(f"{key} must be a {typ.__name__}")
    for key in ("nbytes", "new_bytes"):
        if not _is_count(m.get(key)):
            raise bad(f"{key} must be a non-negative integer")
    if "state" not in m:
        raise bad("state missing")
    ckpt = m.get("checkpoint")
    if ckpt is not None:
        if not (
            isinstance(ckpt, dict) and set(ckpt) == {"file", "sha256", "nbytes", "xxh3", "weights"}
        ):
            raise bad("checkpoint must hold file, sha256, nbytes, xxh3, weights")
        if not (
            isinstance(ckpt["weights"], str) and re.fullmatch(r"[0-9a-f]{32}", ckpt["weights"])
        ):
            raise bad("checkpoint weights digest is malformed")
        if not (isinstance(ckpt["file"], str) and _CHECKPOINT_NAME.fullmatch(ckpt["file"])):
            raise bad("checkpoint file name is not a checkpoint name")  # no path traversal
        if not (isinstance(ckpt["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", ckpt["sha256"])):
            raise bad("checkpoint sha256 is malformed")
        if not (_is_count(ckpt["nbytes"]) and _is_count(ckpt["xxh3"]) and ckpt["xxh3"] < 2**64):
            raise bad("checkpoint nbytes/xxh3 malformed")
    model = m.get("model")
    if model is not None:
        if ckpt is not None or fv < 2:
            raise bad("a compacted model needs format version 2 and no checkpoint file")
        if not (
            isinstance(model, dict) and set(model) == {"file", "weights", "metadata", "tensors"}
        ):
            raise bad("model must hold file, weights, metadata, tensors")
        if not (isinstance(model["file"], str) and _CHECKPOINT_NAME.fullmatch(model["file"])):
            raise bad("model file name is not a checkpoint name")
        weights = model["weights"]
        if not (isinstance(weights, str) and re.fullmatch(r"[0-9a-f]{32}", weights)):
            raise bad("model weights digest is malformed")
        metadata = model["metadata"]
        if not (
            isinstance(metadata, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise bad("model metadata must map strings to strings")
        if not (isinstance(model["tensors"], dict) and set(model["tensors"]) == {TAG_MAP}):
            raise bad("model tensors must be a map of tensors")


def _check_memory(nbytes: int, vid: int) -> None:
    """Refuse a load that could not fit in memory instead of letting the OS kill us."""
    try:
        with open("/proc/meminfo") as f:
            available = next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration, ValueError, IndexError):
        return
    if nbytes > available:
        raise EngramError(
            f"{version_name(vid)} holds {nbytes / 2**30:.1f} GiB of state, more than the "
            f"{available / 2**30:.1f} GiB of memory available; load it with state=False or on "
            "a larger machine"
        )
