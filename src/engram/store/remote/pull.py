"""``pull``: clone a remote into a local store, or bring a clone up to the remote's HEAD.

The result is a normal store: the remote's versions under their own ids, with the same
store id, pack and checkpoint file names and records, written through the store's own
environment (so sealed as every record of the store). For each version the local store
lacks, oldest first:

1. its segment, checked against the SHA-256 its marker names (the marker against its
   referrer's, up to HEAD);
2. each file the segment names that is not already here with the same SHA-256: streamed
   to a temporary name, hashed, fsynced, renamed (a file failing its hash is never
   renamed into place);
3. one LMDB write transaction: its records, its signature record if its marker carries
   one (so ``verify --trust`` and ``load_model(trust=)`` check a clone as they check the
   origin), HEAD, and the counters (``next_version``, ``next_pack``, ``next_sample``)
   raised past every id it brought.

A pull killed anywhere leaves the local store at the last version (3) committed, with at
most a few unreferenced files that ``gc`` collects; running it again goes on from there.
Then the remote's tags on those versions that the store lacks are created (a local tag
is never moved; a read-only copy, :mod:`~engram.store.remote.cache`, mirrors them).

A clone that went on by itself keeps its live data: a pack id it already uses for other
bytes is renumbered (:func:`_place_files`), and a replay-sample id both clones gave out
is replaced only if no local version references it (:func:`_check_samples_free`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import lmdb

from engram.errors import (
    CorruptionError,
    RemoteConflictError,
    RemoteError,
    VersionNotFoundError,
)
from engram.store import Store, references
from engram.store import format as fmt
from engram.store.blobs import Blobs, EncodedBlob, decode_entry
from engram.store.checkpoint import fsync_dir
from engram.store.env import Env
from engram.store.history import version_arrays
from engram.store.packs import PACK_NAME, BlobLocation, pack_name
from engram.store.remote.client import ObjectStore
from engram.store.remote.layout import (
    STORE_KEY,
    Marker,
    Segment,
    Tag,
    local_dir,
    object_key,
)
from engram.store.remote.lineage import (
    Entry,
    read_head,
    read_marker,
    read_tags,
    remember,
    remembered,
    walk,
)
from engram.store.signing import signature_key
from engram.store.values import version_name

_DBS = {"blobs": fmt.DB_BLOBS, "samples": fmt.DB_SAMPLES, "versions": fmt.DB_VERSIONS}


@dataclass
class PullReport:
    """What a pull did (``--json`` prints it)."""

    remote: str
    store: str
    pulled: list[int]  # version ids, oldest first
    head: int
    downloaded_bytes: int
    tags: list[str] = field(default_factory=list)  # local tags created or moved

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# How a pull without its files (a read-only cache, engram.store.remote.cache) names the
# files of a segment locally: (store, segment) -> {remote name: local name}
Placer = Callable[[Store, Segment], dict[str, str]]


def default_store(url: str) -> str:
    """The directory ``engram pull URL`` clones into: the prefix's last name (as git
    does), or the bucket's for a remote at a bucket's root."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    return path.rsplit("/", 1)[-1] if path else parts.netloc


def pull(url: str, store_path: str | Path) -> PullReport:
    """Clone ``url`` into ``store_path`` (missing or empty), or update the clone there.

    The remote's tags on the versions pulled are created where the store has no tag of
    that name (a local tag is never moved by a pull).

    Raises:
        RemoteError: the remote is unusable, empty, or an object fails its hash.
        RemoteConflictError: the local store is another store, or has versions the
            remote's HEAD does not descend from.
    """
    return pull_into(ObjectStore(url), Path(store_path).expanduser())


def pull_into(
    client: ObjectStore,
    path: Path,
    *,
    place: Placer | None = None,
    mirror_tags: bool = False,
    lock_timeout: float = 0.0,
) -> PullReport:
    """:func:`pull` from ``client``. ``place``: write the records only, naming each
    file with it (its files are fetched later, by whoever placed them); ``mirror_tags``:
    the store's tags become the remote's (a read-only copy nobody tags)."""
    store_id = _remote_store_id(client)
    head, _ = read_head(client)
    if head is None:
        raise RemoteError(f"remote {client.url} has no versions yet: push one first")
    memory = remembered(path)
    cached = memory.lineage if memory is not None and memory.url == client.url else []
    lineage, markers = walk(client, head, cached)
    remote_tags = read_tags(client)
    with Store.open(path, mode="c", lock_timeout=lock_timeout) as store:
        env = store.env
        _adopt_store_id(store, store_id, client)
        todo = _versions_to_pull(store, client, lineage)
        for entry in todo:
            marker = markers.get(entry.ref.marker) or read_marker(client, entry.ref)
            if marker.store_id != store_id:
                raise RemoteError(
                    f"remote {client.url}: {entry.ref.marker} belongs to store "
                    f"{marker.store_id[:32]}, not the remote's {store_id}; it was not used"
                )
            segment = _segment(client, marker)
            manifest = _manifest_of(segment, store_id)
            if place is not None:
                places = place(store, segment)
            else:
                places = _place_files(store.path, env, segment)
                _fetch_files(store.path, client, segment, places)
            _publish(env, segment, manifest, places, marker.signature)
        local = store.head
        if not todo and (local is None or local.id != head.version):  # a rolled-back clone
            value = str(head.version).encode()
            env.write(lambda txn: env.put(txn, fmt.DB_REFS, fmt.HEAD_REF, value))
        tags = _set_tags(store, lineage, remote_tags, mirror=mirror_tags)
    remember(path, client.url, lineage)
    return PullReport(client.url, str(path), [e.ref.version for e in todo], head.version,
                      client.traffic.down, tags)  # fmt: skip


def _set_tags(
    store: Store, lineage: list[Entry], remote: dict[str, Tag], *, mirror: bool
) -> list[str]:
    """The remote's tags on versions of ``lineage`` (now all in the store), set locally:
    each tag the store lacks; with ``mirror``, every one, and no other. The names set."""
    on_lineage = {e.ref: e.ref.version for e in lineage}
    wanted = {name: on_lineage[t.target] for name, t in remote.items() if t.target in on_lineage}
    local = store.tags()
    moves = {name: vid for name, vid in wanted.items()
             if local.get(name) != vid and (mirror or name not in local)}  # fmt: skip
    # (a tag on a version pushed after HEAD was read keeps its value until the next pull)
    drops = [name for name in local if name not in remote] if mirror else []
    if moves or drops:
        env = store.env

        def work(txn: lmdb.Transaction) -> None:
            for name, vid in moves.items():
                env.put(txn, fmt.DB_REFS, fmt.TAG_PREFIX + name.encode(), str(vid).encode())
            for name in drops:
                env.delete(txn, fmt.DB_REFS, fmt.TAG_PREFIX + name.encode())

        env.write(work)
    return sorted(moves)


def _remote_store_id(client: ObjectStore) -> str:
    got = client.get(STORE_KEY)
    if got is None:
        raise RemoteError(f"remote {client.url} holds no engram store (no {STORE_KEY})")
    try:
        store_id = json.loads(got.data)["store_id"]
    except (ValueError, KeyError, TypeError):
        store_id = None
    if not (isinstance(store_id, str) and len(store_id) == 32 and store_id.isalnum()):
        raise RemoteError(f"remote {client.url}: {STORE_KEY} is damaged")
    return store_id


def _adopt_store_id(store: Store, store_id: str, client: ObjectStore) -> None:
    """A new (empty) store becomes a clone: it takes the remote's store id."""
    env = store.env
    if env.store_id == store_id:
        return
    with env.read() as txn:
        empty = not env.count(txn, fmt.DB_VERSIONS) and not env.count(txn, fmt.DB_SAMPLES)
    if not empty:
        raise RemoteConflictError(
            f"store {store.path} is store {env.store_id}, the remote {client.url} holds "
            f"{store_id}; pull into a new directory"
        )
    env.write(lambda txn: env.put(txn, fmt.DB_META, b"store_id", store_id.encode()))
    env.store_id = store_id


def _versions_to_pull(store: Store, client: ObjectStore, lineage: list[Entry]) -> list[Entry]:
    """The remote versions the local store lacks (a suffix of the lineage).

    Raises:
        RemoteConflictError: a local version has the id of a remote one but is another
            version, or the local HEAD is not on the remote lineage.
    """
    todo = []
    on_lineage = set()
    for entry in lineage:
        vid = entry.ref.version
        on_lineage.add(vid)
        try:
            manifest = store.manifest(vid)
        except (VersionNotFoundError, CorruptionError):  # not here (or damaged): pull it
            todo.append(entry)
            continue
        if manifest["created_at"] != entry.created_at:
            raise RemoteConflictError(
                f"store {store.path} has its own {version_name(vid)}, not the remote's "
                f"({client.url}); pull into a new directory, or push this store elsewhere"
            )
        if todo:  # a hole in the local copy of the lineage: refill from there
            todo.append(entry)
    local = store.head
    if local is not None and local.id not in on_lineage:
        raise RemoteConflictError(
            f"store {store.path} HEAD {version_name(local.id)} is not on the remote's history "
            f"({client.url}); push it (or move it elsewhere) before pulling"
        )
    return todo


def _segment(client: ObjectStore, marker: Marker) -> Segment:
    key = object_key(marker.segment_sha256)
    got = client.get(key)
    if got is None:
        raise RemoteError(
            f"remote {client.url}: segment {key} of {version_name(marker.version)} is missing"
        )
    return Segment.decode(got.data, marker, key)


def _place_files(store: Path, env: Env, segment: Segment) -> dict[str, str]:
    """The local name of each file of the segment: its own, except for a pack whose id
    this store already uses for other bytes (a clone that compacted, or committed
    versions it never pushed), which gets a new id (its index entries are rewritten to
    match in :func:`_publish`): a live file is never overwritten."""
    with env.read() as txn:
        next_pack = env.counter(txn, b"next_pack")
    places = {}
    for name, digest, nbytes in segment.files:
        target = store / local_dir(name) / name
        if PACK_NAME.fullmatch(name) and target.exists() and not _holds(target, digest, nbytes):
            while (store / fmt.BLOB_DIR / pack_name(next_pack)).exists():
                next_pack += 1
            places[name] = pack_name(next_pack)
            next_pack += 1
        else:  # a checkpoint file is named by its version: another one here is an orphan
            places[name] = name
    return places


def _holds(path: Path, digest: str, nbytes: int) -> bool:
    return path.is_file() and path.stat().st_size == nbytes and _sha256_of(path) == digest


def _fetch_files(
    store: Path, client: ObjectStore, segment: Segment, places: dict[str, str]
) -> None:
    """Step (2): every file of the segment, in place and checked."""
    wanted = []
    for name, digest, nbytes in segment.files:
        target = store / local_dir(name) / places[name]
        if not _holds(target, digest, nbytes):
            wanted.append((name, digest, nbytes, target))
    download_checked(client, wanted)


def download_checked(client: ObjectStore, wanted: list[tuple[str, str, int, Path]]) -> int:
    """Each ``(name, sha256, nbytes, target)`` downloaded to ``target``; the bytes
    moved. All are downloaded and checked under temporary names before any is renamed:
    a damaged object leaves none."""
    fetched: list[tuple[Path, Path]] = []  # (temporary, target)
    moved = 0
    try:
        for name, digest, nbytes, target in wanted:
            # the mode a commit gives its files (0644 less the umask), a name gc collects
            tmp = target.parent / f".tmp{secrets.token_hex(8)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            fetched.append((tmp, target))
            h = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                size = client.get_into(object_key(digest), out, h.update)
                out.flush()
                os.fsync(out.fileno())
            if size is None:
                raise RemoteError(f"remote {client.url}: {name} ({object_key(digest)}) is missing")
            if size != nbytes or h.hexdigest() != digest:
                raise RemoteError(
                    f"remote {client.url}: {object_key(digest)} ({name}) fails its SHA-256; it "
                    "was not used: push the version again from a store that has it"
                )
            moved += size
        for tmp, target in fetched:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in fetched:
            tmp.unlink(missing_ok=True)
        raise
    for directory in {target.parent for _, target in fetched}:
        fsync_dir(directory)
    return moved


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _manifest_of(segment: Segment, store_id: str) -> dict[str, Any]:
    """The segment's manifest, if it is this version's of this store (checked before any
    file is fetched; the store checks the rest of it on every read)."""
    try:
        manifest = json.loads(segment.manifest_payload() or b"null")
    except ValueError:
        manifest = None
    if not (
        isinstance(manifest, dict)
        and manifest.get("id") == segment.version
        and manifest.get("store_id") == store_id
    ):
        raise RemoteError(
            f"remote segment of {version_name(segment.version)} holds no manifest of that "
            "version of this store; it was not used"
        )
    return manifest


def _publish(
    env: Env,
    segment: Segment,
    manifest: dict[str, Any],
    places: dict[str, str],
    signature: bytes | None = None,
) -> None:
    """Step (3): one transaction makes the version visible locally (with its signature
    record, if it was signed) and moves HEAD."""
    vid = segment.version
    moved = {_pack_id(name): _pack_id(local) for name, local in places.items() if name != local}
    records = [
        (db, key, _repointed(key, payload, moved) if db == "blobs" and moved else payload)
        for db, key, payload in segment.records
    ]
    packs = [i for local in places.values() if (i := _pack_id(local)) is not None]
    samples = [int.from_bytes(k, "big") for db, k, _ in records if db == "samples"]

    def raise_counter(txn: lmdb.Transaction, name: bytes, at_least: int) -> None:
        if env.counter(txn, name, default=1) < at_least:
            env.set_counter(txn, name, at_least)

    def work(txn: lmdb.Transaction) -> None:  # safe to re-run (Env.write may retry it)
        _check_samples_free(env, txn, records)
        for db, key, payload in records:
            env.put(txn, _DBS[db], key, bytes(payload))
        if signature is not None:
            env.put(txn, fmt.DB_META, signature_key(vid), signature)
        else:  # one left here by a version of this id that is gone: not this one's
            env.delete(txn, fmt.DB_META, signature_key(vid))
        env.put(txn, fmt.DB_REFS, fmt.HEAD_REF, str(vid).encode())
        raise_counter(txn, b"next_version", vid + 1)
        if packs:
            raise_counter(txn, b"next_pack", max(packs) + 1)
        if samples:
            raise_counter(txn, b"next_sample", max(samples) + 1)
        if manifest.get("format_version") == fmt.ARTIFACT_FORMAT_VERSION:
            env.raise_format(txn, fmt.ARTIFACT_FORMAT_VERSION)

    reserve = sum(len(k) + len(p) + 64 for _, k, p in records) + len(signature or b"") + 64
    env.write(work, reserve=reserve)


def _check_samples_free(env: Env, txn: lmdb.Transaction, records: list) -> None:
    """Two clones may both give out a sample id (each from its own counter). Another
    record under an id is replaced only if no local version references it (samples
    flushed by a run that never committed); else the pull is refused."""
    databases = {kind.database.decode(): kind.database for kind in references.kinds()}
    taken: dict[bytes, set[int]] = {}  # ids given out by both clones, by database
    for db, key, payload in records:
        if db in databases:
            here = env.get(txn, databases[db], key)
            if here is not None and bytes(here) != bytes(payload):
                taken.setdefault(databases[db], set()).add(int.from_bytes(key, "big"))
    if not taken:
        return
    blobs = Blobs(env)
    try:
        for vid in (int.from_bytes(k, "big") for k in env.keys(txn, fmt.DB_VERSIONS)):
            raw = env.get(txn, fmt.DB_VERSIONS, vid.to_bytes(8, "big"))
            arrays = version_arrays(json.loads(bytes(raw)))
            for path, record, kind in references.referencing(arrays):
                ids = references.referenced_ids(blobs, txn, record, vid, path)
                clash = taken.get(kind.database, set()) & set(ids)
                if clash:
                    raise RemoteConflictError(
                        f"store {env.path} {version_name(vid)} references its own "
                        f"{kind.noun} {min(clash)}, another than the remote's (both stores "
                        "appended records after the clone); pull into a new directory"
                    )
    finally:
        blobs.close()


def _pack_id(name: str) -> int | None:
    m = PACK_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def _repointed(digest: bytes, payload: bytes, moved: dict[int | None, int | None]) -> bytes:
    """A blob index entry whose pack got another id here, pointing at that id."""
    entry = decode_entry(payload, digest.hex())
    if isinstance(entry, BlobLocation | EncodedBlob) and entry.pack in moved:
        return replace(entry, pack=moved[entry.pack]).encode()
    return payload
