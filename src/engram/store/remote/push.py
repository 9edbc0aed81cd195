"""``push``: make the remote hold every version of the local HEAD's lineage.

For each local version the remote lacks, oldest first (docs/remote.md, "Protocol"):

1. :func:`_upload_files`: the files its new records need that the remote lacks (new
   pack files, its checkpoint or artifact file), each create-only under its SHA-256;
2. :func:`_upload_segment`: its new LMDB records as one immutable segment object;
3. :func:`_create_marker`: its marker, create-only (immutable, named by its own hash),
   carrying the version's signature record if it was signed;
   :func:`_settle`: if a remote gc ran since the push read its fence (``gc.json``, read
   before anything else), wait for it to finish and put back any of those objects it
   deleted (:mod:`~engram.store.remote.gc`);
4. :func:`_move_head`: HEAD, by compare-and-swap from the ETag read at the start.

Then :func:`_push_tags`: each local tag naming a version the remote now holds, moved by
compare-and-swap where the remote's differs (a tag on a version off the remote's
history stays local; a remote tag the store lacks is left as it is; a tag deleted on the
remote is not put back at the version it was deleted from).

Until (4) succeeds nothing a reader follows names what (1)–(3) wrote, so a push killed
anywhere leaves the remote at the previous version; a re-run writes the same bytes
under the same names (create-only finds them there) and completes it. A second writer
is refused at (4), or at (3) for the same version; nothing is overwritten.

What the remote has is known without listing it: every version on the remote lineage
has, in its segment or an earlier one, every record and file it needs (its closure), so
a version's new records are those its closure has beyond its parent's (computed from
the local store, which holds the parent too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from engram.errors import (
    CorruptionError,
    RemoteConflictError,
    RemoteError,
    StoreNotFoundError,
    VersionNotFoundError,
)
from engram.store import Store, references
from engram.store import format as fmt
from engram.store.blobs import Blobs, EncodedBlob, FileBlob, decode_entry
from engram.store.history import version_arrays
from engram.store.packs import pack_name
from engram.store.references import ReferenceKind
from engram.store.remote.client import AlreadyExists, ObjectStore, Stale
from engram.store.remote.layout import (
    HEAD_KEY,
    STORE_KEY,
    Fence,
    Marker,
    Ref,
    Segment,
    Tag,
    canonical,
    local_dir,
    object_key,
    sha256,
    tag_key,
)
from engram.store.remote.lineage import (
    Entry,
    read_fence,
    read_head,
    read_marker,
    read_tag_value,
    remember,
    remembered,
    walk,
)
from engram.store.signing import signature_key
from engram.store.values import version_name

_HASH_BLOCK = 8 << 20
# How long a push waits, before moving HEAD, for a remote gc that is deleting to finish;
# then it stops (its local commit intact) and says so. A gc killed mid-run leaves its
# fence "running" until the next gc finishes.
GC_WAIT_S = 120.0
_GC_POLL_S = 0.25
_MAX_SETTLE = 8  # gcs starting one after another while a push settles: then it stops

# What a version's push relies on: (key, where its bytes are) for each object it wrote
# or found, so one a gc deleted can be put back
Relied = list[tuple[str, bytes | Path]]


@dataclass
class PushReport:
    """What a push did (``--json`` prints it)."""

    remote: str
    pushed: list[int]  # version ids, oldest first
    head: int | None  # the remote's HEAD afterwards
    uploaded_bytes: int
    objects: int  # objects written
    tags: list[str] = field(default_factory=list)  # remote tags created or moved
    # local tags on the version a remote tag was deleted from: left deleted there
    tags_deleted_on_remote: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Known:
    """What the remote holds: blob digests, referenced records (replay samples) by
    kind, files (name, sha256)."""

    digests: set[bytes] = field(default_factory=set)
    referenced: dict[ReferenceKind, set[int]] = field(default_factory=dict)
    files: set[tuple[str, str]] = field(default_factory=set)


def push(store_path: str | Path | Store, url: str | None = None) -> PushReport:
    """Push the local HEAD's lineage to ``url`` (default: the remote the store remembers).

    ``store_path``: a store directory, opened read-only (a training job may go on
    committing to it), or a :class:`Store` this process has open.

    Raises:
        RemoteError: no remote given or remembered, the remote cannot be used.
        RemoteConflictError: the remote's HEAD is not in the local history (another
            writer pushed), or it holds another store.
    """
    path = store_path.path if isinstance(store_path, Store) else Path(store_path).expanduser()
    memory = remembered(path)
    if url is None:
        if not path.is_dir():
            raise StoreNotFoundError(f"no store at {path}: the path does not exist")
        if memory is None:
            raise RemoteError(f"store {path} has no remote yet: run `engram push {path} REMOTE`")
        url = memory.url
    client = ObjectStore(url, create=True)
    cached = memory.lineage if memory is not None and memory.url == client.url else []
    if isinstance(store_path, Store):  # a store this process has open (LMDB: one handle)
        return _push_open(store_path, client, cached)
    with Store.open(path) as store:
        return _push_open(store, client, cached)


def unpushed(store: Store) -> list[int] | None:
    """The versions of the local HEAD's lineage the remote lacks, as far as the store
    remembers (``remote.json``; no network): what ``engram ls`` would show as "remote N
    versions behind". None if the store has no remote, or its HEAD is off the history it
    remembers (a push would be refused or a pull is due)."""
    memory = remembered(store.path)
    if memory is None:
        return None
    head = store.head
    return _since(
        store, None if head is None else head.id, memory.lineage[-1] if memory.lineage else None
    )


def _push_open(store: Store, client: ObjectStore, cached: list[Entry]) -> PushReport:
    blobs = Blobs(store.env)  # our own readers over the store's environment
    try:
        return _push(store, blobs, client, cached)
    finally:
        blobs.close()


def _push(store: Store, blobs: Blobs, client: ObjectStore, cached: list[Entry]) -> PushReport:
    if store.head is None:  # before anything is written to the remote
        raise RemoteError(f"store {store.path} has no HEAD: nothing to push")
    _claim_remote(client, store.store_id)
    fence = read_fence(client)  # before anything this push relies on is looked up
    head, etag = read_head(client)
    lineage, _ = walk(client, head, cached)
    todo = _versions_to_push(store, client, head, lineage)
    pushed = []
    for vid in todo:
        with store.env.read() as txn:
            # what the parent (the remote's HEAD) references is there: only the rest is sent
            known = _known(store, blobs, txn, client, lineage[-1] if lineage else None)
            ref, marker, relied = _push_version(store, blobs, txn, client, known, vid, head)
        fence = _settle(client, fence, relied)
        etag = _move_head(client, ref, etag, head, store.path)
        lineage.append(Entry(ref, marker.created_at, marker.manifest_sha256))
        remember(store.path, client.url, lineage)
        head = ref
        pushed.append(vid)
    if not todo:  # a first push of an empty remote still remembers the URL
        remember(store.path, client.url, lineage)
    tags, kept_deleted = _push_tags(store, client, lineage)
    traffic = client.traffic
    return PushReport(client.url, pushed, None if head is None else head.version,
                      traffic.up, len(traffic.puts), tags, kept_deleted)  # fmt: skip


def _claim_remote(client: ObjectStore, store_id: str) -> None:
    """The remote holds this store (``store.json``), claiming an empty remote for it."""
    got = client.get(STORE_KEY)
    if got is None:
        try:
            client.create(STORE_KEY, canonical({"format": 1, "store_id": store_id}))
            return
        except AlreadyExists:
            got = client.get(STORE_KEY)  # claimed meanwhile: check whose
    try:
        theirs = json.loads(got.data)["store_id"] if got is not None else None
    except (ValueError, KeyError, TypeError):
        theirs = None
    if theirs != store_id:
        raise RemoteConflictError(
            f"remote {client.url} holds store {str(theirs)[:32]}, not this store {store_id}; "
            "push to another prefix, or `engram pull` that remote into a new directory"
        )


def _versions_to_push(
    store: Store, client: ObjectStore, head: Ref | None, lineage: list[Entry]
) -> list[int]:
    """The local HEAD's ancestors (and HEAD) newer than the remote's HEAD, oldest first.

    Raises:
        RemoteConflictError: the remote's HEAD is not one of them.
    """
    local = store.head
    if local is None:  # reset since _push looked (a failed gate)
        raise RemoteError(f"store {store.path} has no HEAD: nothing to push")
    remote = lineage[-1] if lineage else None
    chain = _since(store, local.id, remote)
    if chain is not None:
        return chain
    raise RemoteConflictError(
        f"remote {client.url} HEAD is {version_name(remote.ref.version)}, which is not in the "
        f"history of this store's HEAD {version_name(local.id)} (another writer pushed, or "
        "this store rolled back); "
        f"nothing was pushed: run `engram pull {client.url} NEW_DIR` to continue from the "
        "remote, or push this store to another prefix (a branch)"
    )


def _since(store: Store, vid: int | None, remote: Entry | None) -> list[int] | None:
    """``vid`` and its ancestors newer than ``remote``, oldest first; None if ``remote``
    is not one of its ancestors (the same id with another ``created_at`` is another
    version: a clone that committed on its own)."""
    chain: list[int] = []
    seen: set[int] = set()
    while vid is not None and vid not in seen:
        manifest = store.manifest(vid)
        if remote is not None and vid == remote.ref.version:
            return chain[::-1] if manifest["created_at"] == remote.created_at else None
        seen.add(vid)
        chain.append(vid)
        vid = manifest["parent"]
    return chain[::-1] if remote is None else None


# ------------------------------------------------------------------ closures


@dataclass
class _Needs:
    """What one version's manifest references directly."""

    digests: set[bytes] = field(default_factory=set)
    referenced: dict[ReferenceKind, set[int]] = field(default_factory=dict)  # by kind
    files: dict[str, str | None] = field(default_factory=dict)  # name -> sha256 if recorded


def _needs(blobs: Blobs, txn: lmdb.Transaction, vid: int, manifest: dict[str, Any]) -> _Needs:
    needs = _Needs()
    arrays = version_arrays(manifest)
    for _, record in arrays:
        needs.digests.update(bytes.fromhex(digest) for digest, _, _ in record.chunks)
    for path, record, kind in references.referencing(arrays):
        ids = references.referenced_ids(blobs, txn, record, vid, path)
        needs.referenced.setdefault(kind, set()).update(ids)
    for key in ("checkpoint", "artifact"):
        entry = manifest.get(key)
        if entry is not None:
            needs.files[entry["file"]] = entry["sha256"]
    return needs


def _known(
    store: Store, blobs: Blobs, txn: lmdb.Transaction, client: ObjectStore, parent: Entry | None
) -> _Known:
    """What the remote holds for certain: the closure of the version on the remote that
    the next one descends from, read from the local copy of its manifest (or the
    remote's, if it was rewritten here since, e.g. by ``compact``). Only the parent, not
    the lineage: O(1) versions a push, and the next segment depends on its version and
    parent alone, so a re-run writes the same bytes. What an older version has and the
    parent lacks (a tensor back to an older value) is sent again: a few index entries,
    never a file the remote has (each is looked up by its hash before it is uploaded)."""
    known = _Known()
    if parent is None:
        return known
    vid = parent.ref.version
    payload = store.env.get(txn, fmt.DB_VERSIONS, vid.to_bytes(8, "big"))
    if payload is None or sha256(payload) != parent.manifest_sha256:
        payload = _pushed_manifest(client, parent)
    manifest = json.loads(bytes(payload))
    try:
        needs = _needs(blobs, txn, vid, manifest)
    except CorruptionError:  # its sample table is not here: those samples are sent again
        needs = _Needs()
    known.digests |= needs.digests
    for kind, ids in needs.referenced.items():
        known.referenced.setdefault(kind, set()).update(ids)
    known.files |= {(name, digest) for name, digest in needs.files.items() if digest}
    return known


def _pushed_manifest(client: ObjectStore, entry: Entry) -> bytes:
    marker = read_marker(client, entry.ref)
    key = object_key(marker.segment_sha256)
    got = client.get(key)
    if got is None:
        raise RemoteError(f"remote {client.url}: segment {key} of {entry.ref.marker} is missing")
    payload = Segment.decode(got.data, marker, key).manifest_payload()
    if payload is None or sha256(payload) != entry.manifest_sha256:
        raise RemoteError(f"remote {client.url}: segment {key} lacks its version's manifest")
    return payload


# ------------------------------------------------------------------ one version


def _push_version(
    store: Store,
    blobs: Blobs,
    txn: lmdb.Transaction,
    client: ObjectStore,
    known: _Known,
    vid: int,
    parent: Ref | None,
) -> tuple[Ref, Marker, Relied]:
    """Steps (1)–(3) for version ``vid``; its marker's ref, the marker, and the objects
    it relies on beyond its parent's closure (what a gc could have deleted)."""
    env = store.env
    payload = bytes(env.get(txn, fmt.DB_VERSIONS, vid.to_bytes(8, "big")))
    manifest = json.loads(payload)
    needs = _needs(blobs, txn, vid, manifest)
    records: list[tuple[str, bytes, bytes]] = [("versions", vid.to_bytes(8, "big"), payload)]
    files = dict(needs.files)
    for digest, entry in _new_entries(env, txn, needs.digests, known.digests, vid):
        records.append(("blobs", digest, entry))
        decoded = decode_entry(entry, digest.hex())
        name = decoded.file if isinstance(decoded, FileBlob) else pack_name(decoded.pack)
        files.setdefault(name, None)
    for kind, ids in needs.referenced.items():
        for record_id in sorted(ids - known.referenced.get(kind, set())):
            record = env.get(txn, kind.database, kind.key(record_id))
            if record is None:
                raise CorruptionError(
                    f"store {store.path} {version_name(vid)}: {kind.noun} {record_id} is "
                    f"missing; run `engram verify {store.path}`"
                )
            records.append((kind.database.decode(), kind.key(record_id), bytes(record)))
    shipped = _upload_files(store.path, client, files, known)
    segment = Segment(store.store_id, vid, tuple(shipped), tuple(records)).encode()
    _upload_segment(client, segment)
    signature = env.get(txn, fmt.DB_META, signature_key(vid))  # None: not signed
    marker = Marker(
        store_id=store.store_id,
        version=vid,
        created_at=manifest["created_at"],
        manifest_sha256=sha256(payload),
        parent=parent,
        segment_sha256=sha256(segment),
        segment_nbytes=len(segment),
        signature=None if signature is None else bytes(signature),
    )
    ref = _create_marker(client, marker)
    relied: Relied = [
        (object_key(digest), store.path / local_dir(name) / name) for name, digest, _ in shipped
    ]
    relied += [(object_key(sha256(segment)), segment), (ref.marker, marker.encode())]
    return ref, marker, relied


def _new_entries(
    env: Any, txn: lmdb.Transaction, digests: set[bytes], known: set[bytes], vid: int
) -> list[tuple[bytes, bytes]]:
    """The index entries of ``digests`` the remote lacks, with the delta bases they need."""
    todo = sorted(digests - known)
    out: dict[bytes, bytes] = {}
    while todo:
        digest = todo.pop()
        if digest in out:
            continue
        raw = env.get(txn, fmt.DB_BLOBS, digest)
        if raw is None:
            raise CorruptionError(
                f"store {env.path} {version_name(vid)}: blob {digest.hex()[:12]} is not "
                f"indexed; run `engram verify {env.path}`"
            )
        out[digest] = bytes(raw)
        entry = decode_entry(raw, digest.hex())
        if isinstance(entry, EncodedBlob) and entry.base is not None and entry.base not in known:
            todo.append(entry.base)
    return sorted(out.items())


def _file_sha256(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def _upload_files(
    store: Path, client: ObjectStore, files: dict[str, str | None], known: _Known
) -> list[tuple[str, str, int]]:
    """Step (1): each file the remote lacks, create-only under its SHA-256; returns
    ``(name, sha256, nbytes)`` of those the segment must name (new to the lineage)."""
    shipped = []
    for name in sorted(files):
        path = store / local_dir(name) / name
        try:
            digest, nbytes = _file_sha256(path)
        except FileNotFoundError:
            raise CorruptionError(
                f"store {store}: {name} is missing; run `engram verify {store}`"
            ) from None
        recorded = files[name]
        if recorded is not None and recorded != digest:
            raise CorruptionError(
                f"store {store}: {name} fails its SHA-256; nothing of it was pushed: run "
                f"`engram verify {store}` and roll back to a good version"
            )
        if (name, digest) in known.files:
            continue
        shipped.append((name, digest, nbytes))
        key = object_key(digest)
        if not client.exists(key):
            _create_immutable(client, key, path)
    return shipped


def _upload_segment(client: ObjectStore, segment: bytes) -> None:
    """Step (2)."""
    _create_immutable(client, object_key(sha256(segment)), segment)


def _create_marker(client: ObjectStore, marker: Marker) -> Ref:
    """Step (3): the marker, create-only. Found there already: the same bytes (a re-run)
    are fine; other bytes under a name that is their hash mean a damaged remote."""
    ref = marker.ref()
    data = marker.encode()
    try:
        client.create(ref.marker, data)
    except AlreadyExists:
        got = client.get(ref.marker)
        if got is None or got.data != data:
            raise RemoteConflictError(
                f"remote {client.url}: {ref.marker} exists with other bytes than this push "
                "writes (412 on a create-only write); nothing was overwritten: the remote is "
                f"damaged or another writer is not engram; run `engram verify {client.url}`"
            ) from None
    return ref


def _push_tags(
    store: Store, client: ObjectStore, lineage: list[Entry]
) -> tuple[list[str], list[str]]:
    """The store's tags on versions the remote holds, on the remote; the names moved,
    and those left deleted: a tag deleted on the remote (``engram tag URL NAME
    --delete``) is not put back at the version it named when deleted, which is what a
    clone that has not heard of the deletion still has (tagging another version here
    pushes it again).

    Raises:
        RemoteConflictError: another writer moved a tag meanwhile (412); nothing of it
            was overwritten.
    """
    on_remote = {(e.ref.version, e.created_at): e.ref for e in lineage}
    moved, kept_deleted = [], []
    for name, vid in sorted(store.tags().items()):
        try:
            created_at = store.manifest(vid)["created_at"]
        except (CorruptionError, VersionNotFoundError):  # `engram verify` says more
            continue
        target = on_remote.get((vid, created_at))
        if target is None:  # a version the remote lacks: the tag stays local
            continue
        current, etag = read_tag_value(client, name)
        if current is not None and current.target == target:
            if current.deleted:
                kept_deleted.append(name)
            continue
        tag = Tag(name, 0 if current is None else current.seq + 1, target)
        try:
            client.swap(tag_key(name), tag.encode(), etag)
        except Stale:
            raise RemoteConflictError(
                f"remote {client.url} tag {name} moved while pushing it (another writer; 412 "
                "on the compare-and-swap); nothing was overwritten: run the push again"
            ) from None
        moved.append(name)
    return moved, kept_deleted


def _settle(client: ObjectStore, seen: Fence, relied: Relied) -> Fence:
    """Before HEAD moves: if a remote gc started since ``seen`` (the fence this push
    last checked), wait until none is deleting, then put back each object of
    ``relied`` it deleted (create-only: the same bytes under the same name), until the
    fence stays still; the fence as checked.

    Raises:
        RemoteError: a gc is still deleting after :data:`GC_WAIT_S` (or was killed
            while it ran): nothing of this version was published; run the push again.
    """
    checked = None if seen.running else seen.generation  # a gc running from the start
    deadline = time.monotonic() + GC_WAIT_S
    for _ in range(_MAX_SETTLE):
        while (now := read_fence(client)).running:
            if time.monotonic() >= deadline:
                raise RemoteError(
                    f"remote {client.url}: a remote gc (generation {now.generation}) is "
                    f"still deleting after {GC_WAIT_S:.0f} s, or was stopped while it ran; "
                    "nothing was published and local versions are intact: run the push "
                    f"again once it ends (a stopped one: run `engram gc {client.url}` to "
                    "finish it)"
                )
            time.sleep(_GC_POLL_S)
        if now.generation == checked:
            return now
        for key, source in relied:  # one request each, only after a gc
            if not client.exists(key):
                _create_immutable(client, key, source)
        checked = now.generation
    raise RemoteError(
        f"remote {client.url}: remote gcs kept starting while this push checked its "
        "objects; nothing was published: run the push again"
    )


def _create_immutable(client: ObjectStore, key: str, data: bytes | Path) -> None:
    # content-addressed: found there, an earlier (or concurrent) push wrote these bytes
    with contextlib.suppress(AlreadyExists):
        client.create(key, data)


def _move_head(
    client: ObjectStore, ref: Ref, etag: str | None, expected: Ref | None, store: Path
) -> str | None:
    """Step (4): HEAD moves from ``expected`` (ETag ``etag``) to ``ref``; the new ETag.

    Raises:
        RemoteConflictError: HEAD moved meanwhile (412) to something else.
    """
    try:
        return client.swap(HEAD_KEY, canonical(ref.to_json()), etag)
    except Stale:
        now, now_etag = read_head(client)
        if now == ref:  # a concurrent push of this same store did it
            return now_etag
        shown = "(none)" if now is None else version_name(now.version)
        raise RemoteConflictError(
            f"remote {client.url} HEAD moved to {shown} while pushing "
            f"{version_name(ref.version)} (another writer; 412 on the compare-and-swap); "
            f"nothing was overwritten: run `engram pull {client.url} NEW_DIR` to continue from "
            f"the remote, or push {store} to another prefix (a branch)"
        ) from None
