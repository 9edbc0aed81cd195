"""The remote's history as push and pull see it, and what a local store remembers of it.

The remote lineage is HEAD's chain of markers, oldest first. Walking it costs one GET
per marker, so a store keeps the chain it last saw in ``<store>/remote.json`` (with the
remote's URL, so ``engram push STORE`` needs no URL the second time); markers are
immutable, so a remembered prefix of the chain stays true and a walk stops at the first
marker it remembers. ``remote.json`` holds no credential (the URL is checked to carry
none, :func:`~engram.store.remote.client.check_url`) and is only a cache: without it
the chain is walked from HEAD.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.errors import RemoteError
from engram.store.history import is_valid_tag_name
from engram.store.remote.client import ObjectStore
from engram.store.remote.layout import (
    GC_KEY,
    HEAD_KEY,
    TAGS_PREFIX,
    Fence,
    Marker,
    Ref,
    Tag,
    parse_head,
    tag_key,
)

REMOTE_FILE = "remote.json"
_MAX_CHAIN = 10**7  # bounds the walk of a damaged (cyclic) chain; ids only decrease anyway


@dataclass(frozen=True)
class Entry:
    """One version of the remote lineage."""

    ref: Ref
    created_at: str
    manifest_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {**self.ref.to_json(), "created_at": self.created_at,
                "manifest_sha256": self.manifest_sha256}  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Entry:
        ref = Ref.from_json({k: obj[k] for k in ("version", "marker", "sha256")}, REMOTE_FILE)
        return cls(ref, str(obj["created_at"]), str(obj["manifest_sha256"]))


@dataclass
class Remembered:
    """``remote.json``: the remote's URL and the lineage last seen there."""

    url: str
    lineage: list[Entry]


def remembered(store: Path) -> Remembered | None:
    """What ``store`` remembers of its remote; None if nothing (or a damaged file)."""
    try:
        obj = json.loads((store / REMOTE_FILE).read_text())
        return Remembered(str(obj["url"]), [Entry.from_json(e) for e in obj["lineage"]])
    except (OSError, ValueError, KeyError, TypeError, RemoteError):
        return None  # a cache: the lineage is walked again


def remember(store: Path, url: str, lineage: list[Entry]) -> None:
    """Write ``remote.json`` atomically (a temporary file renamed over it)."""
    tmp = store / f".{REMOTE_FILE}.{os.getpid()}.tmp"
    data = json.dumps({"url": url, "lineage": [e.to_json() for e in lineage]}, indent=1)
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, store / REMOTE_FILE)


def read_head(client: ObjectStore) -> tuple[Ref | None, str | None]:
    """The remote's HEAD and its ETag (for the compare-and-swap); (None, None) if unset."""
    got = client.get(HEAD_KEY, swapped=True)
    if got is None:
        return None, None
    return parse_head(got.data), got.etag


def read_tag(client: ObjectStore, name: str) -> tuple[Tag | None, str | None]:
    """The remote's tag ``name`` and its ETag; None for the tag if there is none (or it
    was deleted: its tombstone's ETag is still given, for a compare-and-swap)."""
    tag, etag = read_tag_value(client, name)
    return (None if tag is None or tag.deleted else tag), etag


def read_tag_value(client: ObjectStore, name: str) -> tuple[Tag | None, str | None]:
    """The object under tag ``name`` and its ETag, a tombstone included (its ``seq``
    is what the next move counts from); (None, None) if there is none."""
    got = client.get(tag_key(name), swapped=True)
    if got is None:
        return None, None
    return Tag.decode(got.data, name), got.etag


def read_fence(client: ObjectStore) -> Fence:
    """The remote gc's fence (``gc.json``): generation 0, not running, if none ran."""
    got = client.get(GC_KEY, swapped=True)
    return Fence() if got is None else Fence.decode(got.data)


def read_tags(client: ObjectStore) -> dict[str, Tag]:
    """Every tag of the remote (one listing, one read per tag)."""
    names = sorted(
        key[len(TAGS_PREFIX) :]
        for key in client.list(TAGS_PREFIX)
        if is_valid_tag_name(key[len(TAGS_PREFIX) :])  # not a stray or staged file
    )
    tags = {}
    for name in names:
        tag, _ = read_tag(client, name)
        if tag is not None:  # (deleted, maybe since the listing)
            tags[name] = tag
    return tags


def read_marker(client: ObjectStore, ref: Ref) -> Marker:
    got = client.get(ref.marker)
    if got is None:
        raise RemoteError(
            f"remote {client.url}: marker {ref.marker} is missing (named by the remote's "
            "history); the remote is damaged: push it again from a complete store"
        )
    return Marker.decode(got.data, ref)


def walk(
    client: ObjectStore, head: Ref | None, known: list[Entry]
) -> tuple[list[Entry], dict[str, Marker]]:
    """The lineage ending at ``head``, oldest first, reusing the prefix of ``known`` it
    reaches; and the markers it read (those not in ``known``), by key."""
    position = {e.ref: i for i, e in enumerate(known)}
    newer: list[Entry] = []
    markers: dict[str, Marker] = {}
    ref = head
    for _ in range(_MAX_CHAIN):
        if ref is None:
            return newer[::-1], markers
        if ref in position:
            return known[: position[ref] + 1] + newer[::-1], markers
        marker = read_marker(client, ref)
        markers[ref.marker] = marker
        newer.append(Entry(ref, marker.created_at, marker.manifest_sha256))
        ref = marker.parent
    raise RemoteError(f"remote {client.url}: its history is longer than {_MAX_CHAIN} versions")
