"""``engram cache ls`` and ``engram cache prune``: the local copies of remotes.

    engram cache ls                                  # each copy: remote, size, versions
    engram cache prune s3://bucket/runs/ewc --all    # remove that remote's copy
    engram cache prune --keep-last 2                 # every copy: drop fetched files that
                                                     # HEAD, tags and the 2 newest don't need

A copy (:mod:`engram.store.remote.cache`) holds a remote's records and the files reads
fetched; everything pruned is fetched again when read. A copy that a process holds open
(a ``ModelHandle``, ``load_model``, ``engram show``) or is syncing is never pruned
(:func:`engram.store.remote.copies.prune`): named by URL it is an error, otherwise it is
skipped and listed. Reads local files only: no object-store library, no torch.
"""

from __future__ import annotations

import argparse
from typing import Any

from engram.cli.output import EXIT_OK, UsageError, emit_json, human_bytes, table
from engram.errors import RemoteError
from engram.store import version_name
from engram.store.remote.cache import cache_path, cache_root, split_ref
from engram.store.remote.copies import CopyBusyError, copies_in, describe, is_copy, prune


def cache(args: argparse.Namespace) -> int:
    result = _ls() if args.cache_command == "ls" else _prune(args)
    if args.json:
        emit_json(result)
    elif args.cache_command == "ls":
        _print_ls(result)
    else:
        _print_prune(result)
    return EXIT_OK


def _ls() -> dict[str, Any]:
    root = cache_root()
    return {"root": str(root), "copies": [describe(p).to_json() for p in copies_in(root)]}


def _prune(args: argparse.Namespace) -> dict[str, Any]:
    if args.keep_last is not None and args.keep_last < 0:
        raise UsageError("--keep-last must be 0 or more")
    keep_last = None if args.all else args.keep_last
    root = cache_root()
    if args.url is not None:
        try:
            url, ref = split_ref(args.url)
        except RemoteError as e:
            raise UsageError(str(e)) from None
        if ref is not None:
            raise UsageError(f"cache prune {args.url}: name the remote without @{ref}")
        copy = cache_path(url)
        if not is_copy(copy):
            raise UsageError(f"no local copy of {url} in {root} (`engram cache ls` lists them)")
        return {"root": str(root), "pruned": [prune(copy, keep_last=keep_last).to_json()],
                "skipped": []}  # fmt: skip
    pruned, skipped = [], []
    for copy in copies_in(root):
        try:
            pruned.append(prune(copy, keep_last=keep_last).to_json())
        except CopyBusyError as e:
            skipped.append({"path": str(copy), "reason": str(e)})
    return {"root": str(root), "pruned": pruned, "skipped": skipped}


def _print_ls(result: dict[str, Any]) -> None:
    copies = result["copies"]
    if not copies:
        print(f"no copies of remotes in {result['root']}")
        return
    rows = [
        [c["url"] or "?", human_bytes(c["bytes"]), c["versions"],
         version_name(c["head"]) if c["head"] is not None else "-", c["files"],
         c["synced_at"] or "-", "yes" if c["in_use"] else ""]
        for c in copies
    ]  # fmt: skip
    print(f"copies of remotes in {result['root']}:")
    header = ["remote", "on disk", "versions", "HEAD", "files", "last sync (UTC)", "in use"]
    print(table(rows, header, right={1, 2, 4}))
    total = sum(c["bytes"] for c in copies)
    print(f"{_count(len(copies), 'copy', 'copies')}, {human_bytes(total)}; `engram cache "
          "prune URL --all` removes one")  # fmt: skip


def _print_prune(result: dict[str, Any]) -> None:
    freed = 0
    for p in result["pruned"]:
        name = p["url"] or p["path"]
        freed += p["freed_bytes"]
        if p["removed_copy"]:
            print(f"removed the copy of {name} ({human_bytes(p['freed_bytes'])})")
        else:
            print(f"{name}: removed {_count(len(p['files']), 'fetched file')} "
                  f"({human_bytes(p['freed_bytes'])})")  # fmt: skip
    for s in result["skipped"]:
        print(f"skipped {s['path']}: {s['reason']}")
    if not result["pruned"] and not result["skipped"]:
        print(f"no copies of remotes in {result['root']}")
    elif len(result["pruned"]) > 1:
        print(f"freed {human_bytes(freed)}")


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"
