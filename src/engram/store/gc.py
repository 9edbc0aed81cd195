"""Garbage collection: drop versions, then everything no kept version needs.

Crash-safe in three steps: (1) live blobs of mostly-garbage packs (and weights served
from files that go) are copied into a new pack, fsynced; (2) one LMDB transaction
(:func:`collect`'s ``sweep``) re-links, deletes and repoints; (3) only then are files
nothing references removed. A crash leaves every kept version loadable.

A full collection reads every manifest, the whole blob index and every replay-sample
key: its cost grows with the history. :func:`prune` drops versions a writer committed
since a :class:`Fence` at a cost that grows with those versions only (the training
loop's pruning of mid-experience versions, once per experience).
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lmdb

from engram.errors import EngramError, VersionNotFoundError
from engram.store import format as fmt
from engram.store import references
from engram.store.blobs import Blobs, EncodedBlob, FileBlob, IndexEntry
from engram.store.checkpoint import fsync_dir
from engram.store.codec import iter_array_records
from engram.store.env import Env
from engram.store.files import open_dir, unlink
from engram.store.history import History, manifest_bytes, relinks
from engram.store.packs import ALIGN, PACK_NAME, BlobLocation, NewPack, pack_name
from engram.store.samples import sample_key
from engram.store.signing import signature_key
from engram.store.values import GcReport, VersionSpec, version_name

if TYPE_CHECKING:
    from engram.store.store import Store

# What an interrupted checkpoint (or artifact) write leaves: our temp name, or safetensors' own temp
# file (its save_file writes `.tmpXXXXXX` and renames it into place).
_CHECKPOINT_LEFTOVER = re.compile(
    rf"{fmt.CHECKPOINT_NAME.pattern}|{fmt.ARTIFACT_NAME.pattern}"
    rf"|\.model-v\d+.*\.tmp-\d+|\.tmp[A-Za-z0-9]{{6,}}"
)
_FILE_VERSION = re.compile(r"model-v(\d+)")  # the version a checkpoint/artifact file is named for

# Full collections (gc, compaction: both end in `collect`) begun in this process; a
# Fence taken before one no longer holds.
_collections = 0


def gc(
    env: Env,
    history: History,
    blobs: Blobs,
    samples: object,
    *,
    keep_last: int | None,
    drop: Iterable[VersionSpec],
) -> GcReport:
    """:meth:`Store.gc <engram.store.Store.gc>`; ``samples``: ``store.samples``."""
    if keep_last is not None and keep_last < 0:
        raise ValueError("keep_last must be >= 0")
    with env.read() as txn:
        ids = history.ids(txn)
        pinned = set(history.tags(txn).values())
        head = history.head(txn)
        if head is not None:
            pinned.add(head)
        kept = set(ids) if keep_last is None else pinned | set(ids[len(ids) - keep_last :])
        dropping = {history.resolve(txn, v) for v in drop}
        if dropping & pinned:
            names = ", ".join(version_name(v) for v in sorted(dropping & pinned))
            raise ValueError(f"cannot drop {names}: HEAD and tagged versions are kept")
    kept -= dropping
    return collect(env, history, blobs, samples, kept, repack_at=0.5)


@dataclass(frozen=True)
class Fence:
    """A point in the history of a store this process writes, for :func:`prune`.

    Versions, packs and replay samples are numbered from counters that only grow. While
    this process holds the writer lock (the same open store) and begins no full
    collection (:func:`gc` or compaction, which rewrite and move what older versions
    reference), only its commits add any: a version, a pack or a sample numbered at or
    past the fence was made by a commit after it, and no version older than the fence
    references a pack, a checkpoint file or a sample made after it.
    """

    env: weakref.ref[Env]  # the store's environment when it was taken
    collections: int  # full collections begun in this process by then
    next_version: int
    next_pack: int
    next_sample: int  # 1 + the highest replay-sample id stored then

    @classmethod
    def take(cls, store: Store) -> Fence:
        """The fence of ``store`` (opened for writing) now."""
        env = store.env
        env.check_writable()
        with env.read() as txn:
            next_version = env.counter(txn, b"next_version")
            next_pack = env.counter(txn, b"next_pack")
            with txn.cursor(db=env.dbs[fmt.DB_SAMPLES]) as cur:
                last = bytes(cur.key()) if cur.last() else b""
        if not last:
            next_sample = 0  # no sample stored: none is older than the fence
        elif len(last) == 8:
            next_sample = int.from_bytes(last, "big") + 1
        else:
            next_sample = 2**64  # a key that is no sample id (damaged pages): none is new
        return cls(weakref.ref(env), _collections, next_version, next_pack, next_sample)

    def holds(self, store: Store) -> bool:
        """Whether :func:`prune` may rely on it for ``store`` now."""
        env = store.env
        return self.env() is env and env.is_open and self.collections == _collections


def prune(store: Store, drop: Iterable[int], fence: Fence) -> GcReport | None:
    """Drop versions committed since ``fence`` (never HEAD or a tagged one) and what
    only they referenced, reading only the versions committed since: what it costs
    grows with those, not with the history (:func:`gc` reads all of it).

    A blob goes only if it is in a pack made since the fence, a checkpoint or artifact
    file only if it is named for a version made since, a replay sample only if its id
    is past the fence, each only if no kept version made since references it: the rest
    of what the dropped versions referenced is older, may be what an older version
    needs, and is left to :func:`gc`. A kept version whose parent goes is re-linked to
    its nearest kept ancestor. Crash-safe as :func:`collect`: one LMDB transaction, then
    the files it made unreferenced are removed.

    Returns:
        What it removed, or None, changing nothing, when the fence no longer holds
        (:meth:`Fence.holds`) or a version in ``drop`` is older than it: :func:`gc`
        (``Store.gc(drop=...)``) is then the way.

    Raises:
        ValueError: a version in ``drop`` is HEAD or tagged.
        VersionNotFoundError: a version in ``drop`` is not in the store.
        CorruptionError: a manifest made since the fence cannot be read (nothing is
            deleted then).
    """
    env, history, blobs = store.env, store._history, store._blobs  # the store's own rooms
    dropping = set(drop)
    if not fence.holds(store) or (dropping and min(dropping) < fence.next_version):
        return None
    with env.read() as txn:
        fresh = history.ids(txn, since=fence.next_version)
        missing = dropping - set(fresh)
        if missing:
            raise VersionNotFoundError(
                f"version {version_name(min(missing))} is not in store {env.path}"
            )
        pinned = set(history.tags(txn).values()) | {history.head(txn)}
        if dropping & pinned:
            names = ", ".join(version_name(v) for v in sorted(dropping & pinned))
            raise ValueError(f"cannot drop {names}: HEAD and tagged versions are kept")
        kept, gone, parents = _Live(), _Live(), {}
        for vid in fresh:
            manifest = history.manifest(txn, vid)
            parents[vid] = manifest["parent"]
            (gone if vid in dropping else kept).add(blobs, txn, vid, manifest)
        # Older versions are never re-linked: a parent is older than its child.
        relink = relinks(set(fresh) - dropping, dropping, parents.get)
        dead: list[tuple[bytes, BlobLocation]] = []
        for key in gone.blobs - kept.blobs:
            entry = blobs.entry(txn, key)  # as a commit wrote it: plain, in its new pack
            if isinstance(entry, BlobLocation) and entry.pack >= fence.next_pack:
                dead.append((key, entry))
        kept_packs = set()
        for key in kept.blobs:
            entry = blobs.entry(txn, key)
            location = entry.stored if isinstance(entry, EncodedBlob) else entry
            if isinstance(location, BlobLocation):
                kept_packs.add(location.pack)
    # Every blob of a pack made since the fence is one its commit's version referenced,
    # so a pack none of the kept versions made since uses holds only the dead ones.
    packs = sorted({entry.pack for _, entry in dead} - kept_packs)
    files = sorted(
        f
        for f in gone.files - kept.files
        if (m := _FILE_VERSION.match(f)) and int(m.group(1)) >= fence.next_version
    )
    samples = sorted(s for s in gone.samples - kept.samples if s >= fence.next_sample)

    def sweep(txn: lmdb.Transaction) -> None:
        for vid, parent in relink.items():
            manifest = history.manifest(txn, vid)
            manifest["parent"] = parent
            history.put_manifest(txn, vid, manifest_bytes(manifest))
        for vid in sorted(dropping):
            history.delete(txn, vid)
            env.delete(txn, fmt.DB_META, signature_key(vid))  # if it was signed
        for key, _ in dead:
            blobs.delete(txn, key)
        for sample_id in samples:
            env.delete(txn, fmt.DB_SAMPLES, sample_key(sample_id))

    env.write(sweep, reserve=4096 * len(relink))
    for pack in packs:
        blobs.packs.forget(pack)
    for file in files:
        blobs.files.forget(file)
    removed = _unlink(env, fmt.BLOB_DIR, [pack_name(p) for p in packs])
    removed += _unlink(env, fmt.CHECKPOINT_DIR, files)
    nbytes = sum(entry.nbytes for _, entry in dead)
    return GcReport(tuple(sorted(dropping)), len(dead), nbytes, tuple(removed), len(samples))


def _unlink(env: Env, sub: str, names: list[str]) -> list[str]:
    """Remove ``names`` from the store's directory ``sub`` (relative to a descriptor of
    it, as :func:`_remove_files` does); returns ``sub/name`` of each."""
    if not names:
        return []
    fd = open_dir(env.path / sub)
    try:
        for file in names:
            try:
                unlink(file, fd)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(env.path / sub / file)) from e
    finally:
        os.close(fd)
    return [f"{sub}/{file}" for file in names]


@dataclass
class _Live:
    """What a set of versions references (the kept ones: what they need)."""

    blobs: set[bytes] = field(default_factory=set)
    files: set[str] = field(default_factory=set)  # checkpoint (and artifact) files
    # the ids of the records its reference arrays name, by database (store.references)
    referenced: dict[bytes, set[int]] = field(default_factory=dict)

    @property
    def samples(self) -> set[int]:
        """The replay samples referenced: the one kind whose records gc sweeps
        (SampleTable.sweep; the fence's ``next_sample``)."""
        return self.referenced.setdefault(references.SAMPLES.database, set())

    def add(self, blobs: Blobs, txn: lmdb.Transaction, vid: int, manifest: dict) -> None:
        """The blobs, files and referenced records of version ``vid`` (its ``manifest``)."""
        records = iter_array_records(manifest["state"])
        for _, record, kind in references.referencing(("ids", r) for r in records):
            ids = references.referenced_ids(blobs, txn, record, vid, "sample ids")
            self.referenced.setdefault(kind.database, set()).update(ids)
        if manifest.get("model") is not None:
            records += iter_array_records(manifest["model"]["tensors"])
        for record in records:
            self.blobs.update(bytes.fromhex(c[0]) for c in record.chunks)
        if manifest["checkpoint"] is not None:
            self.files.add(manifest["checkpoint"]["file"])
        if manifest.get("artifact") is not None:
            self.files.add(manifest["artifact"]["file"])


def collect(
    env: Env,
    history: History,
    blobs: Blobs,
    samples: object | None,
    kept: set[int],
    *,
    repack_at: float,
) -> GcReport:
    """Drop versions not in ``kept`` and everything no kept version needs.

    A pack whose garbage (bytes no index entry needs) is at least ``repack_at`` of
    its size is rewritten with only its live blobs. ``samples``: the replay sample
    table to sweep too (None: leave samples alone).
    """
    global _collections
    _collections += 1  # before anything: a Fence taken earlier is void from here on
    with env.read() as txn:
        ids = history.ids(txn)
        kept &= set(ids)
        live, parents = _Live(), {}
        for vid in kept:  # each manifest parsed once, and let go (a long history is large)
            manifest = history.manifest(txn, vid)
            parents[vid] = manifest["parent"]
            live.add(blobs, txn, vid, manifest)

        def parent_of(vid: int) -> int | None:
            if vid in parents:
                return parents[vid]
            try:
                return history.manifest(txn, vid)["parent"]
            except EngramError:  # a dropped version's unreadable manifest: no ancestor
                return None

        relink = relinks(kept, set(ids) - kept, parent_of)
        entries = blobs.entries(txn)
        _add_bases(live.blobs, entries)
        next_pack = env.counter(txn, b"next_pack")
    dropped = tuple(sorted(set(ids) - kept))
    dead = [key for key in entries if key not in live.blobs]
    dead_bytes = sum(entries[key].nbytes for key in dead)
    live_by_pack = _live_by_pack(live.blobs, entries)
    repack = _to_repack(env, live_by_pack, repack_at)
    moved = _rewrite(env, blobs, repack, _to_rehome(entries, live), next_pack)

    def sweep(txn: lmdb.Transaction) -> int:
        for vid, parent in relink.items():  # the tree stays a tree: see history.relinks
            manifest = history.manifest(txn, vid)
            manifest["parent"] = parent
            history.put_manifest(txn, vid, manifest_bytes(manifest))
        for vid in dropped:
            history.delete(txn, vid)
            env.delete(txn, fmt.DB_META, signature_key(vid))  # if it was signed
        for key in dead:
            blobs.delete(txn, key)
        for key, entry in moved:
            blobs.put(txn, key, entry)
        if moved:
            env.set_counter(txn, b"next_pack", next_pack + 1)
        return samples.sweep(txn, live.samples) if samples is not None else 0

    samples_gone = env.write(sweep, reserve=96 * len(moved) + 4096 * len(relink))
    # Only now, with the index committed, may files go: first packs nothing references.
    referenced = (set(live_by_pack) - set(repack)) | ({next_pack} if moved else set())
    removed = _remove_files(blobs, env, referenced, live.files)
    return GcReport(dropped, len(dead), dead_bytes, tuple(removed), samples_gone)


def _add_bases(live: set[bytes], entries: dict[bytes, IndexEntry]) -> None:
    """The bases of live delta-coded blobs are live too, transitively."""
    stack = [d for d in live if d in entries]
    while stack:
        entry = entries[stack.pop()]
        if isinstance(entry, EncodedBlob) and entry.base and entry.base not in live:
            live.add(entry.base)
            stack.append(entry.base)


_PackItems = list[tuple[bytes, IndexEntry, BlobLocation]]


def _live_by_pack(live: set[bytes], entries: dict[bytes, IndexEntry]) -> dict[int, _PackItems]:
    """Live blobs stored in packs, by pack: (digest, entry, where its stored bytes are)."""
    by_pack: dict[int, _PackItems] = {}
    for key in live:
        entry = entries.get(key)
        location = entry.stored if isinstance(entry, EncodedBlob) else entry
        if isinstance(location, BlobLocation):
            by_pack.setdefault(location.pack, []).append((key, entry, location))
    return by_pack


def _to_repack(
    env: Env, live_by_pack: dict[int, _PackItems], repack_at: float
) -> dict[int, _PackItems]:
    """The packs whose garbage is at least ``repack_at`` of their size."""
    repack = {}
    for pack, items in live_by_pack.items():
        try:
            size = (env.path / fmt.BLOB_DIR / pack_name(pack)).stat().st_size
        except FileNotFoundError:
            continue  # verify reports it; nothing to rewrite
        garbage = size - sum(-(-loc.nbytes // ALIGN) * ALIGN for _, _, loc in items)
        if garbage > ALIGN and garbage >= repack_at * size:
            repack[pack] = items
    return repack


def _to_rehome(entries: dict[bytes, IndexEntry], live: _Live) -> list[tuple[bytes, FileBlob]]:
    """Live weights served from a file no kept version names: they move into a pack."""
    return [
        (key, entry)
        for key, entry in entries.items()
        if key in live.blobs and isinstance(entry, FileBlob) and entry.file not in live.files
    ]


def _rewrite(
    env: Env,
    blobs: Blobs,
    repack: dict[int, _PackItems],
    rehome: list[tuple[bytes, FileBlob]],
    pack_id: int,
) -> list[tuple[bytes, bytes]]:
    """Step (1): copy the live blobs of ``repack`` and the ``rehome`` spans into pack
    ``pack_id``, fsynced; returns their new index entries."""
    moved: list[tuple[bytes, bytes]] = []
    if not (repack or rehome):
        return moved
    blob_dir = env.path / fmt.BLOB_DIR
    with NewPack(blob_dir, pack_id) as pack:
        for items in repack.values():
            for key, entry, location in items:
                view = blobs.packs.view(location, key.hex())
                new = pack.append(view, location.xxh3)
                if isinstance(entry, EncodedBlob):
                    moved.append((key, entry.moved(new).encode()))
                else:
                    moved.append((key, new.encode()))
        for key, entry in rehome:
            view = blobs.files.view(entry, key.hex())
            moved.append((key, pack.append(view, entry.xxh3).encode()))
    fsync_dir(blob_dir)
    return moved


def _remove_files(
    blobs: Blobs, env: Env, referenced_packs: set[int], live_files: set[str]
) -> list[str]:
    """Step (3): remove packs and checkpoint files (and leftovers) nothing references.

    Names are listed and unlinked relative to a descriptor of each directory opened
    without following a link, so a directory swapped for a link to another one (after
    the store was opened) never has its files deleted.
    """
    removed = []
    for sub in (fmt.BLOB_DIR, fmt.CHECKPOINT_DIR):
        fd = open_dir(env.path / sub)
        try:
            for file in sorted(os.listdir(fd)):
                if sub == fmt.BLOB_DIR:
                    m = PACK_NAME.fullmatch(file)
                    if not m or int(m.group(1)) in referenced_packs:
                        continue
                    blobs.packs.forget(int(m.group(1)))
                else:
                    if not _CHECKPOINT_LEFTOVER.fullmatch(file) or file in live_files:
                        continue
                    blobs.files.forget(file)
                try:
                    unlink(file, fd)
                except OSError as e:  # relative to fd: name the whole path in the error
                    raise OSError(e.errno, e.strerror, str(env.path / sub / file)) from e
                removed.append(f"{sub}/{file}")
        finally:
            os.close(fd)
    return removed
