"""``engram ls``, ``show`` and ``diff``: reading the versions of a store.

``ls`` and ``show`` summarise state trees from the manifests (no tensor is read, except
the metrics of a state that stores them as tensors); ``diff`` loads the two versions
through :meth:`Store.load`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from engram.cli.common import (
    damaged_versions,
    describe_group,
    flatten,
    group_of,
    print_damaged,
    report,
)
from engram.cli.output import human_bytes, indent, num, table
from engram.store import Store, VersionInfo, version_name
from engram.store.codec import TAG_SAMPLES, ArrayRecord, decode_tree
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


def ls(args: argparse.Namespace) -> int:
    return report(args, lambda store: list_versions(store, args.store), print_ls)


def list_versions(store: Store, path: str) -> dict[str, Any]:
    """The versions, HEAD, and the damaged versions left out; ``path`` as typed."""
    versions = store.versions()
    damaged = damaged_versions(store, path)
    head_id = store.inspect.head_id()  # HEAD's manifest may be a damaged one
    return {
        "store": path,
        "store_id": store.store_id,
        "head": head_id,
        "versions": [version_row(v, head_id) for v in versions],
        "damaged": damaged,
    }


def print_ls(result: dict[str, Any]) -> None:
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
    return report(args, lambda store: summarise(store, args.version), print_show)


def summarise(store: Store, version: str) -> dict[str, Any]:
    """One version: its row, meta, checkpoint, components, state arrays and metrics."""
    info = store.info(version)
    manifest = store.manifest(info.id)
    head = store.head
    recs = tree_arrays(manifest["state"])
    metrics_tree = manifest["state"].get("metrics") if isinstance(manifest["state"], dict) else None
    state_metrics: Any = None
    if metrics_tree is not None:
        if tree_arrays(metrics_tree):  # tensors in it: read the state (small ones only expected)
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
            "accuracy_matrix": (state_metrics or {}).get("accuracy_matrix"),
            "initial_accuracy": (state_metrics or {}).get("initial_accuracy"),
        },
    }


def _artifact(art: dict[str, Any] | None) -> dict[str, Any] | None:
    if art is None:
        return None
    return {k: art[k] for k in ("file", "format", "nbytes", "sha256")}


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


def print_show(v: dict[str, Any]) -> None:
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
    sig = v["signature"]
    if sig:
        c = sig["classes"]
        span = f"{c[0]}..{c[-1]}" if c == list(range(c[0], c[-1] + 1)) else ", ".join(map(str, c))
        shape = ", ".join(map(str, sig["input"]["shape"]))
        tasks = ", task labels" if sig.get("task_labels") else ""
        print(f"signature   input {sig['input']['dtype']} (N, {shape}), classes {span}{tasks}")
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
    shown = {"model_spec", "metrics", "accuracy", "hparams", "strategy", "experience", "kind",
             "execution", "signature"}  # fmt: skip
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


# ------------------------------------------------------------------ diff


def diff(args: argparse.Namespace) -> int:
    return report(args, lambda store: diff_versions(store, args.a, args.b), print_diff)


def diff_versions(store: Store, a: str, b: str) -> dict[str, Any]:
    """What changed from version ``a`` to ``b``: tensors (L2 of the difference), replay
    samples entered and left, and the plain values."""
    info_a, info_b = store.info(a), store.info(b)
    recs_a = dict(tree_arrays(store.manifest(info_a.id)["state"]))
    recs_b = dict(tree_arrays(store.manifest(info_b.id)["state"]))
    snap_a, snap_b = store.load(info_a.id), store.load(info_b.id)
    flat_a, flat_b = flatten(snap_a.state), flatten(snap_b.state)
    flat_a.update({"model/" + k: t for k, t in (snap_a.model or {}).items()})
    flat_b.update({"model/" + k: t for k, t in (snap_b.model or {}).items()})
    flat_a.update(_estimator_arrays(store, snap_a))  # a scikit-learn version's fitted arrays
    flat_b.update(_estimator_arrays(store, snap_b))
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
        value_a, value_b = flat_a.get(path), flat_b.get(path)
        if path not in scalars_a or path not in scalars_b or value_a != value_b:
            values.append({"path": path, "a": value_a, "b": value_b})
    return {
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


def _estimator_arrays(store: Store, snap: Any) -> dict[str, Any]:
    """``model/<step>/<attribute>`` → array for the fitted attributes (``coef_``, an
    MLP's ``coefs_``...) of a scikit-learn version's estimator, read through engram's
    allowlist; nothing for a torch version."""
    if snap.artifact is None:
        return {}
    from engram.inference import load_model

    estimator = load_model(store, snap.version.id, allow_version_mismatch=True)  # read only
    out: dict[str, Any] = {}
    steps = getattr(estimator, "steps", None) or [("", estimator)]
    for step, est in steps:
        prefix = f"model/{step}/" if step else "model/"
        for name, value in sorted(vars(est).items()):
            if not name.endswith("_") or name.startswith("_"):
                continue
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                if isinstance(v, np.ndarray) and v.dtype.kind in "fiub":
                    out[f"{prefix}{name}{f'/{i}' if isinstance(value, list) else ''}"] = v
    return out


def _is_array(x: Any) -> bool:
    return isinstance(x, torch.Tensor | np.ndarray)


def _dtype(x: Any) -> str:
    return str(x.dtype).removeprefix("torch.")


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


def print_diff(d: dict[str, Any], max_values: int = 20) -> None:
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
        print(indent(table(rows, ["changed", "shape", "|B-A|", "|B-A|/|A|"], right={2, 3})))
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
