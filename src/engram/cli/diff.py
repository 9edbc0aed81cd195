"""``engram diff``: what changed between two versions of a store.

Unlike ``ls`` and ``show`` (:mod:`~engram.cli.history`), ``diff`` loads the two versions
through :meth:`Store.load`: tensors are compared by their L2 difference (unless their
content hashes match), replay samples by the ids that entered and left, and the plain
values one by one.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from engram.cli.common import flatten, report
from engram.cli.output import indent, table
from engram.store import Store
from engram.store.codec import TAG_SAMPLES, ArrayRecord
from engram.store.inspect import tree_arrays


def diff(args: argparse.Namespace) -> int:
    return report(args, lambda store: diff_versions(store, args.a, args.b), print_diff)


def diff_versions(store: Store, a: str, b: str) -> dict[str, Any]:
    """What changed from version ``a`` to ``b``: tensors (L2 of the difference), replay
    samples entered and left, and the plain values."""
    info_a, info_b = store.info(a), store.info(b)
    recs_a = dict(tree_arrays(store.manifest(info_a.id)["state"]))
    recs_b = dict(tree_arrays(store.manifest(info_b.id)["state"]))
    snap_a, snap_b = store.load(info_a.id), store.load(info_b.id)
    flat_a, flat_b = _flat_version(store, snap_a), _flat_version(store, snap_b)
    samples = {p for p, r in (recs_a | recs_b).items() if r.kind == TAG_SAMPLES}
    arrays_a = {p for p, x in flat_a.items() if _is_array(x) and p not in samples}
    arrays_b = {p for p, x in flat_b.items() if _is_array(x) and p not in samples}
    changed, unchanged = _tensor_changes(arrays_a & arrays_b, (recs_a, recs_b), (flat_a, flat_b))
    return {
        "a": info_a.name,
        "b": info_b.name,
        "tensors": {
            "changed": changed,
            "added": _described(arrays_b - arrays_a, flat_b),
            "removed": _described(arrays_a - arrays_b, flat_a),
            "unchanged": unchanged,
        },
        "replay": _replay_changes(samples, flat_a, flat_b),
        "values": _value_changes(flat_a, flat_b),
    }


def _flat_version(store: Store, snap: Any) -> dict[str, Any]:
    """A loaded version as one flat ``path -> value`` dict: its state, its model's tensors
    under ``model/``, and a scikit-learn version's fitted arrays."""
    flat = flatten(snap.state)
    flat.update({"model/" + k: t for k, t in (snap.model or {}).items()})
    flat.update(_estimator_arrays(store, snap))  # a scikit-learn version's fitted arrays
    return flat


def _tensor_changes(
    paths: set[str],
    recs: tuple[dict[str, ArrayRecord], dict[str, ArrayRecord]],
    flats: tuple[dict[str, Any], dict[str, Any]],
) -> tuple[list[dict[str, Any]], int]:
    """The arrays at ``paths`` (in both versions) that changed, and how many did not."""
    (recs_a, recs_b), (flat_a, flat_b) = recs, flats
    changed, unchanged = [], 0
    for path in sorted(paths):
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
    return changed, unchanged


def _described(paths: set[str], flat: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"path": p, "shape": list(flat[p].shape), "dtype": _dtype(flat[p])} for p in sorted(paths)
    ]


def _replay_changes(
    samples: set[str], flat_a: dict[str, Any], flat_b: dict[str, Any]
) -> list[dict[str, Any]]:
    """Per replay buffer (sample ids), the ids that entered, left, and how many stayed."""
    replay = []
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
    return replay


def _value_changes(flat_a: dict[str, Any], flat_b: dict[str, Any]) -> list[dict[str, Any]]:
    """The plain (non-array) values that differ, were added or were removed."""
    values = []
    scalars_a = {p for p, x in flat_a.items() if not _is_array(x)}
    scalars_b = {p for p, x in flat_b.items() if not _is_array(x)}
    for path in sorted(scalars_a | scalars_b):
        value_a, value_b = flat_a.get(path), flat_b.get(path)
        if path not in scalars_a or path not in scalars_b or value_a != value_b:
            values.append({"path": path, "a": value_a, "b": value_b})
    return values


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
