"""``engram ls`` and ``show``: reading the versions of a store.

``ls`` and ``show`` summarise state trees from the manifests (no tensor is read, except
the metrics of a state that stores them as tensors); ``show --card`` prints the version's
model card (:mod:`engram.card`); ``diff``, which loads the two versions through
:meth:`Store.load`, is :mod:`~engram.cli.diff`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from engram.card import collect, front_matter, render, state_metrics
from engram.cli.common import (
    damaged_versions,
    describe_group,
    flatten,
    group_of,
    print_damaged,
    report,
)
from engram.cli.output import human_bytes, indent, num, table
from engram.store import Store, VersionInfo, references, version_name
from engram.store.codec import ArrayRecord
from engram.store.inspect import tree_arrays


def version_row(v: VersionInfo, head: int | None) -> dict[str, Any]:
    """One version as ``ls`` lists it (and ``show`` starts its summary)."""
    metrics = v.meta.get("metrics") if isinstance(v.meta.get("metrics"), dict) else {}
    return {
        "id": v.id,
        "name": v.name,
        "parent": v.parent,
        "head": v.id == head,
        "tags": list(v.tags),
        "experience": v.meta.get("experience"),
        "kind": v.meta.get("kind"),
        # data-parallel ranks that trained it (torchrun); 1 for older versions
        "world_size": (v.meta.get("execution") or {}).get("world_size", 1),
        "average_accuracy": metrics.get("average_accuracy"),
        "forgetting": metrics.get("forgetting"),
        "nbytes": v.nbytes,
        "new_bytes": v.new_bytes,
        "created_at": v.created_at,
        "message": v.message,
        "checkpoint": v.checkpoint,
        # Store.compact() moved the weights into delta-coded blobs (format 2)
        "compacted": v.compacted,
    }


# ------------------------------------------------------------------ ls


#: ``engram ls`` lists the newest this many versions (``--all``: every one), so its cost
#: does not grow with the history (docs/benchmarks.md, "Scaling").
LS_NEWEST = 50


def ls(args: argparse.Namespace) -> int:
    last = None if args.all else LS_NEWEST
    return report(args, lambda store: list_versions(store, args.store, last=last), print_ls)


def list_versions(store: Store, path: str, *, last: int | None = None) -> dict[str, Any]:
    """The versions, HEAD, and the damaged versions left out; ``path`` as typed.
    ``last``: only the newest ``last`` versions (``count`` says how many there are)."""
    versions = store.versions(last=last)
    damaged = damaged_versions(store, path, last=last)
    head_id = store.inspect.head_id()  # HEAD's manifest may be a damaged one
    result = {
        "store": path,
        "store_id": store.store_id,
        "head": head_id,
        "versions": [version_row(v, head_id) for v in versions],
        "damaged": damaged,
        "count": len(store.version_ids()),
    }
    remote = _remote_status(store, path)
    if remote is not None:
        result["remote"] = remote
    return result


def _remote_status(store: Store, path: str) -> dict[str, Any] | None:
    """Where the store's remote stands (one quick read of it), if it has one; never for
    a remote's own copy (``engram ls s3://...``)."""
    if "://" in path or not (store.path / "remote.json").is_file():
        return None  # (and no object-store library is imported)
    from engram.store.remote.status import remote_status

    return remote_status(store)


def print_ls(result: dict[str, Any]) -> None:
    _print_versions(result)
    shown = len(result["versions"]) + len(result["damaged"])
    if shown < result["count"]:
        print(f"(the newest {shown} of {result['count']} versions; --all lists every one)")
    if result.get("remote") is not None:
        from engram.store.remote.status import describe

        print(describe(result["remote"], result["store"]))


def _print_versions(result: dict[str, Any]) -> None:
    rows, damaged = result["versions"], result["damaged"]
    if not rows and not damaged:
        print(f"{result['store']}: no versions yet")
        return
    if not rows:
        print_damaged(damaged)
        return
    cells = [
        [
            "*" if r["head"] else "",
            r["name"],
            version_name(r["parent"]) if r["parent"] is not None else "-",
            "-" if r["experience"] is None else r["experience"],
            r["kind"] or "-",
            ",".join(r["tags"]),
            num(r["average_accuracy"]),
            num(r["forgetting"]),
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
    right = {3, 6, 7, 8, 9}
    if any(r["world_size"] != 1 for r in rows):  # a data-parallel history: say how wide
        for r, row in zip(rows, cells, strict=True):
            row.insert(5, r["world_size"])
        header.insert(5, "ranks")
        right = {3, 5, 7, 8, 9, 10}
    print(table(cells, header, right=right))
    print_damaged(damaged)


# ------------------------------------------------------------------ show


def show(args: argparse.Namespace) -> int:
    if getattr(args, "card", False):
        return report(args, lambda store: card(store, args.version), print_card)
    return report(args, lambda store: summarise(store, args.version), print_show)


def card(store: Store, version: str) -> dict[str, Any]:
    """The version's model card; ``--json`` adds its front matter, parsed."""
    front = front_matter(collect(store, version))
    return {"version": front["engram"]["version"], "front_matter": front, "card": render(front)}


def print_card(result: dict[str, Any]) -> None:
    print(result["card"], end="")


def summarise(store: Store, version: str) -> dict[str, Any]:
    """One version: its row, meta, checkpoint, components, state arrays and metrics."""
    info = store.info(version)
    manifest = store.manifest(info.id)
    head = store.head
    recs = tree_arrays(manifest["state"])
    metrics = state_metrics(store, info.id, manifest)
    replay = {group_of(p) for p, _, _ in references.referencing(recs)}
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
    return {
        **version_row(info, head.id if head else None),
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
        "artifact": _artifact(manifest.get("artifact")),
        "signature": info.meta.get("signature"),
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
            "accuracy_matrix": (metrics or {}).get("accuracy_matrix"),
            "initial_accuracy": (metrics or {}).get("initial_accuracy"),
        },
    }


def _artifact(art: dict[str, Any] | None) -> dict[str, Any] | None:
    if art is None:
        return None
    return {k: art[k] for k in ("file", "format", "nbytes", "sha256")}


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


def print_show(v: dict[str, Any]) -> None:
    _print_identity(v)
    _print_execution(v["execution"])
    _print_signature(v["signature"])
    _print_files(v)
    _print_meta(v)
    _print_metrics(v["metrics"])
    _print_state(v)


def _print_identity(v: dict[str, Any]) -> None:
    """The version, its marks and parent, when, why, how it was trained, its model spec."""
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


def _print_execution(ex: dict[str, Any] | None) -> None:
    """The libraries (and, for torch, the device and determinism) it was trained with."""
    if ex and ex.get("library") == "scikit-learn":
        print(f"execution   scikit-learn {ex.get('scikit-learn')}, numpy {ex.get('numpy')}, "
              f"scipy {ex.get('scipy')}, skops {ex.get('skops')}")  # fmt: skip
    elif ex:  # what bit-identical resumption depends on (docs/training.md)
        print(
            f"execution   torch {ex.get('torch')}, {ex.get('device')} ({ex.get('device_name')}), "
            f"{ex.get('world_size', 1)} rank(s) x {ex.get('threads')} threads, precision "
            f"{ex.get('precision')}, deterministic "
            f"{ex.get('deterministic')}, cudnn deterministic {ex.get('cudnn_deterministic')} "
            f"benchmark {ex.get('cudnn_benchmark')}"
        )


def _print_signature(sig: dict[str, Any] | None) -> None:
    """The model's input and classes, if recorded."""
    if sig:
        c = sig["classes"]
        span = f"{c[0]}..{c[-1]}" if c == list(range(c[0], c[-1] + 1)) else ", ".join(map(str, c))
        shape = ", ".join(map(str, sig["input"]["shape"]))
        tasks = ", task labels" if sig.get("task_labels") else ""
        print(f"signature   input {sig['input']['dtype']} (N, {shape}), classes {span}{tasks}")


def _print_files(v: dict[str, Any]) -> None:
    """Where the model is (a model file, a checkpoint, compacted blobs) and the sizes."""
    ckpt, packed, art = v["checkpoint"], v["compacted_model"], v["artifact"]
    if art:
        print(
            f"model file  {art['file']}  {human_bytes(art['nbytes'])}  "
            f"sha256 {art['sha256'][:16]}…  ({art['format']}; load: engram.load_model)"
        )
    elif ckpt:
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


def _print_meta(v: dict[str, Any]) -> None:
    """The hyperparameters, then the meta not shown above, one leaf a line."""
    shown = {"model_spec", "metrics", "accuracy", "hparams", "strategy", "experience", "kind",
             "execution", "signature"}  # fmt: skip
    rest = {k: val for k, val in v["meta"].items() if k not in shown}
    for title, tree in (("hparams", v["hparams"]), ("meta", rest)):
        leaves = flatten(tree) if tree else {}
        if leaves:
            print(f"\n{title}")
            for path, value in leaves.items():
                print(f"  {path.strip('/').replace('/', '.')} = {json.dumps(value)}")


def _print_metrics(metrics: dict[str, Any]) -> None:
    """The summary metrics and the accuracy matrix, if recorded."""
    if metrics["summary"]:
        s = metrics["summary"]
        print(
            f"\nmetrics     average accuracy {num(s.get('average_accuracy'))}, "
            f"forgetting {num(s.get('forgetting'))}, BWT {num(s.get('bwt'))}, "
            f"FWT {num(s.get('fwt'))}"
        )
    matrix = metrics["accuracy_matrix"]
    if matrix:
        print("accuracy matrix (row i: after training experience i; column j: test on j)")
        width = max(len(row) for row in matrix)
        rows = [[f"e{i}", *(num(a) for a in row)] for i, row in enumerate(matrix)]
        print(table(rows, ["", *(f"e{j}" for j in range(width))], right=set(range(1, width + 1))))


def _print_state(v: dict[str, Any]) -> None:
    """The state's size, then its components and its arrays, one a row."""
    print(
        f"\nstate       {len(v['state'])} arrays, "
        f"{human_bytes(sum(r['nbytes'] for r in v['state']))}"
    )
    if v["components"]:
        rows = [[c["label"], c["tensors"], human_bytes(c["nbytes"])] for c in v["components"]]
        print(indent(table(rows, ["component", "arrays", "bytes"], right={1, 2})))
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
        print(indent(table(rows, ["path", "dtype", "shape", "bytes"], right={3})))
