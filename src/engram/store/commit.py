"""The commit protocol (:mod:`engram.store.format`): its three steps.

1. :meth:`Blobs.write_new <engram.store.blobs.Blobs.write_new>`: the chunks the store
   lacks, appended to a new pack file, fsynced;
2. :class:`_Checkpoint`: the checkpoint file, written to a temporary name while it is
   hashed, fsynced, renamed (unless the parent's holds the same weights) — or a model
   artifact's file (:func:`_write_artifact_durably`), the same way;
3. :func:`_publish`: one LMDB write transaction that makes the version visible.

(1) and (2) run at the same time (hashing, file writes and fsyncs release the GIL),
the chunks' hashing on the cores the checkpoint file's leaves (:class:`_HashLanes`),
and the disk writes each file as it is written (:mod:`engram.store.writeback`).
A crash before (3) leaves HEAD where it was; what (1) and (2) wrote is left to ``gc``.

The state is encoded once (2) has started, and a :class:`~engram.store.codec.Later`
value of it is produced after the rest is encoded: what produces it — a data-parallel
commit receiving the other ranks' parts — runs while the weights are written and
fsynced instead of before (that fsync is most of a small commit).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb

from engram import __version__
from engram.errors import (
    CommitError,
    CorruptionError,
    EncodingError,
    EngramError,
    VersionNotFoundError,
)
from engram.faults import remedy
from engram.store import format as fmt
from engram.store.artifact import Artifact, ArtifactInfo, model_file_name, write_artifact
from engram.store.blobs import Blobs, chunk_digest
from engram.store.checkpoint import (
    CheckpointInfo,
    fsync_dir,
    prepare_weights,
    weights_digest,
    write_checkpoint,
)
from engram.store.codec import (
    TAG_MAP,
    Later,
    PendingArray,
    SharedArrays,
    encode_tree,
    iter_array_records,
)
from engram.store.env import Env, now
from engram.store.history import History, is_valid_tag_name, manifest_bytes, version_info
from engram.store.samples import SampleTable
from engram.store.signing import Signer, signature_key
from engram.store.values import NEW_VERSION, RefMoves, VersionInfo, version_name

if TYPE_CHECKING:
    import torch

_INLINE_HASH_BYTES = 4 << 20  # a state up to this size is hashed in the committing thread


def commit(
    env: Env,
    history: History,
    blobs: Blobs,
    samples: Any,
    state: Mapping[str, Any] | None,
    model: torch.nn.Module | Mapping[str, torch.Tensor] | None,
    *,
    message: str,
    meta: Mapping[str, Any] | None,
    artifact: Artifact | None = None,
    refs: RefMoves | None = None,
    signer: Signer | None = None,
) -> VersionInfo:
    """:meth:`Store.commit <engram.store.Store.commit>`; ``samples``: ``store.samples``
    (a :class:`SampleTable`, or a background committer's wrapper of one); ``signer``:
    signs the manifest (:mod:`engram.store.signing`)."""
    env.check_writable()
    refs = _checked_refs(refs)
    if state is not None and not isinstance(state, Mapping):
        raise EncodingError(f"state must be a mapping, not {type(state).__qualname__}")
    state = dict(state or {})
    for key, value in state.items():
        if isinstance(value, Later) and not (isinstance(key, str) and not key.startswith("__")):
            raise EncodingError(f"a Later value needs a plain str key, not {key!r}")
    if artifact is not None:
        if not isinstance(artifact, Artifact):
            raise EncodingError(f"artifact must be an Artifact, not {type(artifact).__name__}")
        if model is not None:
            raise EncodingError("a version holds model weights or a model artifact, not both")
        if not env.sealed:
            raise EngramError(
                f"{env.path} was made by an older engram: run `engram upgrade {env.path}` "
                "before committing a model artifact to it"
            )
    try:
        # as the manifest will hold it, so the VersionInfo built here is what a read gives
        meta = json.loads(json.dumps(dict(meta or {}), allow_nan=True))
    except (TypeError, ValueError) as e:
        raise EncodingError(f"meta must be JSON-serializable: {e}") from None
    weights = None
    if model is not None:
        import torch  # only for a model: keeps the inspection commands (engram ls...) light

        weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
        weights = prepare_weights(weights)
    try:
        return _commit(
            env, history, blobs, samples, state, (weights, artifact), message, meta, refs, signer
        )
    except (OSError, lmdb.Error) as e:
        head = _reopen_after_failure(env, history)
        raise CommitError(
            f"commit to {env.path} failed: {e}. HEAD is still "
            f"{version_name(head) if head is not None else '(empty)'}; "
            f"{remedy(e)}, then commit again"
        ) from e


@dataclass(frozen=True)
class _NewVersion:
    """What a commit knows of its version before it writes anything."""

    id: int
    parent: int | None  # HEAD when the commit began
    pack_id: int  # of the pack its new blobs go to
    created_at: str
    meta: dict[str, Any]


def _commit(
    env: Env,
    history: History,
    blobs: Blobs,
    samples: Any,
    state: dict[Any, Any],
    model: tuple[dict[str, torch.Tensor] | None, Artifact | None],
    message: str,
    meta: dict[str, Any],
    refs: RefMoves,
    signer: Signer | None,
) -> VersionInfo:
    with env.read() as txn:
        if isinstance(refs.head, int) and not history.has(txn, refs.head):
            raise VersionNotFoundError(
                f"store {env.path} has no version {version_name(refs.head)} to leave HEAD on"
            )
        new = _NewVersion(
            id=env.counter(txn, b"next_version"),
            parent=history.head(txn),
            pack_id=env.counter(txn, b"next_pack"),
            created_at=now(),
            meta=meta,
        )
    weights, artifact = model
    lanes = _HashLanes(_hash_workers(), reserve=weights is not None)
    with _Checkpoint(env, history, new, weights, lanes) as ckpt_job:  # (2) starts
        tree, pending, state_bytes = _encode(state)  # while the weights are written
        # Replay samples this version may reference must be durable no later than it:
        # they go into the transaction that publishes it (one synced transaction, not
        # two). A wrapped table (a background committer's, shared by two threads) is
        # flushed on its own, under its lock. (After the state: producing it may add some.)
        table = samples if isinstance(samples, SampleTable) else None
        if table is None:
            samples.flush()
        sample_items = table.pending_items() if table is not None else []
        index, new_bytes = _write_blobs(env, history, blobs, new, pending, lanes)  # (1)
        ckpt = ckpt_job.result()
    if ckpt is not None and ckpt_job.written:
        new_bytes += ckpt.nbytes
    art = None
    if artifact is not None:  # small next to the state (an estimator): after it
        art = _write_artifact_durably(env.path / fmt.CHECKPOINT_DIR, new, artifact)
        new_bytes += art.nbytes
    manifest = {
        "format_version": fmt.PLAIN_FORMAT_VERSION if art is None else fmt.ARTIFACT_FORMAT_VERSION,
        "engram_version": __version__,
        "store_id": env.store_id,
        "id": new.id,
        "parent": new.parent,
        "created_at": new.created_at,
        "message": message,
        "meta": meta,
        "state": tree,
        "checkpoint": None if ckpt is None else ckpt.to_json(),
        "nbytes": state_bytes + (ckpt.nbytes if ckpt else 0),
        "new_bytes": new_bytes,
    }
    if art is not None:
        manifest["artifact"] = art.to_json()
        manifest["nbytes"] += art.nbytes
    tags = refs.tag_names(new.id)
    signature = signer.sign(manifest) if signer is not None else None
    _publish(
        env,
        history,
        blobs,
        (table, sample_items),
        (manifest, signature),
        index,
        new.pack_id,
        (refs.head, tags),
    )  # (3)
    _remember_chunks(env, new.id, pending)
    return version_info(manifest, dict.fromkeys(tags, new.id))


def _encode(state: dict[Any, Any]) -> tuple[Any, list[PendingArray], int]:
    """:func:`encode_tree` of ``state``, its :class:`Later` values produced and encoded
    after the rest: the tree is the one encoding in one pass gives (keys in ``state``'s
    order); the late values' arrays come after the others'. A tensor met twice is one
    array under one record. Returns the tree, the arrays and the state's bytes (each
    place counted)."""
    shared = SharedArrays()
    eager = {k: v for k, v in state.items() if not isinstance(v, Later)}
    tree, pending = encode_tree(eager, shared)
    pairs = tree.get(TAG_MAP) if isinstance(tree, dict) else None  # non-str keys: pairs
    items = iter(pairs if pairs is not None else tree.items())
    merged = []
    for key, value in state.items():
        if isinstance(value, Later):
            late, more = encode_tree({key: value.produce()}, shared)
            merged.append([key, late[key]])
            pending += more
        else:
            merged.append(list(next(items)))
    nbytes = sum(len(p.raw) for p in pending) + shared.reused_bytes
    return ({TAG_MAP: merged} if pairs is not None else dict(merged)), pending, nbytes


class _Checkpoint:
    """Step (2) in a thread of its own, from entering until :meth:`result`: the weights'
    digest, then the checkpoint file (or the parent's, when it holds the same weights).

    Leaving the block on an error waits for the thread and deletes a file it wrote: no
    version will reference it.
    """

    def __init__(
        self, env: Env, history: History, new: _NewVersion, weights: dict | None, lanes: _HashLanes
    ) -> None:
        self._env, self._history, self._new, self._weights = env, history, new, weights
        self._lanes = lanes
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future[tuple[CheckpointInfo, bool]] | None = None

    def __enter__(self) -> _Checkpoint:
        if self._weights is None:
            return self
        parent = _parent_checkpoint(self._env, self._history, self._new.parent)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-ckpt")
        self._job = self._pool.submit(self._write, parent)
        return self

    def _write(self, parent: CheckpointInfo | None) -> tuple[CheckpointInfo, bool]:
        """The checkpoint and whether it is a new file (not the parent's)."""
        try:
            digest = weights_digest(self._weights)  # XXH3, ~18 GiB/s: little next to the write
            if parent is not None and parent.weights == digest:
                return parent, False
            env, new = self._env, self._new
            info = _write_checkpoint_durably(
                env.path / fmt.CHECKPOINT_DIR,
                model_file_name(new.id, new.meta.get("experience"), "safetensors"),
                self._weights,
                _checkpoint_metadata(env, new),
                digest,
            )
            return info, True
        finally:  # its hashes are done (or not needed): their core goes to the chunks
            self._lanes.release()

    @property
    def written(self) -> bool:
        """A new file (not the parent's); after :meth:`result`."""
        return self._job is not None and self._job.result()[1]

    def result(self) -> CheckpointInfo | None:
        return self._job.result()[0] if self._job is not None else None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
        if self._pool is None:
            return
        self._pool.shutdown(wait=True)
        if error is not None and self._job.exception() is None and self.written:
            (self._env.path / fmt.CHECKPOINT_DIR / self.result().file).unlink(missing_ok=True)


class _HashLanes:
    """How many of the state's chunks are hashed at once: one core fewer than there are
    while the checkpoint file is hashed, all of them after.

    The file's SHA-256 is one sequential stream, the chunks' are independent. Shared
    fairly, N chunk threads and the file's thread give the file N/(N+1) of a core, so it
    ends last, alone (10^8 parameters on 2 cores: the chunks hashed by 0.35 s, the file
    by 0.51 s); with a core of its own from the start, both end together.
    """

    def __init__(self, workers: int, *, reserve: bool) -> None:
        self.workers = workers
        self._reserved = reserve and workers > 1  # one lane kept for the checkpoint file
        self._free = threading.Semaphore(workers - self._reserved)
        self._lock = threading.Lock()

    def hash(self, view: Any) -> bytes:
        """:func:`chunk_digest` of ``view`` in a free lane."""
        with self._free:
            return chunk_digest(view)

    def release(self) -> None:
        """The checkpoint file needs no lane any more (idempotent)."""
        with self._lock:
            if self._reserved:
                self._reserved = False
                self._free.release()


def _hash_workers() -> int:
    """Threads hashing a state's chunks: one a core."""
    return os.cpu_count() or 1


def _write_blobs(
    env: Env,
    history: History,
    blobs: Blobs,
    new: _NewVersion,
    pending: list[PendingArray],
    lanes: _HashLanes,
) -> tuple[list[tuple[bytes, bytes]], int]:
    """Step (1): hash the state's chunks (in ``lanes``), append the new ones to a pack
    file, fsync it (while step (2) runs: hashing, file writes and fsyncs release the
    GIL); a large state's new chunks are written while they are hashed. Returns the new
    index entries and the bytes written."""
    for p in pending:
        p.record["chunks"] = []  # filled in chunk order by Blobs.write_new
    pieces = [
        (p, p.raw[off : off + fmt.CHUNK_BYTES])
        for p in pending
        for off in range(0, len(p.raw), fmt.CHUNK_BYTES)
    ]
    # A small state is hashed in this thread: each worker started costs a GIL
    # hand-off (up to the 5 ms switch interval), more than hashing a few MiB.
    inline = _hashed_inline(pending)
    with ThreadPoolExecutor(max_workers=1 if inline else lanes.workers) as pool:
        # The same memory under two array objects (views of one buffer) is hashed once:
        # ``pending`` keeps every array alive, so an address is not reused.
        seen: dict[tuple[int, int], Future[Any]] = {}
        digests = []
        for _, view in pieces:
            key = (view.__array_interface__["data"][0], len(view))
            if key not in seen or not len(view):
                seen[key] = _done(chunk_digest(view)) if inline else pool.submit(lanes.hash, view)
            digests.append(seen[key])
        # A small state is hashed already: each chunk is written once known to be new.
        likely = None if inline else _parent_chunks(env, history, new.parent)
        index, new_bytes = blobs.write_new(pieces, digests, new.pack_id, likely)
        if index:  # a new pack file: its directory entry, while the checkpoint's runs
            fsync_dir(env.path / fmt.BLOB_DIR)
    return index, new_bytes


def _publish(
    env: Env,
    history: History,
    blobs: Blobs,
    samples: tuple[SampleTable | None, list[tuple[int, bytes]]],
    signed: tuple[dict[str, Any], bytes | None],
    index: list[tuple[bytes, bytes]],
    pack_id: int,
    refs: tuple[int | str | None, tuple[str, ...]],
) -> None:
    """Step (3): one transaction makes the version visible: pending replay samples
    (``samples``: the table and its items), index, manifest and its signature record
    (``signed``; None: unsigned), HEAD and tags (``refs``: where HEAD goes and the tags
    naming the version), counters. The signature goes in with the manifest: a signed
    store never shows a signed version unsigned, even for an instant."""
    manifest, signature = signed
    vid = manifest["id"]
    payload = manifest_bytes(manifest)
    table, sample_items = samples

    def publish(txn: lmdb.Transaction) -> None:
        if sample_items:
            table.put(txn, sample_items)
        for digest, entry in index:
            blobs.put(txn, digest, entry)
        history.put_manifest(txn, vid, payload)
        if signature is not None:
            env.put(txn, fmt.DB_META, signature_key(vid), signature)
        head, tags = refs
        for name in tags:
            history.set_tag(txn, name, vid)
        if head == NEW_VERSION:
            history.set_head(txn, vid)
        elif head is None:
            history.reset_head(txn)
        else:
            history.set_head(txn, head)
        if "artifact" in manifest:  # an older engram then refuses the store, cleanly
            env.raise_format(txn, fmt.ARTIFACT_FORMAT_VERSION)
        env.set_counter(txn, b"next_version", vid + 1)
        if index:
            env.set_counter(txn, b"next_pack", pack_id + 1)

    sample_bytes = sum(len(r) + 64 for _, r in sample_items)
    env.write(publish, reserve=len(payload) + 64 * len(index) + sample_bytes)
    if sample_items:
        table.forget(sample_items)


def _checked_refs(refs: RefMoves | None) -> RefMoves:
    """``refs`` (default: HEAD to the new version), refused before anything is written."""
    if refs is None:
        return RefMoves()
    if not isinstance(refs, RefMoves):
        raise EncodingError(f"refs must be a RefMoves, not {type(refs).__name__}")
    head = refs.head
    if not (head is None or head == NEW_VERSION or (isinstance(head, int) and head >= 0)):
        raise ValueError(f"RefMoves.head must be a version id, None or 'new', not {head!r}")
    for name in refs.tag_names(0):
        if not is_valid_tag_name(name):
            raise ValueError(f"invalid tag name {name!r} in RefMoves.tags")
    return refs


def _write_artifact_durably(directory: Path, new: _NewVersion, artifact: Artifact) -> ArtifactInfo:
    """Step (2) for a model artifact: the file, then an fsync of its directory."""
    file = model_file_name(new.id, new.meta.get("experience"), artifact.format)
    info = write_artifact(directory, file, artifact)
    fsync_dir(directory)
    return info


def _write_checkpoint_durably(directory: Path, file: str, *args: Any) -> CheckpointInfo:
    """:func:`write_checkpoint`, then an fsync of its directory (the new name)."""
    info = write_checkpoint(directory, file, *args)
    fsync_dir(directory)
    return info


#: store id -> (the version this process committed last, its chunks' checksums and
#: sizes), for a large state only: the next commit's parent, most often, whose manifest
#: then needs no parsing (~40 ms for 1,000 records on a loaded 2-core VM). Versions
#: never change, so an entry is right for as long as it is there.
_LAST_CHUNKS: dict[str, tuple[int, frozenset[tuple[int, int]]]] = {}


def _hashed_inline(pending: list[PendingArray]) -> bool:
    """Whether a state's chunks are hashed in the committing thread (and so are written
    once known to be new, with no guess from the parent's)."""
    return sum(len(p.raw) for p in pending) <= _INLINE_HASH_BYTES


def _chunk_keys(chunk_lists: Any) -> frozenset[tuple[int, int]]:
    """The (XXH3, size) of every chunk in records' ``[digest, size, xxh3]`` lists."""
    return frozenset((check, size) for chunks in chunk_lists for _, size, check in chunks)


def _remember_chunks(env: Env, version: int, pending: list[PendingArray]) -> None:
    if not _hashed_inline(pending):
        _LAST_CHUNKS[env.store_id] = (version, _chunk_keys(p.record["chunks"] for p in pending))


def _parent_chunks(env: Env, history: History, parent: int | None) -> frozenset[tuple[int, int]]:
    """The XXH3 checksums and sizes of the parent version's state chunks: the chunks a
    commit will most likely find stored (:meth:`Blobs.write_new`). Only a guess, so a
    parent whose manifest cannot be read gives none."""
    if parent is None:
        return frozenset()
    last = _LAST_CHUNKS.get(env.store_id)
    if last is not None and last[0] == parent:
        return last[1]
    try:
        with env.read() as txn:
            tree = history.manifest(txn, parent)["state"]
        records = iter_array_records(tree)
    except CorruptionError:
        return frozenset()
    return _chunk_keys(r.chunks for r in records)


def _parent_checkpoint(env: Env, history: History, parent: int | None) -> CheckpointInfo | None:
    """The parent's checkpoint, if it has one and its file is still there (a version
    whose weights equal the parent's shares that file)."""
    if parent is None:
        return None
    with env.read() as txn:
        ckpt = history.manifest(txn, parent)["checkpoint"]
    if ckpt is None:
        return None
    path = env.path / fmt.CHECKPOINT_DIR / ckpt["file"]
    if not path.is_file() or path.stat().st_size != ckpt["nbytes"]:
        return None
    return CheckpointInfo(**ckpt)


def _checkpoint_metadata(env: Env, new: _NewVersion) -> dict[str, str]:
    """The safetensors metadata of a new checkpoint file."""
    out = {
        "format": "engram",
        "engram_version": __version__,
        "store_id": env.store_id,
        "version": version_name(new.id),
        "parent": "" if new.parent is None else version_name(new.parent),
        "created_at": new.created_at,
    }
    meta = new.meta
    for key in ("experience", "strategy"):
        if key in meta and isinstance(meta[key], int | str) and not isinstance(meta[key], bool):
            out[key] = str(meta[key])
    return out


def _reopen_after_failure(env: Env, history: History) -> int | None:
    """After a failed write, LMDB's environment may be unusable: reopen it; HEAD's id."""
    try:
        env.reopen()
        with env.read() as txn:
            return history.head(txn)
    except EngramError:
        return None


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future
