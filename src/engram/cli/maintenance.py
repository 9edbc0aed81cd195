"""``engram gc``, ``compact`` and ``du``: what a store holds on disk, and shrinking it.

``engram gc s3://BUCKET/PREFIX [--dry-run] [--grace 24h]`` collects a remote instead:
the objects no remote ref reaches, never those of a push in flight
(:mod:`engram.store.remote.gc`).

``du`` reads no tensor: it charges manifests, chunks and files to components through
``store.inspect`` (replay slot tables are the only LMDB values it reads).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from engram.cli.common import (
    damaged_versions,
    describe_group,
    group_of,
    print_damaged,
    report,
)
from engram.cli.output import EXIT_OK, UsageError, emit_json, human_bytes, table
from engram.run import RUN_FILES  # light: the names engram-train keeps in a store
from engram.store import Store, version_name
from engram.store.inspect import Usage, disk_usage

# ------------------------------------------------------------------ gc


def gc(args: argparse.Namespace) -> int:
    if "://" in args.store:
        return _remote_gc(args)
    if args.dry_run or args.grace is not None:
        raise UsageError("--dry-run and --grace are for a remote (engram gc s3://...)")
    if args.keep_last is not None and args.keep_last < 0:
        raise UsageError("--keep-last must be 0 or more")
    return report(args, lambda store: collect(store, keep_last=args.keep_last), print_gc, mode="w")


def _remote_gc(args: argparse.Namespace) -> int:
    """Why a URL and not ``gc STORE --remote``: a remote's gc needs no store (it reads
    only the remote), and any machine that can write the bucket may run it."""
    from engram.store.remote import gc as remote

    if args.keep_last is not None:
        raise UsageError(
            "--keep-last is for a local store: a remote keeps every version of its HEAD's "
            "history (its gc removes what no ref reaches)"
        )
    grace = remote.GRACE_S if args.grace is None else remote.parse_duration(args.grace)
    result = remote.gc(args.store, dry_run=args.dry_run, grace_s=grace).to_json()
    if args.json:
        emit_json(result)
    else:
        print_remote_gc(result)
    return EXIT_OK


def print_remote_gc(result: dict[str, Any]) -> None:
    verb = "would remove" if result["dry_run"] else "removed"
    dry = " (dry run: nothing removed)" if result["dry_run"] else ""
    removed = result["removed"]
    print(
        f"{result['remote']}{dry}: {verb} {len(removed)} unreferenced objects "
        f"({human_bytes(result['removed_bytes'])})"
    )
    for item in removed:
        print(f"  {verb} {item['key']} ({human_bytes(item['bytes'])})")
    recent = result["recent"]
    if recent:
        print(
            f"kept {len(recent)} unreferenced objects younger than the grace period "
            f"({_duration(result['grace_s'])}; a push may still publish them):"
        )
        for item in recent:
            print(f"  kept {item['key']} ({human_bytes(item['bytes'])})")
    head = version_name(result["head"]) if result["head"] is not None else "none"
    tags = "".join(f", {n} {version_name(v)}" for n, v in sorted(result["tags"].items()))
    print(
        f"kept {result['kept_objects']} objects ({human_bytes(result['kept_bytes'])}) of "
        f"{result['versions']} versions (HEAD {head}{tags})"
    )


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def collect(store: Store, *, keep_last: int | None) -> dict[str, Any]:
    """Run :meth:`Store.gc`: what it dropped and kept, and the bytes freed on disk."""
    before = disk_usage(store.path, RUN_FILES)
    report = store.gc(keep_last=keep_last)
    after = disk_usage(store.path, RUN_FILES)
    head = store.head
    tags = store.tags()
    kept = [v.id for v in store.versions()]
    # LMDB reuses the pages gc frees but never shrinks its file: count the files only.
    files_before = before["blobs"] + before["checkpoints"]
    freed = files_before - (after["blobs"] + after["checkpoints"])
    return {
        "dropped": [version_name(v) for v in report.versions],
        "kept": [version_name(v) for v in kept],
        "head": version_name(head.id) if head else None,
        "tags": {name: version_name(v) for name, v in sorted(tags.items())},
        "blobs": report.blobs,
        "blob_bytes": report.blob_bytes,
        "samples": report.samples,
        "files": list(report.files),
        "freed_bytes": max(freed, 0),
        "disk_before": _store_bytes(before),
        "disk_after": _store_bytes(after),
    }


def _store_bytes(disk: dict[str, int]) -> int:
    """The store's own bytes on disk (not the run files beside it)."""
    return sum(v for k, v in disk.items() if k != "run_files")


def print_gc(result: dict[str, Any]) -> None:
    print(f"dropped versions: {', '.join(result['dropped']) or 'none'}")
    print(
        f"unreferenced: {result['blobs']} chunks ({human_bytes(result['blob_bytes'])}), "
        f"{result['samples']} replay samples, {len(result['files'])} files"
    )
    for f in result["files"]:
        print(f"  removed {f}")
    print(
        f"freed {human_bytes(result['freed_bytes'])} of pack and checkpoint files (store on "
        f"disk {human_bytes(result['disk_before'])} -> {human_bytes(result['disk_after'])}; "
        "LMDB reuses freed pages without shrinking its file)"
    )
    print(
        f"kept {len(result['kept'])} versions (HEAD {result['head']}"
        + "".join(f", {n} {v}" for n, v in result["tags"].items())
        + ")"
    )


# ------------------------------------------------------------------ compact


def compact(args: argparse.Namespace) -> int:
    compute = lambda store: compact_store(store, tagged=args.tagged)  # noqa: E731
    return report(args, compute, print_compact, mode="w")


def compact_store(store: Store, *, tagged: bool) -> dict[str, Any]:
    """Run :meth:`Store.compact`: the versions delta-coded, the bytes before and after."""
    before = disk_usage(store.path, RUN_FILES)
    report = store.compact(tagged=tagged)
    after = disk_usage(store.path, RUN_FILES)
    return {
        "versions": [version_name(v) for v in report.versions],
        "blobs": report.blobs,
        "raw_bytes": report.raw_bytes,
        "stored_bytes": report.stored_bytes,
        "files": list(report.files),
        "disk_before": _store_bytes(before),
        "disk_after": _store_bytes(after),
    }


def print_compact(result: dict[str, Any]) -> None:
    versions = ", ".join(result["versions"]) or "none (nothing new to compact)"
    print(f"compacted versions: {versions}")
    print(
        f"{result['blobs']} chunks: {human_bytes(result['raw_bytes'])} stored as "
        f"{human_bytes(result['stored_bytes'])}; {len(result['files'])} files removed; store "
        f"on disk {human_bytes(result['disk_before'])} -> {human_bytes(result['disk_after'])}"
    )


# ------------------------------------------------------------------ du


_KIND_ORDER = ("model", "optimizer", "strategy", "state", "replay", "other", "metadata")


@dataclass
class _Usage:
    name: str
    kind: str
    label: str
    logical: int = 0  # summed over versions
    unique: int = 0  # each distinct chunk / file / sample once

    def json(self) -> dict[str, Any]:
        return dict(vars(self))


def du(args: argparse.Namespace) -> int:
    return report(args, lambda store: disk_report(store, args.store),
                  lambda result: print_du(result, args.store))  # fmt: skip


def disk_report(store: Store, path: str) -> dict[str, Any]:
    """Bytes per component, logical (summed over versions) and stored once, the store's
    files on disk, and the deduplication ratio; ``path`` is the store as typed."""
    report = store.inspect.usage(_component)
    disk = disk_usage(store.path, RUN_FILES)
    damaged = damaged_versions(store, path) if report.damaged else []
    usage = {
        name: _Usage(name, *_describe_usage(name, u), u.logical, u.unique)
        for name, u in report.components.items()
    }
    on_disk = disk["blobs"] + disk["checkpoints"] + disk["lmdb"] + disk["other"]
    logical = sum(u.logical for u in usage.values())
    unique = sum(u.unique for u in usage.values())
    return {
        "versions": report.versions,
        "components": [
            u.json()
            for u in sorted(usage.values(), key=lambda u: (_KIND_ORDER.index(u.kind), u.name))
            if u.logical or u.name == "model"
        ],
        "logical_bytes": logical,
        "unique_bytes": unique,
        "disk": {
            "blobs": disk["blobs"],
            "checkpoints": disk["checkpoints"],
            "lmdb": disk["lmdb"],
            "other": disk["other"],
            "total": on_disk,
        },
        "run_files_bytes": disk["run_files"],
        "dedup_ratio": logical / on_disk if on_disk else None,
        "damaged": damaged,  # versions left out: their manifests cannot be read
    }


def _component(kind: str, path: str) -> str:
    """The ``du`` component a charge of :meth:`Inspector.usage` goes to."""
    if kind == "state":
        return group_of(path)
    if kind == "samples":
        return f"{group_of(path)}#samples"
    return "model" if kind == "model" else "metadata"


def _describe_usage(name: str, usage: Usage) -> tuple[str, str]:
    """``(kind, label)`` of a ``du`` component."""
    if usage.kind == "model":
        return "model", "model weights"
    if usage.kind == "manifest":
        return "metadata", "manifests (JSON)"
    if usage.kind == "samples":
        buffer = name.removesuffix("#samples").removeprefix("plugins/")
        return "replay", f"replay buffer {buffer!r} (samples)"
    return describe_group(name, usage.slot_tables)


def print_du(result: dict[str, Any], path: str) -> None:
    disk = result["disk"]
    logical, on_disk = result["logical_bytes"], disk["total"]
    print(f"{path}: {result['versions']} versions")
    print_damaged(result["damaged"])
    print()
    rows = [
        [u["label"], human_bytes(u["logical"]), human_bytes(u["unique"])]
        for u in result["components"]
    ]
    rows.append(["total", human_bytes(logical), human_bytes(result["unique_bytes"])])
    print(table(rows, ["component", "logical (all versions)", "stored once"], right={1, 2}))
    print()
    rows = [
        ["blobs/ (state tensors, packed)", human_bytes(disk["blobs"])],
        ["checkpoints/ (model weights)", human_bytes(disk["checkpoints"])],
        ["memory.lmdb/ (index, manifests, replay samples)", human_bytes(disk["lmdb"])],
        ["other (lock file)", human_bytes(disk["other"])],
        ["total on disk", human_bytes(on_disk)],
    ]
    print(table(rows, ["on disk", "bytes"], right={1}))
    if result["dedup_ratio"] is not None:
        print(
            f"\ndeduplication: {human_bytes(logical)} logical in {human_bytes(on_disk)} "
            f"on disk = {result['dedup_ratio']:.1f}x"
        )
    if result["run_files_bytes"]:
        print(
            f"(run files beside the store, hydra/ and tb/: "
            f"{human_bytes(result['run_files_bytes'])}, not counted)"
        )
