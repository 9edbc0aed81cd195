"""``engram diff``: what changed between two versions of a store.

Unlike ``ls`` and ``show`` (:mod:`~engram.cli.history`), ``diff`` reads the two versions'
arrays: tensors are compared by their L2 difference (unless their content hashes match),
replay samples by the ids that entered and left, and the plain values one by one.

It imports no torch (``tests/test_cli_imports.py``): the versions are read as their
stored bytes (:meth:`~engram.store.inspect.Inspector.raw_snapshot`) and compared through
numpy (:func:`~engram.store.codec.numpy_values` widens bfloat16 and float8 exactly), so
it prints what comparing the loaded tensors would; a scikit-learn version's fitted
arrays are read from its skops file's schema and ``.npy`` entries, without skops (whose
import walks every scikit-learn module, torch's array API adapter included).
"""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from typing import Any

import numpy as np

from engram.cli.common import flatten, report
from engram.cli.output import indent, table
from engram.errors import CorruptionError
from engram.store import Store, references
from engram.store.checkpoint import RawTensor
from engram.store.codec import TAG_NDARRAY, ArrayRecord, numpy_values
from engram.store.inspect import tree_arrays
from engram.store.values import Snapshot


def diff(args: argparse.Namespace) -> int:
    return report(args, lambda store: diff_versions(store, args.a, args.b), print_diff)


def diff_versions(store: Store, a: str, b: str) -> dict[str, Any]:
    """What changed from version ``a`` to ``b``: tensors (L2 of the difference), replay
    samples entered and left, and the plain values."""
    info_a, info_b = store.info(a), store.info(b)
    recs_a = dict(tree_arrays(store.manifest(info_a.id)["state"]))
    recs_b = dict(tree_arrays(store.manifest(info_b.id)["state"]))
    flat_a = _flat_version(store, _raw_snapshot(store, info_a.id), recs_a)
    flat_b = _flat_version(store, _raw_snapshot(store, info_b.id), recs_b)
    samples = {p for p, _, _ in references.referencing((recs_a | recs_b).items())}
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


def _raw_snapshot(store: Store, vid: int) -> Snapshot:
    """Version ``vid`` with its arrays as stored bytes; a remote's copy fetches the
    files it needs first (as its :meth:`~Store.load` does)."""
    if type(store) is not Store:
        from engram.store.remote.cache import RemoteStore

        if isinstance(store, RemoteStore):
            store.fetch(store.needed_files(vid))
    return store.inspect.raw_snapshot(vid)


def _flat_version(store: Store, snap: Snapshot, recs: dict[str, ArrayRecord]) -> dict[str, Any]:
    """A version as one flat ``path -> value`` dict: its state, its model's tensors under
    ``model/``, and a scikit-learn version's fitted arrays. A tensor stays a
    :class:`RawTensor` (numpy has no bfloat16); a numpy array of the state, or of an
    estimator, is a numpy array: the two never compare equal, as a tensor and an array
    never did."""
    flat = flatten(snap.state)
    for path, record in recs.items():
        if record.kind == TAG_NDARRAY:
            flat[path] = _values(flat[path])
    flat.update({"model/" + k: t for k, t in (snap.model or {}).items()})
    if snap.artifact is not None:
        flat.update(_estimator_arrays(snap.artifact, f"{store.path} {snap.version.name}"))
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
        ids_a = set(_values(flat_a[path]).tolist()) if path in flat_a else set()
        ids_b = set(_values(flat_b[path]).tolist()) if path in flat_b else set()
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


def _estimator_arrays(artifact: bytes, where: str) -> dict[str, np.ndarray]:
    """``model/<step>/<attribute>`` → array for the fitted attributes (``coef_``, an
    MLP's ``coefs_``...) of a scikit-learn version's estimator: what ``vars()`` of the
    estimator skops rebuilds holds, read from the file's schema and its ``.npy`` entries
    (numpy arrays only, never pickle), with engram's allowlist checked first as a load
    checks it."""
    from engram.sklearn import persist

    persist.check_types(artifact, what=where)  # also: a readable zip, a bounded schema
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(artifact)) as z:
            root = json.loads(z.read("schema.json"))
            for prefix, attributes in _estimator_nodes(root):
                for name, node in sorted(attributes.items()):
                    if not name.endswith("_") or name.startswith("_"):
                        continue
                    is_list = _node_is(node, "builtins", "list")
                    for i, item in enumerate(node["content"] if is_list else [node]):
                        v = _npy(z, item)
                        if v is not None and v.dtype.kind in "fiub":
                            out[f"{prefix}{name}{f'/{i}' if is_list else ''}"] = v
    except (zipfile.BadZipFile, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        raise CorruptionError(f"{where}: its skops file cannot be read ({e!r})") from None
    return out


def _estimator_nodes(root: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(path prefix, attribute nodes)`` of each step of a pipeline's schema (a node
    with a ``steps`` list), else of the one estimator."""
    attributes = _attributes(root) or {}
    steps = attributes.get("steps")
    sequence = _node_is(steps, "builtins", "list") or _node_is(steps, "builtins", "tuple")
    if not sequence or not steps["content"]:  # as `getattr(est, "steps", None) or ...`
        return [("model/", attributes)]
    nodes = []
    for step in steps["content"]:  # tuples (name, estimator)
        name_node, estimator = step["content"]
        name = json.loads(name_node["content"])
        step_attributes = _attributes(estimator)
        if step_attributes is not None:  # not "passthrough" or None
            nodes.append((f"model/{name}/" if name else "model/", step_attributes))
    return nodes


def _attributes(node: dict[str, Any]) -> dict[str, Any] | None:
    """An object node's attribute nodes by name (its ``__dict__``); None: no object."""
    if node.get("__loader__") != "ObjectNode":
        return None
    state = node["content"]
    if not _node_is(state, "builtins", "dict"):
        return None  # rebuilt through __reduce__, not an estimator
    if not isinstance(state["content"], dict):
        raise ValueError(f"the attributes of a {node.get('__class__')} are no mapping")
    return state["content"]


def _node_is(node: Any, module: str, cls: str) -> bool:
    """Whether a skops schema node stands for a ``module.cls`` object."""
    if not isinstance(node, dict):
        return False
    return node.get("__module__") == module and node.get("__class__") == cls


def _npy(z: zipfile.ZipFile, node: Any) -> np.ndarray | None:
    """The ndarray a schema node stores in an ``.npy`` entry; None for anything else
    (a numpy scalar, an object array stored as JSON, a plain value)."""
    if not (_node_is(node, "numpy", "ndarray") and node.get("type") == "numpy"):
        return None
    return np.load(io.BytesIO(z.read(node["file"])), allow_pickle=False)


def _is_array(x: Any) -> bool:
    return isinstance(x, RawTensor | np.ndarray)


def _dtype(x: Any) -> str:
    return x.dtype if isinstance(x, RawTensor) else str(x.dtype)


def _values(x: RawTensor | np.ndarray) -> np.ndarray:
    if isinstance(x, RawTensor):
        return numpy_values(x.dtype, x.shape, x.data)
    return x


def _as_float(x: RawTensor | np.ndarray) -> np.ndarray:
    values = _values(x)
    return values.astype(np.complex128 if np.iscomplexobj(values) else np.float64)


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
    same_type = type(a) is type(b) and _dtype(a) == _dtype(b)  # a tensor is no array
    if same_type and np.array_equal(fa, fb, equal_nan=True):
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
