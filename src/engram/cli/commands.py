"""The ``engram`` subcommands that read or manage a store (export is in its own module).

Each takes the parsed arguments, prints text or (``--json``) one JSON document, and
returns the exit code. State trees are summarised from manifests (no tensor is read for
``ls``, ``show`` or ``du``; ``du`` reads only replay slot tables, through
``store.inspect``); ``diff`` loads the two versions through ``Store.load``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engram.cli import EXIT_OK, EXIT_PROBLEMS, UsageError, emit_json, human_bytes, table
from engram.errors import StoreNotFoundError
from engram.store import FORMAT_VERSION, Store, VersionInfo, version_name
from engram.store.codec import TAG_SAMPLES, ArrayRecord, decode_tree
from engram.store.inspect import Usage, disk_usage, tree_arrays

# Top-level keys of a DurableTemplate state that are bookkeeping, not learned memory.
_BOOKKEEPING = ("rng", "clock", "cursor", "adaptations", "metrics")


@contextmanager
def open_store(path: str, mode: str = "r") -> Iterator[Store]:
    try:
        store = Store.open(path, mode=mode)  # type: ignore[arg-type]
    except StoreNotFoundError:
        raise UsageError(f"no store at {path}: the path does not exist") from None
    with store:
        yield store


# ------------------------------------------------------------------ state trees


def group_of(path: str) -> str:
    """The component a state path belongs to: ``plugins/<name>``, a top key, or ``other``."""
    parts = path.strip("/").split("/")
    if parts[0] == "plugins" and len(parts) > 2:
        return f"plugins/{parts[1]}"
    if parts[0] in _BOOKKEEPING or not parts[0]:
        return "other"
    return parts[0]


def describe_group(group: str, replay: bool) -> tuple[str, str]:
    """``(kind, label)`` of a component for the tables."""
    name = group.removeprefix("plugins/")
    if group == "optimizer":
        return "optimizer", "optimizer"
    if group == "other":
        return "other", "other state (rng, clock, cursor, metrics)"
    if replay:
        return "replay", f"replay buffer {name!r} (slot tables)"
    if group.startswith("plugins/"):
        return "strategy", f"strategy state {name!r}"
    return "state", f"state {name!r}"


def flatten(tree: Any, path: str = "") -> dict[str, Any]:
    """Leaves of a loaded state by path, with the same paths as
    :func:`~engram.store.inspect.tree_arrays`."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{path}/{key}"))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{path}/{i}"))
    else:
        out[path] = tree
    return out


def _plain(tree: Any) -> Any:
    """A loaded subtree as JSON (tensors as nested lists)."""
    if isinstance(tree, torch.Tensor | np.ndarray):
        return tree.tolist()
    if isinstance(tree, dict):
        return {str(k): _plain(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_plain(v) for v in tree]
    return tree


def _model_records(manifest: dict[str, Any]) -> list[tuple[str, ArrayRecord]]:
    """The weight records of a compacted version (format 2 ``"model"``), else none."""
    model = manifest.get("model")
    if not isinstance(model, dict) or "tensors" not in model:
        return []
    return tree_arrays(model["tensors"])


def _compacted_model(manifest: dict[str, Any]) -> dict[str, Any] | None:
    recs = _model_records(manifest)
    if not recs:
        return None
    nbytes = sum(r.nbytes for _, r in recs)
    return {"file": manifest["model"].get("file"), "tensors": len(recs), "nbytes": nbytes}


def _version_json(v: VersionInfo, head: int | None) -> dict[str, Any]:
    metrics = v.meta.get("metrics") if isinstance(v.meta.get("metrics"), dict) else {}
    return {
        "id": v.id,
        "name": v.name,
        "parent": v.parent,
        "head": v.id == head,
        "tags": list(v.tags),
        "experience": v.meta.get("experience"),
        "kind": v.meta.get("kind"),
        "average_accuracy": metrics.get("average_accuracy"),
        "forgetting": metrics.get("forgetting"),
        "nbytes": v.nbytes,
        "new_bytes": v.new_bytes,
        "created_at": v.created_at,
        "message": v.message,
        "checkpoint": v.checkpoint,
        # Store.compact() moved the weights into delta-coded blobs (format 2)
        "compacted": bool(getattr(v, "compacted", False)),
    }


def _indent(text: str) -> str:
    return "  " + text.replace("\n", "\n  ")


def _num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return "-" if x is None else str(x)
    return f"{x:.{digits}f}"


# ------------------------------------------------------------------ ls


def _damaged(store: Store, path: str) -> list[dict[str, Any]]:
    """The versions whose manifests cannot be read, each with the command that drops
    it (``gc --keep-last``: the CLI's only way to drop one version; HEAD and tagged
    versions must be moved off first)."""
    damaged = dict(store.damaged())
    if not damaged:
        return []
    head, tags = store.inspect.head_id(), store.tags()
    ids = sorted({v.id for v in store.versions()} | set(damaged))
    good = [v for v in ids if v not in damaged]
    shown = shlex.quote(path)
    out = []
    for vid, message in damaged.items():
        names = sorted(name for name, t in tags.items() if t == vid)
        if vid == head:
            to = version_name(good[-1]) if good else "VERSION"
            repair = (
                f"it is HEAD: move HEAD to a good version (`engram rollback {shown} {to}`), "
                f"then run `engram ls {shown}` again"
            )
        elif names:
            repair = (
                f"it is tagged {', '.join(names)}: delete the tag (`engram tag {shown} "
                f"{names[0]} --delete`), then run `engram ls {shown}` again"
            )
        else:
            newer = sum(1 for v in ids if v > vid)
            older = [version_name(v) for v in ids
                     if v < vid and v != head and v not in tags.values()]  # fmt: skip
            also = f", and also drops {', '.join(older)}" if older else ""
            repair = (
                f"`engram gc {shown} --keep-last {newer}` drops it (it keeps the {newer} "
                f"newest, HEAD and tagged versions{also})"
            )
        out.append({"id": vid, "name": version_name(vid), "message": message, "repair": repair})
    return out


def _print_damaged(damaged: list[dict[str, Any]]) -> None:
    for d in damaged:
        print(f"{d['name']}: damaged manifest, left out ({' '.join(d['message'].split())}); "
              f"{d['repair']}")  # fmt: skip


def ls(args: argparse.Namespace) -> int:
    with open_store(args.store) as store:
        versions = store.versions()
        damaged = _damaged(store, args.store)
        head_id = store.inspect.head_id()  # HEAD's manifest may be a damaged one
        store_id = store.store_id
    rows = [_version_json(v, head_id) for v in versions]
    if args.json:
        emit_json({"store": args.store, "store_id": store_id, "head": head_id, "versions": rows,
                   "damaged": damaged})  # fmt: skip
        return EXIT_OK
    if not rows and not damaged:
        print(f"{args.store}: no versions yet")
        return EXIT_OK
    if not rows:
        _print_damaged(damaged)
        return EXIT_OK
    cells = [
        [
            "*" if r["head"] else "",
            r["name"],
            version_name(r["parent"]) if r["parent"] is not None else "-",
            "-" if r["experience"] is None else r["experience"],
            r["kind"] or "-",
            ",".join(r["tags"]),
            _num(r["average_accuracy"]),
            _num(r["forgetting"]),
            human_bytes(r["nbytes"]),
            human_bytes(r["new_bytes"]),
            r["created_at"][:19].replace("T", " "),
        ]
        for r in rows
    ]
    header = [
        "",
        "version",
        "parent",
        "exp",
        "kind",
        "tags",
        "avg acc",
        "forgetting",
        "size",
        "written",
        "created (UTC)",
    ]
    print(table(cells, header, right={3, 6, 7, 8, 9}))
    _print_damaged(damaged)
    return EXIT_OK


# ------------------------------------------------------------------ show


def show(args: argparse.Namespace) -> int:
    with open_store(args.store) as store:
        info = store.info(args.version)
        manifest = store.manifest(info.id)
        head = store.head
        recs = tree_arrays(manifest["state"])
        metrics_tree = (
            manifest["state"].get("metrics") if isinstance(manifest["state"], dict) else None
        )
        state_metrics: Any = None
        if metrics_tree is not None:
            if tree_arrays(
                metrics_tree
            ):  # tensors in it: read the state (small ones only expected)
                state_metrics = _plain(store.load(info.id, model=False).state.get("metrics"))
            else:  # plain JSON, already in the manifest
                state_metrics = decode_tree(metrics_tree, lambda r, p: None)
    replay = {group_of(p) for p, r in recs if r.kind == TAG_SAMPLES}
    components: dict[str, dict[str, Any]] = {}
    for path, record in recs:
        group = group_of(path)
        kind, label = describe_group(group, group in replay)
        c = components.setdefault(
            group, {"name": group, "kind": kind, "label": label, "tensors": 0, "nbytes": 0}
        )
        c["tensors"] += 1
        c["nbytes"] += record.nbytes
    ckpt = manifest["checkpoint"]
    out = {
        **_version_json(info, head.id if head else None),
        "store_id": manifest["store_id"],
        "engram_version": manifest.get("engram_version"),
        "strategy": info.meta.get("strategy"),
        "meta": info.meta,
        "hparams": info.meta.get("hparams"),
        "model_spec": info.meta.get("model_spec"),
        "execution": info.meta.get("execution"),
        "checkpoint": None
        if ckpt is None
        else {"file": ckpt["file"], "nbytes": ckpt["nbytes"], "sha256": ckpt["sha256"]},
        "compacted_model": _compacted_model(manifest),
        "components": list(components.values()),
        "state": [
            {
                "path": p,
                "kind": r.kind.strip("_"),
                "dtype": r.dtype,
                "shape": list(r.shape),
                "nbytes": r.nbytes,
            }
            for p, r in recs
        ],
        "metrics": {
            "summary": info.meta.get("metrics"),
            "accuracy_matrix": (state_metrics or {}).get("accuracy_matrix"),
            "initial_accuracy": (state_metrics or {}).get("initial_accuracy"),
        },
    }
    if args.json:
        emit_json(out)
    else:
        _print_show(out)
    return EXIT_OK


def _print_show(v: dict[str, Any]) -> None:
    marks = ["HEAD"] if v["head"] else []
    marks += [f"tag {t}" for t in v["tags"]]
    parent = version_name(v["parent"]) if v["parent"] is not None else "none (root)"
    print(f"{v['name']}{'  (' + ', '.join(marks) + ')' if marks else ''}   parent {parent}")
    print(f"created     {v['created_at']}")
    print(f"message     {v['message'] or '-'}")
    if v["strategy"] is not None or v["experience"] is not None:
        print(
            f"training    strategy {v['strategy'] or '-'}, experience {v['experience']} "
            f"({v['kind'] or '-'})"
        )
    spec = v["model_spec"]
    print(f"model       {json.dumps(spec) if spec else '(no model spec recorded)'}")
    ex = v["execution"]
    if ex:  # what bit-identical resumption depends on (docs/training.md)
        print(
            f"execution   torch {ex.get('torch')}, {ex.get('device')} ({ex.get('device_name')}), "
            f"{ex.get('threads')} threads, precision {ex.get('precision')}, deterministic "
            f"{ex.get('deterministic')}, cudnn deterministic {ex.get('cudnn_deterministic')} "
            f"benchmark {ex.get('cudnn_benchmark')}"
        )
    ckpt, packed = v["checkpoint"], v["compacted_model"]
    if ckpt:
        print(
            f"checkpoint  {ckpt['file']}  {human_bytes(ckpt['nbytes'])}  "
            f"sha256 {ckpt['sha256'][:16]}…"
        )
    elif packed:
        print(
            f"checkpoint  compacted: {packed['tensors']} tensors, {human_bytes(packed['nbytes'])}"
            f" delta-coded in blobs/ (was {packed['file']})"
        )
    else:
        print("checkpoint  none")
    print(
        f"size        {human_bytes(v['nbytes'])} logical, "
        f"{human_bytes(v['new_bytes'])} written by this commit"
    )
    shown = {"model_spec", "metrics", "accuracy", "hparams", "strategy", "experience", "kind",
             "execution"}  # fmt: skip
    rest = {k: val for k, val in v["meta"].items() if k not in shown}
    for title, tree in (("hparams", v["hparams"]), ("meta", rest)):
        leaves = flatten(tree) if tree else {}
        if leaves:
            print(f"\n{title}")
            for path, value in leaves.items():
                print(f"  {path.strip('/').replace('/', '.')} = {json.dumps(value)}")
    metrics = v["metrics"]
    if metrics["summary"]:
        s = metrics["summary"]
        print(
            f"\nmetrics     average accuracy {_num(s.get('average_accuracy'))}, "
            f"forgetting {_num(s.get('forgetting'))}, BWT {_num(s.get('bwt'))}, "
            f"FWT {_num(s.get('fwt'))}"
        )
    matrix = metrics["accuracy_matrix"]
    if matrix:
        print("accuracy matrix (row i: after training experience i; column j: test on j)")
        width = max(len(row) for row in matrix)
        rows = [[f"e{i}", *(_num(a) for a in row)] for i, row in enumerate(matrix)]
        print(table(rows, ["", *(f"e{j}" for j in range(width))], right=set(range(1, width + 1))))
    print(
        f"\nstate       {len(v['state'])} arrays, "
        f"{human_bytes(sum(r['nbytes'] for r in v['state']))}"
    )
    if v["components"]:
        rows = [[c["label"], c["tensors"], human_bytes(c["nbytes"])] for c in v["components"]]
        print(_indent(table(rows, ["component", "arrays", "bytes"], right={1, 2})))
        print()
        rows = [
            [
                r["path"],
                r["dtype"] + (" (sample ids)" if r["kind"] == "samples" else ""),
                "x".join(map(str, r["shape"])) or "scalar",
                human_bytes(r["nbytes"]),
            ]
            for r in v["state"]
        ]
        print(_indent(table(rows, ["path", "dtype", "shape", "bytes"], right={3})))


# ------------------------------------------------------------------ verify


def verify(args: argparse.Namespace) -> int:
    fatal = None  # --untrusted: why the store could not be read through (one line)
    if getattr(args, "untrusted", False):
        from engram.store.untrusted import verify_in_child

        try:
            report = verify_in_child(args.store, args.version, all=args.all)
        except StoreNotFoundError:
            raise UsageError(f"no store at {args.store}: the path does not exist") from None
        fatal = report.fatal
    else:
        with open_store(args.store) as store:
            report = store.verify(args.version, all=args.all)
    out = {
        "ok": report.ok,
        "versions": [version_name(v) for v in report.versions],
        "blobs": report.blobs,
        "bytes": report.bytes,
        "problems": [
            {
                "version": None if p.version is None else version_name(p.version),
                "where": p.where,
                "message": p.message,
            }
            for p in report.problems
        ],
        "notes": list(getattr(report, "notes", [])),
    }
    if args.json:
        if not report.ok:  # what every failing command prints with --json
            first = " ".join(str(report.problems[0]).split())
            out["error"] = fatal or f"{len(report.problems)} problem(s), the first: {first}"
            out["exit"] = EXIT_PROBLEMS
        emit_json(out)
    elif fatal is not None:
        print(" ".join(fatal.split()))
    else:
        what = "all versions" if args.all else ", ".join(out["versions"])
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        print(
            f"{what}: {status} — {report.blobs} chunks and the checkpoint files, "
            f"{human_bytes(report.bytes)} re-hashed"
        )
        for p in report.problems:
            print(f"  {p}")
        for note in out["notes"]:
            print(f"note: {note}")
        if not report.ok:
            print("roll back to a version that verifies (`engram rollback`), or restore the files")
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def upgrade(args: argparse.Namespace) -> int:
    with open_store(args.store, mode="w") as store:
        sealed = store.upgrade()
        head = store.head
    out = {"sealed_records": sealed, "format_version": FORMAT_VERSION}
    if args.json:
        emit_json(out)
    elif sealed:
        at = head.name if head else "none"
        print(f"{args.store}: {sealed} LMDB records sealed with checksums; format "
              f"{FORMAT_VERSION} (HEAD {at}, every version kept)")  # fmt: skip
    else:
        print(f"{args.store}: already format {FORMAT_VERSION} (every record sealed)")
    return EXIT_OK


# ------------------------------------------------------------------ refs


def rollback(args: argparse.Namespace) -> int:
    with open_store(args.store, mode="w") as store:
        before = store.head
        info = store.rollback(args.version)
    out = {"head": info.id, "previous": before.id if before else None}
    if args.json:
        emit_json(out)
    else:
        prev = version_name(out["previous"]) if out["previous"] is not None else "none"
        print(f"HEAD -> {info.name} (was {prev}); later versions stay until `engram gc`")
    return EXIT_OK


def tag(args: argparse.Namespace) -> int:
    with open_store(args.store, mode="w") as store:
        if args.delete:
            if args.version is not None:
                raise UsageError("tag --delete takes no VERSION")
            was = store.tags().get(args.name)
            store.untag(args.name)
            out = {"tag": args.name, "version": None, "previous": was}
        else:
            was = store.tags().get(args.name)
            try:
                info = store.tag(args.name, args.version if args.version is not None else "HEAD")
            except ValueError as e:
                raise UsageError(str(e)) from None
            out = {"tag": args.name, "version": info.id, "previous": was}
    if args.json:
        emit_json(out)
    elif out["version"] is None:
        print(f"deleted tag {args.name} (was {version_name(was)})")
    else:
        moved = f" (moved from {version_name(was)})" if was not in (None, out["version"]) else ""
        print(f"tag {args.name} -> {version_name(out['version'])}{moved}")
    return EXIT_OK


# ------------------------------------------------------------------ gc


def gc(args: argparse.Namespace) -> int:
    if args.keep_last is not None and args.keep_last < 0:
        raise UsageError("--keep-last must be 0 or more")
    with open_store(args.store, mode="w") as store:
        before = disk_usage(store.path)
        report = store.gc(keep_last=args.keep_last)
        after = disk_usage(store.path)
        head = store.head
        tags = store.tags()
        kept = [v.id for v in store.versions()]
    # LMDB reuses the pages gc frees but never shrinks its file: count the files only.
    files_before = before["blobs"] + before["checkpoints"]
    freed = files_before - (after["blobs"] + after["checkpoints"])
    store_before = sum(v for k, v in before.items() if k != "run_files")
    store_after = sum(v for k, v in after.items() if k != "run_files")
    out = {
        "dropped": [version_name(v) for v in report.versions],
        "kept": [version_name(v) for v in kept],
        "head": version_name(head.id) if head else None,
        "tags": {name: version_name(v) for name, v in sorted(tags.items())},
        "blobs": report.blobs,
        "blob_bytes": report.blob_bytes,
        "samples": report.samples,
        "files": list(report.files),
        "freed_bytes": max(freed, 0),
        "disk_before": store_before,
        "disk_after": store_after,
    }
    if args.json:
        emit_json(out)
        return EXIT_OK
    dropped = ", ".join(out["dropped"]) or "none"
    print(f"dropped versions: {dropped}")
    print(
        f"unreferenced: {report.blobs} chunks ({human_bytes(report.blob_bytes)}), "
        f"{report.samples} replay samples, {len(report.files)} files"
    )
    for f in report.files:
        print(f"  removed {f}")
    print(
        f"freed {human_bytes(out['freed_bytes'])} of pack and checkpoint files (store on disk "
        f"{human_bytes(store_before)} -> {human_bytes(store_after)}; LMDB reuses freed pages "
        "without shrinking its file)"
    )
    print(
        f"kept {len(kept)} versions "
        f"(HEAD {out['head']}" + "".join(f", {n} {v}" for n, v in out["tags"].items()) + ")"
    )
    return EXIT_OK


def compact(args: argparse.Namespace) -> int:
    with open_store(args.store, mode="w") as store:
        before = disk_usage(store.path)
        report = store.compact(tagged=args.tagged)
        after = disk_usage(store.path)
    on_disk = {k: sum(v for n, v in d.items() if n != "run_files") for k, d in
               (("before", before), ("after", after))}  # fmt: skip
    out = {
        "versions": [version_name(v) for v in report.versions],
        "blobs": report.blobs,
        "raw_bytes": report.raw_bytes,
        "stored_bytes": report.stored_bytes,
        "files": list(report.files),
        "disk_before": on_disk["before"],
        "disk_after": on_disk["after"],
    }
    if args.json:
        emit_json(out)
        return EXIT_OK
    print(f"compacted versions: {', '.join(out['versions']) or 'none (nothing new to compact)'}")
    print(
        f"{report.blobs} chunks: {human_bytes(report.raw_bytes)} stored as "
        f"{human_bytes(report.stored_bytes)}; {len(report.files)} files removed; store on disk "
        f"{human_bytes(on_disk['before'])} -> {human_bytes(on_disk['after'])}"
    )
    return EXIT_OK


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


def du(args: argparse.Namespace) -> int:
    with open_store(args.store) as store:
        report = store.inspect.usage(_component)
        disk = disk_usage(store.path)
        damaged = _damaged(store, args.store) if report.damaged else []
    usage = {
        name: _Usage(name, *_describe_usage(name, u), u.logical, u.unique)
        for name, u in report.components.items()
    }
    on_disk = disk["blobs"] + disk["checkpoints"] + disk["lmdb"] + disk["other"]
    logical = sum(u.logical for u in usage.values())
    unique = sum(u.unique for u in usage.values())
    out = {
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
    if args.json:
        emit_json(out)
        return EXIT_OK
    print(f"{args.store}: {report.versions} versions")
    _print_damaged(damaged)
    print()
    rows = [
        [u["label"], human_bytes(u["logical"]), human_bytes(u["unique"])] for u in out["components"]
    ]
    rows.append(["total", human_bytes(logical), human_bytes(unique)])
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
    if out["dedup_ratio"] is not None:
        print(
            f"\ndeduplication: {human_bytes(logical)} logical in {human_bytes(on_disk)} "
            f"on disk = {out['dedup_ratio']:.1f}x"
        )
    if disk["run_files"]:
        print(
            f"(run files beside the store, hydra/ and tb/: {human_bytes(disk['run_files'])}, "
            "not counted)"
        )
    return EXIT_OK


# ------------------------------------------------------------------ diff


def _as_float(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return (x.to(torch.complex128) if x.is_complex() else x.to(torch.float64)).numpy()
    return np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _tensor_change(path: str, a: Any, b: Any) -> dict[str, Any] | None:
    """None if equal, else shapes and the L2 norm of the difference (absolute, relative)."""
    if tuple(a.shape) != tuple(b.shape):
        return {
            "path": path,
            "shape_a": list(a.shape),
            "shape_b": list(b.shape),
            "l2": None,
            "relative": None,
        }
    fa, fb = _as_float(a), _as_float(b)
    if str(a.dtype) == str(b.dtype) and np.array_equal(fa, fb, equal_nan=True):
        return None
    l2 = float(np.linalg.norm((fb - fa).ravel()))
    norm_a = float(np.linalg.norm(fa.ravel()))
    return {
        "path": path,
        "shape_a": list(a.shape),
        "shape_b": list(b.shape),
        "l2": l2,
        "relative": l2 / norm_a if norm_a > 0 else None,
    }


def _is_array(x: Any) -> bool:
    return isinstance(x, torch.Tensor | np.ndarray)


def diff(args: argparse.Namespace) -> int:
    with open_store(args.store) as store:
        info_a, info_b = store.info(args.a), store.info(args.b)
        recs_a = dict(tree_arrays(store.manifest(info_a.id)["state"]))
        recs_b = dict(tree_arrays(store.manifest(info_b.id)["state"]))
        snap_a, snap_b = store.load(info_a.id), store.load(info_b.id)
    flat_a, flat_b = flatten(snap_a.state), flatten(snap_b.state)
    for prefix, weights_a, weights_b in (("model/", snap_a.model, snap_b.model),):
        flat_a.update({prefix + k: t for k, t in (weights_a or {}).items()})
        flat_b.update({prefix + k: t for k, t in (weights_b or {}).items()})
    samples = {p for p, r in (recs_a | recs_b).items() if r.kind == TAG_SAMPLES}

    changed, unchanged, values, replay = [], 0, [], []
    arrays_a = {p for p, x in flat_a.items() if _is_array(x) and p not in samples}
    arrays_b = {p for p, x in flat_b.items() if _is_array(x) and p not in samples}
    for path in sorted(arrays_a & arrays_b):
        ra, rb = recs_a.get(path), recs_b.get(path)
        if ra is not None and rb is not None and ra.chunks == rb.chunks and ra.dtype == rb.dtype:
            unchanged += 1  # same content hashes: no need to compare the bytes
            continue
        change = _tensor_change(path, flat_a[path], flat_b[path])
        if change is None:
            unchanged += 1
        else:
            change["dtype_a"], change["dtype_b"] = _dtype(flat_a[path]), _dtype(flat_b[path])
            changed.append(change)

    def described(paths: set[str], flat: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"path": p, "shape": list(flat[p].shape), "dtype": _dtype(flat[p])}
            for p in sorted(paths)
        ]

    for path in sorted(samples):
        ids_a = set(flat_a[path].tolist()) if path in flat_a else set()
        ids_b = set(flat_b[path].tolist()) if path in flat_b else set()
        replay.append(
            {
                "path": path,
                "entered": sorted(ids_b - ids_a),
                "left": sorted(ids_a - ids_b),
                "kept": len(ids_a & ids_b),
            }
        )
    scalars_a = {p for p, x in flat_a.items() if not _is_array(x)}
    scalars_b = {p for p, x in flat_b.items() if not _is_array(x)}
    for path in sorted(scalars_a | scalars_b):
        a, b = flat_a.get(path), flat_b.get(path)
        if path not in scalars_a or path not in scalars_b or a != b:
            values.append({"path": path, "a": a, "b": b})
    out = {
        "a": info_a.name,
        "b": info_b.name,
        "tensors": {
            "changed": changed,
            "added": described(arrays_b - arrays_a, flat_b),
            "removed": described(arrays_a - arrays_b, flat_a),
            "unchanged": unchanged,
        },
        "replay": replay,
        "values": values,
    }
    if args.json:
        emit_json(out)
    else:
        _print_diff(out)
    return EXIT_OK


def _dtype(x: Any) -> str:
    return str(x.dtype).removeprefix("torch.")


def _print_diff(d: dict[str, Any], max_values: int = 20) -> None:
    t = d["tensors"]
    print(
        f"{d['a']} -> {d['b']}: {len(t['changed'])} tensors changed, {len(t['added'])} added, "
        f"{len(t['removed'])} removed, {t['unchanged']} unchanged"
    )
    if t["changed"]:
        rows = []
        for c in t["changed"]:
            shape = "x".join(map(str, c["shape_a"])) or "scalar"
            if c["shape_a"] != c["shape_b"]:
                shape += " -> " + ("x".join(map(str, c["shape_b"])) or "scalar")
            l2 = "-" if c["l2"] is None else f"{c['l2']:.4g}"
            rel = "-" if c["relative"] is None else f"{c['relative']:.4g}"
            rows.append([c["path"], shape, l2, rel])
        print(_indent(table(rows, ["changed", "shape", "|B-A|", "|B-A|/|A|"], right={2, 3})))
    for what in ("added", "removed"):
        for item in t[what]:
            shape = "x".join(map(str, item["shape"])) or "scalar"
            print(f"  {what} {item['path']} {item['dtype']} {shape}")
    for r in d["replay"]:
        print(
            f"replay {r['path']}: {len(r['entered'])} samples entered, {len(r['left'])} left, "
            f"{r['kept']} kept"
        )
    if d["values"]:
        print(f"values: {len(d['values'])} changed")
        # Items of one list (an RNG state's 625 words) are summed up in one line.
        lines, items = [], {}
        for v in d["values"]:
            parent, _, last = v["path"].rpartition("/")
            if last.isdigit():
                items[parent] = items.get(parent, 0) + 1
                if items[parent] == 1:
                    lines.append(parent)
            else:
                lines.append(f"  {v['path']}: {json.dumps(v['a'])} -> {json.dumps(v['b'])}")
        for line in lines[:max_values]:
            print(line if line.startswith("  ") else f"  {line}: {items[line]} item(s) changed")
        if len(lines) > max_values:
            print(f"  … {len(lines) - max_values} more (--json lists all)")
