"""``engram rollback`` and ``tag``: moving HEAD and the named versions.

``engram tag s3://BUCKET/PREFIX NAME [VERSION] [--delete]`` moves or deletes a tag on
the remote itself, by compare-and-swap (:mod:`engram.store.remote.tags`)."""

from __future__ import annotations

import argparse
from typing import Any

from engram.cli.common import report
from engram.cli.output import EXIT_OK, UsageError, emit_json
from engram.store import Store, version_name

# ------------------------------------------------------------------ rollback


def rollback(args: argparse.Namespace) -> int:
    return report(args, lambda store: move_head(store, args.version), print_rollback, mode="w")


def move_head(store: Store, version: str) -> dict[str, Any]:
    """HEAD moved to ``version``: the new and the previous HEAD ids."""
    before = store.head
    info = store.rollback(version)
    return {"head": info.id, "previous": before.id if before else None}


def print_rollback(result: dict[str, Any]) -> None:
    prev = version_name(result["previous"]) if result["previous"] is not None else "none"
    print(
        f"HEAD -> {version_name(result['head'])} (was {prev}); "
        "later versions stay until `engram gc`"
    )


# ------------------------------------------------------------------ tag


def tag(args: argparse.Namespace) -> int:
    if "://" in args.store:
        return _remote_tag(args)
    compute = lambda store: set_tag(store, args.name, args.version, delete=args.delete)  # noqa: E731
    return report(args, compute, print_tag, mode="w")


def _remote_tag(args: argparse.Namespace) -> int:
    """A tag of a remote, moved or deleted there (no local store is opened)."""
    from engram.store.remote import tags

    if args.delete:
        if args.version is not None:
            raise UsageError("tag --delete takes no VERSION")
        result = tags.delete_tag(args.store, args.name)
    else:
        result = tags.set_tag(args.store, args.name, args.version or "HEAD")
    if args.json:
        emit_json(result)
    else:
        print_tag(result)
    return EXIT_OK


def set_tag(store: Store, name: str, version: str | None, *, delete: bool) -> dict[str, Any]:
    """Point tag ``name`` at ``version`` (default HEAD), or delete it; the tag, the
    version it now names (None once deleted) and the one it named before."""
    if delete:
        if version is not None:
            raise UsageError("tag --delete takes no VERSION")
        was = store.tags().get(name)
        store.untag(name)
        return {"tag": name, "version": None, "previous": was}
    was = store.tags().get(name)
    try:
        info = store.tag(name, version if version is not None else "HEAD")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return {"tag": name, "version": info.id, "previous": was}


def print_tag(result: dict[str, Any]) -> None:
    name, now, was = result["tag"], result["version"], result["previous"]
    where = f" on {result['remote']}" if "remote" in result else ""
    if now is None:
        print(f"deleted tag {name}{where} (was {version_name(was)})")
    else:
        moved = f" (moved from {version_name(was)})" if was not in (None, now) else ""
        print(f"tag {name}{where} -> {version_name(now)}{moved}")
