"""A remote's tags moved or deleted in place: ``engram tag s3://... NAME [VERSION]
[--delete]``, without a local store.

Both are one compare-and-swap of ``refs/tags/NAME`` from the value read first, as a
push moves a tag: a 412 means another writer moved it meanwhile, and nothing is
changed. A deleted tag becomes a *tombstone* (:class:`~engram.store.remote.layout.Tag`
with ``deleted``): S3 has no conditional delete, and the tombstone keeps the tag's
``seq`` counting (a file:// remote's claims need a value never to repeat) and the
version it named, so a push from a clone that still has the tag there does not put it
back (:func:`~engram.store.remote.push._push_tags`). Readers see no tag: ``engram ls
URL`` lists none, ``URL@NAME`` is "no tag", and a :class:`~engram.ModelHandle`
following it warns once and keeps serving what it has.
"""

from __future__ import annotations

import re
from typing import Any

from engram.errors import RemoteConflictError, RemoteError, VersionNotFoundError
from engram.store.history import is_valid_tag_name
from engram.store.remote.client import ObjectStore, Stale
from engram.store.remote.layout import Ref, Tag, tag_key
from engram.store.remote.lineage import read_head, read_tag, read_tag_value, read_tags, walk
from engram.store.values import version_name

_HEAD_ANCESTOR = re.compile(r"HEAD~(\d+)")
_VERSION = re.compile(r"v?(\d+)")


def delete_tag(url: str, name: str) -> dict[str, Any]:
    """Delete the remote's tag ``name``; ``{"remote", "tag", "version": None,
    "previous"}``.

    Raises:
        VersionNotFoundError: the remote has no such tag.
        RemoteConflictError: another writer moved it meanwhile (412); nothing changed.
    """
    client = ObjectStore(url)
    current, etag = read_tag_value(client, name)
    if current is None or current.deleted:
        raise _no_tag(client, name)
    tombstone = Tag(name, current.seq + 1, current.target, deleted=True)
    _swap(client, tombstone, etag, "deleting")
    return {"remote": client.url, "tag": name, "version": None,
            "previous": current.target.version}  # fmt: skip


def set_tag(url: str, name: str, version: str) -> dict[str, Any]:
    """Point the remote's tag ``name`` at ``version`` (``vNNNN``, an id, ``HEAD``,
    ``HEAD~N`` or another tag of the remote), creating it or moving it; ``{"remote",
    "tag", "version", "previous"}``.

    Raises:
        VersionNotFoundError: ``version`` is not on the remote's history.
        RemoteConflictError: another writer moved the tag meanwhile; nothing changed.
    """
    if not is_valid_tag_name(name):
        raise RemoteError(
            f"invalid tag name {name!r}: use letters, digits, '.', '_' or '-', starting with "
            "a letter or '_', not 'HEAD' and not a version name like 'v0003'"
        )
    client = ObjectStore(url)
    target = _resolve(client, version)
    current, etag = read_tag_value(client, name)
    live = current is not None and not current.deleted
    previous = current.target.version if live and current is not None else None
    if not (live and current is not None and current.target == target):
        seq = 0 if current is None else current.seq + 1
        _swap(client, Tag(name, seq, target), etag, "moving")
    return {"remote": client.url, "tag": name, "version": target.version, "previous": previous}


def _resolve(client: ObjectStore, version: str) -> Ref:
    """The marker ``version`` names on the remote's history (one read per marker)."""
    head, _ = read_head(client)
    if head is None:
        raise RemoteError(f"remote {client.url} has no versions yet: push one first")
    lineage = [e.ref for e in walk(client, head, [])[0]]
    back = _HEAD_ANCESTOR.fullmatch(version)
    number = _VERSION.fullmatch(version)
    if version == "HEAD":
        return head
    if back and int(back[1]) < len(lineage):
        return lineage[-1 - int(back[1])]
    if number:
        found = [ref for ref in lineage if ref.version == int(number[1])]
        if found:
            return found[0]
    elif not back and is_valid_tag_name(version):
        tag, _ = read_tag(client, version)
        if tag is not None and tag.target in lineage:
            return tag.target
    raise VersionNotFoundError(
        f"remote {client.url} has no version or tag {version!r} on its history (HEAD "
        f"{version_name(head.version)}); list them with `engram ls {client.url}`"
    )


def _swap(client: ObjectStore, tag: Tag, etag: str | None, doing: str) -> None:
    try:
        client.swap(tag_key(tag.name), tag.encode(), etag)
    except Stale:
        raise RemoteConflictError(
            f"remote {client.url} tag {tag.name} moved while {doing} it (another writer; "
            "412 on the compare-and-swap); nothing was changed: run the command again"
        ) from None


def _no_tag(client: ObjectStore, name: str) -> VersionNotFoundError:
    names = ", ".join(sorted(read_tags(client))) or "none"
    return VersionNotFoundError(f"remote {client.url} has no tag {name!r} (tags: {names})")
