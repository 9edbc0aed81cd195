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

    Each buffer is written once: :meth:`save` returns the state of a buffer it wrote
    (or loaded) before as long as the buffer is the same dataset object (Avalanche
    replaces a buffer's dataset whenever it changes it). Inside :meth:`writing`, the
    buffers not saved again are forgotten.
    """

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self._known: dict[int, tuple[Any, dict[str, Any]]] = {}  # id(dataset) -> it, state
        self._saved: dict[int, tuple[Any, dict[str, Any]]] | None = None

    def writing(self) -> BufferSamples:
        return self

    def __enter__(self) -> None:
        self._saved = {}

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._known = self._saved
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
        return dataset

    def _write(self, dataset: Any) -> dict[str, Any]:
        x, y, t = _materialize(dataset)
        if not len(y):
            return {"ids": SampleIds.of([]), "x_dtype": None, "x_shape": None}
        header = np.empty((len(y), 2), dtype="<i8")
        header[:, 0], header[:, 1] = y.numpy(), t.numpy()
        rows = np.concatenate([header.view(np.uint8), _raw_rows(x)], axis=1)
        ids = self.strategy.samples.append([row.tobytes() for row in rows])
        return {"ids": SampleIds.of(ids), "x_dtype": dtype_name(x.dtype),
                "x_shape": list(x.shape[1:])}  # fmt: skip


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


def _materialize(dataset: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A buffer's samples read through its eval transforms (no random augmentation,
    no draw from the global RNG): stacked x, targets and task labels."""
    data = dataset.eval() if hasattr(dataset, "eval") else dataset
    xs, ys, ts = [], [], []
    for i in range(len(data)):
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
