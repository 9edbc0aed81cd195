"""What the Avalanche adapters (:mod:`engram.strategies.avalanche_state`) share: storage
policies and their buffers to and from the store's sample table."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from engram.errors import EngramError
from engram.store import SampleIds
from engram.store.codec import TORCH_DTYPES, dtype_name
from engram.strategies.avalanche_state.params import jsonable

_HEADER = 16  # a sample record: target, task label (little-endian int64), then x's bytes


# --------------------------------------------------------- storage policies

_POLICIES = ("ExperienceBalancedBuffer", "ClassBalancedBuffer", "ReservoirSamplingBuffer",
             "ParametricBuffer")  # fmt: skip


def check_policy(policy: Any, owner: str) -> None:
    kind = type(policy).__name__
    if kind not in _POLICIES or not type(policy).__module__.startswith("avalanche."):
        raise EngramError(
            f"DurableTemplate cannot keep the state of {owner}'s storage policy {kind}: "
            f"supported are Avalanche's {', '.join(_POLICIES)}"
        )


def policy_hparams(policy: Any) -> dict[str, Any]:
    out = {"class": type(policy).__name__, "max_size": policy.max_size}
    if type(policy).__name__ != "ReservoirSamplingBuffer":
        out.update(adaptive_size=policy.adaptive_size,
                   total_num_groups=jsonable(policy.total_num_groups))  # fmt: skip
    if type(policy).__name__ == "ParametricBuffer":
        out.update(groupby=policy.groupby,
                   selection_strategy=type(policy.selection_strategy).__name__)  # fmt: skip
    return out


def policy_out(policy: Any, samples: BufferSamples) -> dict[str, Any]:
    kind = type(policy).__name__
    if kind == "ReservoirSamplingBuffer":
        return _group_out(policy, samples)
    state: dict[str, Any] = {
        "max_size": policy.max_size,
        "groups": {key: _group_out(g, samples) for key, g in policy.buffer_groups.items()},
    }
    if kind == "ExperienceBalancedBuffer":
        state["num_exps"] = policy._num_exps
    elif kind == "ClassBalancedBuffer":
        state["seen_classes"] = list(policy.seen_classes)  # in the set's order: it sizes groups
    else:
        state["seen_groups"] = list(policy.seen_groups)
    return state


def policy_in(policy: Any, state: dict[str, Any], samples: BufferSamples) -> None:
    """Set ``policy`` (the plugin's own object, settings kept) to ``state``."""
    from avalanche.training.storage_policy import ReservoirSamplingBuffer, _ParametricSingleBuffer

    kind = type(policy).__name__
    if kind == "ReservoirSamplingBuffer":
        _group_in(policy, state, samples)
        return
    policy.max_size = state["max_size"]
    groups = {}
    for key, group_state in state["groups"].items():
        if kind == "ParametricBuffer":
            group = _ParametricSingleBuffer(group_state["max_size"], policy.selection_strategy)
        else:
            group = ReservoirSamplingBuffer(group_state["max_size"])
        _group_in(group, group_state, samples)
        groups[key] = group
    policy.buffer_groups = groups
    if kind == "ExperienceBalancedBuffer":
        policy._num_exps = state["num_exps"]
    elif kind == "ClassBalancedBuffer":
        policy.seen_classes = set(state["seen_classes"])
    else:
        policy.seen_groups = set(state["seen_groups"])


def _group_out(group: Any, samples: BufferSamples) -> dict[str, Any]:
    state = {"max_size": group.max_size, "buffer": samples.save(group.buffer)}
    if hasattr(group, "_buffer_weights"):  # reservoir sampling: the samples' sort keys
        state["weights"] = group._buffer_weights.detach().clone()
    return state


def _group_in(group: Any, state: dict[str, Any], samples: BufferSamples) -> None:
    group.max_size = state["max_size"]
    group.buffer = samples.load(state["buffer"])
    if "weights" in state:
        group._buffer_weights = state["weights"].cpu()  # drawn on the CPU by the plugin


# ----------------------------------------------------------- sample records


class BufferSamples:
    """Dataset-backed buffers as records in the strategy's sample table.

    Each sample is written once: :meth:`save` returns the state of a buffer it wrote
    (or loaded) before as long as the buffer is the same dataset object, and when
    Avalanche replaces a buffer's dataset (a storage policy subsets the concatenation of
    the old buffer and the new data), only the samples that did not come from a
    dataset it saved or loaded are read and written (:class:`_Origins`). Inside
    :meth:`writing`, the buffers not saved again are forgotten.
    """

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self._known: dict[int, tuple[Any, dict[str, Any]]] = {}  # id(dataset) -> it, state
        self._saved: dict[int, tuple[Any, dict[str, Any]]] | None = None
        self._origins: _Origins | None = None  # of the known datasets; None: to build

    def writing(self) -> BufferSamples:
        return self

    def __enter__(self) -> None:
        self._saved = {}

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._known = self._saved
            self._origins = None
        self._saved = None

    def save(self, dataset: Any) -> dict[str, Any]:
        known = self._known.get(id(dataset))
        if known is None or known[0] is not dataset:
            known = (dataset, self._write(dataset))
        if self._saved is not None:
            self._saved[id(dataset)] = known
        return known[1]

    def load(self, state: dict[str, Any]) -> Any:
        x, y, t = read_samples(self.strategy.samples, state)
        dataset = _tensor_dataset(x, y, t)
        self._known[id(dataset)] = (dataset, state)
        self._origins = None
        return dataset

    def _write(self, dataset: Any) -> dict[str, Any]:
        if self._origins is None:
            self._origins = _Origins(self._known.values())
        ids, schema = self._origins.ids_of(dataset)
        new = np.flatnonzero(ids < 0)
        x, y, t = _materialize(dataset, None if len(new) == len(ids) else new.tolist())
        if len(new) and len(new) < len(ids) and _schema(x) != schema:
            return self._write_all(dataset)  # the new samples differ in shape or dtype
        if len(new) == len(ids):
            schema = _schema(x) if len(y) else {"x_dtype": None, "x_shape": None}
        if len(new):
            ids[new] = self._append(x, y, t)
        return {"ids": SampleIds.of(ids.tolist()), **schema}

    def _write_all(self, dataset: Any) -> dict[str, Any]:
        x, y, t = _materialize(dataset)
        return {"ids": SampleIds.of(self._append(x, y, t)), **_schema(x)}

    def _append(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> list[int]:
        header = np.empty((len(y), 2), dtype="<i8")
        header[:, 0], header[:, 1] = y.numpy(), t.numpy()
        rows = np.concatenate([header.view(np.uint8), _raw_rows(x)], axis=1)
        return self.strategy.samples.append([row.tobytes() for row in rows])


def _schema(x: torch.Tensor) -> dict[str, Any]:
    return {"x_dtype": dtype_name(x.dtype), "x_shape": list(x.shape[1:])}


class _Origins:
    """Which elements of an Avalanche dataset are samples already in the table.

    An Avalanche dataset is a tree of ``FlatData`` nodes (a list of child datasets, the
    indices into their concatenation, transform groups). An element is the sample a
    known dataset stored if it comes from the same node object at the same index with
    the same transforms above that node: the known dataset's own top node (the new
    buffer nests the old one), or one of the nodes it reaches (Avalanche flattens a
    subset of a concatenation into the leaves' indices). Data attributes (targets, task
    labels) follow the data through every subset and concatenation, so they match too.
    Building costs O(known samples) in numpy, looking up O(the dataset's length); on
    anything not shaped so, an element is simply new.
    """

    def __init__(self, known: Any) -> None:
        # (id(node), transforms above it) -> (node, sample id per index or -1, schema)
        self._nodes: dict[tuple[int, tuple], tuple[Any, np.ndarray, dict[str, Any]]] = {}
        for dataset, state in known:
            flat = getattr(dataset, "_flat_data", None)
            ids = state["ids"].as_subclass(torch.Tensor).numpy().astype(np.int64)
            if flat is None or not len(ids) or len(ids) != len(flat):
                continue
            schema = {"x_dtype": state["x_dtype"], "x_shape": state["x_shape"]}
            top = np.arange(len(ids))
            for node, above, index, positions in _walk(flat, top, top, ()):
                key = (id(node), above)
                entry = self._nodes.get(key)
                if entry is None or entry[2] != schema:
                    entry = (node, np.full(len(node), -1, dtype=np.int64), schema)
                    self._nodes[key] = entry
                entry[1][index] = ids[positions]

    def ids_of(self, dataset: Any) -> tuple[np.ndarray, dict[str, Any] | None]:
        """Per element of ``dataset``, the id of the sample it is (-1: a new one), and
        the schema of those samples (None if none is known)."""
        ids = np.full(len(dataset), -1, dtype=np.int64)
        flat = getattr(dataset, "_flat_data", None)
        schema = None
        if flat is None or not self._nodes or len(flat) != len(ids):
            return ids, schema
        top = np.arange(len(ids))
        for node, above, index, positions in _walk(flat, top, top, ()):
            entry = self._nodes.get((id(node), above))
            if entry is None or entry[0] is not node:
                continue
            found = entry[1][index]
            hit = found >= 0
            if hit.any():
                if schema not in (None, entry[2]):  # known samples of two schemas
                    return np.full(len(ids), -1, dtype=np.int64), None
                schema = entry[2]
                ids[positions[hit]] = found[hit]
        return ids, schema


def _walk(node: Any, index: np.ndarray, positions: np.ndarray, above: tuple) -> Any:
    """``(node, transforms above it, indices in it, positions in the dataset)`` for
    ``node`` and every node below it that at most one layer of transforms separates
    from the top (what a second layer would do to an element is not compared)."""
    yield node, above, index, positions
    children = getattr(node, "_datasets", None)
    if children is None or not hasattr(node, "_cumulative_sizes"):
        return
    own = _transforms(node)
    if own and above:
        return
    if node._indices is not None:
        index = np.fromiter(node._indices, dtype=np.int64, count=len(node))[index]
    ends = np.asarray(node._cumulative_sizes, dtype=np.int64)
    starts = np.concatenate([np.zeros(1, dtype=np.int64), ends[:-1]])
    child = np.searchsorted(ends, index, side="right")
    for k in np.unique(child).tolist():
        mine = child == k
        yield from _walk(children[k], index[mine] - starts[k], positions[mine], above or own)


def _transforms(node: Any) -> tuple:
    """A node's transform groups, comparable (by the transforms' identity); () if none."""
    out = []
    for groups in (getattr(node, "_frozen_transform_groups", None),
                   getattr(node, "_transform_groups", None)):  # fmt: skip
        table = getattr(groups, "transform_groups", None) or {}
        out.append(tuple(sorted((g, id(f)) for g, f in table.items() if f is not None)))
    return tuple(out) if any(out) else ()


def read_samples(table: Any, state: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The ``(x, y, task)`` tensors of a buffer written to ``table`` (a store's
    ``samples``), in the buffer's order."""
    ids = state["ids"]
    if not len(ids):
        return torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    dtype, shape = TORCH_DTYPES[state["x_dtype"]], [int(d) for d in state["x_shape"]]
    size = _HEADER + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    rows = table.read(ids.as_subclass(torch.Tensor), size)
    header = torch.from_numpy(rows[:, :_HEADER].copy()).view(torch.int64)
    x = torch.from_numpy(rows[:, _HEADER:].copy()).view(dtype).reshape(len(ids), *shape)
    return x, header[:, 0].clone(), header[:, 1].clone()


def _materialize(
    dataset: Any, positions: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A buffer's samples (those at ``positions``; None: all) read through its eval
    transforms (no random augmentation, no draw from the global RNG): stacked x,
    targets and task labels."""
    data = dataset.eval() if hasattr(dataset, "eval") else dataset
    xs, ys, ts = [], [], []
    for i in range(len(data)) if positions is None else positions:
        item = data[i]
        x, y, t = item[0], item[1], item[-1]
        if not isinstance(x, torch.Tensor):
            raise EngramError(
                f"cannot store a replay sample whose input is a {type(x).__name__}: engram "
                "stores tensors; give the stream's datasets a transform that makes tensors"
            )
        xs.append(x)
        ys.append(int(y))
        ts.append(int(t))
    if not xs:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    return (
        torch.stack(xs).cpu(),
        torch.tensor(ys, dtype=torch.int64),
        torch.tensor(ts, dtype=torch.int64),
    )


def _tensor_dataset(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> Any:
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset,
    )
    from avalanche.benchmarks.utils.utils import concat_datasets

    if not len(y):
        return concat_datasets([])  # what an empty Avalanche buffer holds
    # One part per run of equal task labels, each with a constant task label, as an
    # experience's dataset has: Avalanche cannot concatenate a dataset whose task labels
    # are a plain sequence with one whose are constant (FlatData.concat fails).
    changes = (torch.nonzero(t[1:] != t[:-1]).reshape(-1) + 1).tolist()
    bounds = [0, *changes, len(t)]
    parts = [
        _make_taskaware_tensor_classification_dataset(
            x[a:b], y[a:b], task_labels=int(t[a]), targets=y[a:b].tolist()
        )
        for a, b in itertools.pairwise(bounds)
    ]
    return concat_datasets(parts)


def _raw_rows(x: torch.Tensor) -> np.ndarray:
    row = x[0].numel() * x.element_size()
    return x.contiguous().view(torch.uint8).reshape(len(x), row).numpy()
