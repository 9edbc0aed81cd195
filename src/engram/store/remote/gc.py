"""``gc`` of a remote: delete the objects no remote ref reaches, never a push's.

    report = gc("s3://bucket/runs/ewc", dry_run=True)   # what it would remove
    report = gc("s3://bucket/runs/ewc")                 # remove it

What it may delete: markers (``versions/``) and objects (``objects/``) that no ref
reaches — HEAD, the tags, and their lineages (each marker, its segment, the files the
segment names). Those are what a push killed before moving HEAD leaves behind (its
files, segment and marker), or an upload a concurrent push has not published *yet*:
the hard part is telling them apart, since S3 has no conditional delete.

How an in-flight push keeps its objects (docs/remote.md, "Remote gc"):

1. **A fence.** The gc first moves ``gc.json`` (compare-and-swap) to a new generation,
   marked running, and marks it done when it stops. A push reads it before it looks
   anything up, and again before it moves HEAD (:func:`~engram.store.remote.push._settle`):
   if a gc started in between, the push waits for it to finish, then checks each object
   it wrote or found and puts back (create-only, same bytes) any that was deleted. So
   a push paused for any time between its files and its marker loses nothing.
2. **Refs read twice.** The gc lists the remote first, then reads HEAD and the tags,
   and reads them again just before deleting (walking again if they moved): an object
   published before that second read is reachable, so it stays.
3. **A grace period** (default 24 h, ``--grace``): an unreferenced object is deleted
   only if the server last wrote it at least that long before the gc's fence (both
   times from the server's clock, in the listing). It covers what the fence cannot: a
   push by an engram that predates it, and a push stalled for longer than the gc's
   listing between its last fence read and its HEAD compare-and-swap (two consecutive
   requests).
4. **One gc at a time**: a gc that starts while another runs takes the fence over;
   the other stops before its next deletion.

A dry run writes nothing, not even the fence, and ages objects by this machine's clock.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from typing import Any

from engram.errors import RemoteError
from engram.store.remote.client import ObjectStore, Stale
from engram.store.remote.layout import (
    GC_KEY,
    STORE_KEY,
    Fence,
    Ref,
    Segment,
    is_immutable_key,
    object_key,
)
from engram.store.remote.lineage import read_head, read_marker, read_tags

GRACE_S = 24 * 3600.0  # pushes by an engram without the fence are safe for this long
_MAX_ROUNDS = 5  # refs moving between the gc's two reads: walk again, this many times
_MAX_CHAIN = 10**7  # bounds a walk of a damaged (cyclic) chain; ids only decrease anyway
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

Refs = tuple[Ref | None, tuple[tuple[str, Ref], ...]]  # HEAD, and the tags by name


@dataclass
class RemoteGcReport:
    """What a remote gc removed (or, dry, would remove) and kept (``--json`` prints it)."""

    remote: str
    dry_run: bool
    grace_s: float
    head: int | None
    tags: dict[str, int]
    versions: int  # versions the refs reach
    kept_objects: int  # objects and markers the refs reach
    kept_bytes: int
    removed: list[dict[str, Any]] = field(default_factory=list)  # {"key", "bytes"}
    removed_bytes: int = 0
    recent: list[dict[str, Any]] = field(default_factory=list)  # unreferenced, too young

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"30m"``, ``"24h"``, ``"7d"``."""
    found = _DURATION.fullmatch(text.strip())
    if not found:
        raise RemoteError(f"--grace {text!r} is not a duration: give e.g. 0, 90s, 30m, 24h, 7d")
    return float(found[1]) * _UNITS[found[2]]


def gc(url: str, *, dry_run: bool = False, grace_s: float = GRACE_S) -> RemoteGcReport:
    """Delete the remote's objects and markers no ref reaches that are older than
    ``grace_s`` (see the module docstring); ``dry_run``: only say which.

    Raises:
        RemoteError: the remote cannot be read, holds no store, its history cannot be
            read whole (nothing is deleted then), or another gc took over.
    """
    if grace_s < 0:
        raise RemoteError("--grace must be 0 or more")
    client = ObjectStore(url)
    if client.get(STORE_KEY) is None:
        raise RemoteError(f"remote {client.url} holds no engram store (no {STORE_KEY})")
    if dry_run:
        return _collect(client, None, grace_s)
    fence, etag = _start(client)
    try:
        report = _collect(client, fence, grace_s)
    except BaseException:
        _finish(client, fence, etag, quiet=True)
        raise
    _finish(client, fence, etag, quiet=False)
    return report


def _collect(client: ObjectStore, fence: Fence | None, grace_s: float) -> RemoteGcReport:
    listing = {meta.key: meta for meta in client.list_meta()}
    if fence is None:
        now = _dt.datetime.now(_dt.UTC)
    elif GC_KEY in listing:  # the server's time of the fence, to the listing's precision
        now = listing[GC_KEY].last_modified
    else:
        raise RemoteError(f"remote {client.url}: {GC_KEY} is not listed right after it was written")
    walker = _Walker(client)
    refs = _refs(client)
    reachable, versions = walker.reach(refs)
    for _ in range(_MAX_ROUNDS):  # read again: anything published meanwhile is reached
        again = _refs(client)
        if again == refs:
            break
        refs = again
        reachable, versions = walker.reach(refs)
    else:
        raise RemoteError(
            f"remote {client.url}: its HEAD and tags kept moving while gc read them; "
            "nothing was removed: run gc again"
        )
    cutoff = now - _dt.timedelta(seconds=grace_s)
    unreferenced = sorted(
        (m for m in listing.values() if is_immutable_key(m.key) and m.key not in reachable),
        key=lambda m: m.key,
    )
    old = [m for m in unreferenced if m.last_modified <= cutoff]
    head, tags = refs
    kept = [listing[k] for k in reachable if k in listing]
    report = RemoteGcReport(
        remote=client.url,
        dry_run=fence is None,
        grace_s=grace_s,
        head=None if head is None else head.version,
        tags={name: ref.version for name, ref in tags},
        versions=versions,
        kept_objects=len(kept),
        kept_bytes=sum(m.size for m in kept),
        recent=[{"key": m.key, "bytes": m.size} for m in unreferenced if m.last_modified > cutoff],
    )
    for meta in old:
        if fence is not None:
            _check_ours(client, fence, report)
            client.delete(meta.key)
        report.removed.append({"key": meta.key, "bytes": meta.size})
        report.removed_bytes += meta.size
    return report


def _refs(client: ObjectStore) -> Refs:
    head, _ = read_head(client)
    tags = tuple(sorted((name, tag.target) for name, tag in read_tags(client).items()))
    return head, tags


class _Walker:
    """The keys the refs reach; each marker (and its segment) read once per gc."""

    def __init__(self, client: ObjectStore) -> None:
        self.client = client
        self.parents: dict[str, Ref | None] = {}  # marker key -> its parent's ref
        self.keys: dict[str, set[str]] = {}  # marker key -> the keys it reaches itself

    def reach(self, refs: Refs) -> tuple[set[str], int]:
        """The keys reached from ``refs``, and how many versions that is."""
        head, tags = refs
        seen: set[str] = set()
        for start in (head, *(ref for _, ref in tags)):
            ref = start
            for _ in range(_MAX_CHAIN):
                if ref is None or ref.marker in seen:
                    break
                seen.add(ref.marker)
                ref = self._read(ref)
        reached = set().union(*(self.keys[m] for m in seen)) if seen else set()
        return reached, len(seen)

    def _read(self, ref: Ref) -> Ref | None:
        if ref.marker not in self.keys:
            try:
                marker = read_marker(self.client, ref)
                key = object_key(marker.segment_sha256)
                got = self.client.get(key)
                if got is None:
                    raise RemoteError(f"remote {self.client.url}: segment {key} is missing")
                segment = Segment.decode(got.data, marker, key)
            except RemoteError as e:
                raise RemoteError(
                    f"{e}; gc removes nothing from a remote whose history it cannot read "
                    f"whole: run `engram verify {self.client.url} --all`"
                ) from None
            self.keys[ref.marker] = {ref.marker, key} | {
                object_key(digest) for _, digest, _ in segment.files
            }
            self.parents[ref.marker] = marker.parent
        return self.parents[ref.marker]


def _start(client: ObjectStore) -> tuple[Fence, str | None]:
    """The fence moved to a new generation, running; it and its ETag."""
    got = client.get(GC_KEY, swapped=True)
    current = Fence() if got is None else Fence.decode(got.data)
    fence = Fence(current.generation + 1, running=True)
    try:
        etag = client.swap(GC_KEY, fence.encode(), None if got is None else got.etag)
    except Stale:
        raise RemoteError(
            f"remote {client.url}: another gc started at the same moment; nothing was "
            "removed: run gc again once it ends"
        ) from None
    return fence, etag


def _check_ours(client: ObjectStore, fence: Fence, report: RemoteGcReport) -> None:
    got = client.get(GC_KEY, swapped=True)
    if got is None or Fence.decode(got.data).generation != fence.generation:
        raise RemoteError(
            f"remote {client.url}: another gc took over while this one was deleting "
            f"({len(report.removed)} objects removed); it goes on from there"
        )


def _finish(client: ObjectStore, fence: Fence, etag: str | None, *, quiet: bool) -> None:
    """The fence marked done (pushes waiting on it go on), unless another gc took it
    over. ``quiet``: on the way out of a failure, which says more than this would."""
    try:
        client.swap(GC_KEY, Fence(fence.generation, running=False).encode(), etag)
    except Stale:
        return  # another gc's now: it marks it done
    except RemoteError:
        if not quiet:
            raise
