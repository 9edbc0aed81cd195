"""What the Avalanche adapters (:mod:`engram.strategies.avalanche_state`) share: plugin
parameters and kept models to and from state, storage policies and their buffers to and
from the store's sample table, and the resumable replay loaders and memory streams."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Sampler, default_collate

from engram.errors import EngramError
from engram.store import SampleIds
from engram.store.codec import TORCH_DTYPES, dtype_name
from engram.training.sampler import ResumableBatchSampler, epoch_seed

_HEADER = 16  # a sample record: target, task label (little-endian int64), then x's bytes


def params_out(params: dict[str, Any]) -> dict[str, Any]:
    """A ``{name: ParamData}`` dict as ``{name: {"name", "data"}}``."""
    return {k: {"name": pd.name, "data": pd.data.detach().clone()} for k, pd in params.items()}


def params_in(state: dict[str, Any], cpu: bool = False) -> dict[str, Any]:
    from avalanche.training.utils import ParamData

    out = {}
    for k, item in state.items():
        data = item["data"].cpu() if cpu else item["data"]
        out[k] = ParamData(item["name"], init_tensor=data, device=data.device)
    return out


def maybe_params_out(params: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if params is None else params_out(params)


def maybe_params_in(state: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if state is None else params_in(state)


def module_out(module: nn.Module | None) -> dict[str, Any] | None:
    """A model a plugin keeps: its weights, each submodule's train/eval mode and the
    parameters it froze."""
    if module is None:
        return None
    return {
        "weights": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "training": {name: m.training for name, m in module.named_modules()},
        "frozen": [name for name, p in module.named_parameters() if not p.requires_grad],
    }


def module_in(state: dict[str, Any] | None, current: nn.Module) -> nn.Module | None:
    """A kept model rebuilt as a deep copy of ``current`` with the stored weights.

    Modules the current model gained since (a new head) keep the copy's weights.
    """
    if state is None:
        return None
    module = copy.deepcopy(current)
    result = module.load_state_dict(state["weights"], strict=False)  # raises on shapes
    if result.unexpected_keys:
        raise EngramError(
            "a model kept by an Avalanche plugin has weights the current model lacks ("
            + ", ".join(result.unexpected_keys[:5])
            + "); use the architecture that produced the store"
        )
    for name, m in module.named_modules():
        if name in state["training"]:
            m.training = bool(state["training"][name])
    frozen = set(state["frozen"])
    for name, p in module.named_parameters():
        p.requires_grad_(name not in frozen)
    return module


def detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    return value


def jsonable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


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


# ------------------------------------------------------ the resumable loader


def install_resumable_replay_loader(plugin: Any) -> None:
    """Wrap ``plugin.before_training_exp`` (on the instance, once) so that the
    ``ReplayDataLoader`` it installs is replaced by :func:`resumable_replay_loader`."""
    if plugin.__dict__.get("_engram_resumable_loader"):
        return
    original = plugin.before_training_exp

    def before_training_exp(strategy: Any, **kwargs: Any) -> None:
        from avalanche.benchmarks.utils.data_loader import ReplayDataLoader

        original(strategy, **kwargs)
        durable = hasattr(strategy, "cursor")  # a DurableTemplate (not a plain Avalanche one)
        if durable and isinstance(strategy.dataloader, ReplayDataLoader):
            strategy.dataloader = resumable_replay_loader(strategy, strategy.dataloader)

    plugin.before_training_exp = before_training_exp
    plugin.__dict__["_engram_resumable_loader"] = True


def resumable_replay_loader(strategy: Any, loader: Any) -> DataLoader:
    """A loader with the datasets and batch sizes of Avalanche's ``ReplayDataLoader``
    ``loader`` (the experience's data first, then the memory's parts), ordered by a
    :class:`ReplayBatchSampler` of the template's seed and cursor."""
    data, *memory = loader.datasets
    if data is not strategy.adapted_dataset:
        raise EngramError(
            "cannot make this ReplayDataLoader resumable: its first dataset is not the "
            "experience's training data"
        )
    kwargs = loader.loader_kwargs
    drop_last = bool(kwargs.get("drop_last", False))
    world = strategy.world
    data_sampler = ResumableBatchSampler(len(data), loader.batch_sizes[0], strategy.seed,
                                         strategy.cursor.experience, drop_last,
                                         world.rank, world.size)  # fmt: skip
    sampler = ReplayBatchSampler(
        data_sampler, [len(m) for m in memory], list(loader.batch_sizes[1:]),
        shuffle=bool(kwargs.get("shuffle", True)),
        oversample=bool(loader.oversample_small_datasets),
    )  # fmt: skip
    return DataLoader(
        ConcatDataset([data, *memory]),
        batch_sampler=sampler,
        num_workers=int(kwargs.get("num_workers", 0) or 0),
        collate_fn=kwargs.get("collate_fn") or getattr(data, "collate_fn", None),
        generator=torch.Generator(),  # seeded per epoch by the template
    )


class ReplayBatchSampler(Sampler[list[int]]):
    """Avalanche's replay minibatches, resumable: each minibatch of the experience's data
    (a :class:`~engram.training.sampler.ResumableBatchSampler`) followed by one
    minibatch of each memory part, as ``ReplayDataLoader`` composes them (memory parts
    reshuffled and restarted when used up if ``oversample``). Every order is a function
    of (seed, experience, epoch): :meth:`set_epoch` picks it and how many minibatches
    to skip, without touching the global RNG.

    Indices point into ``ConcatDataset([data, *memory parts])``.
    """

    def __init__(
        self,
        data: ResumableBatchSampler,
        memory_sizes: list[int],
        memory_batch_sizes: list[int],
        *,
        shuffle: bool = True,
        oversample: bool = True,
    ) -> None:
        self.data = data
        self.memory_sizes = memory_sizes
        self.memory_batch_sizes = memory_batch_sizes
        self.shuffle = shuffle
        self.oversample = oversample
        self.offsets = (
            list(np.cumsum([data.n, *memory_sizes[:-1]]).tolist()) if memory_sizes else []
        )
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.data.set_epoch(epoch, start)
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[list[int]]:
        base = epoch_seed(self.data.seed, self.data.experience, self.epoch)
        parts = [
            self._memory_batches(n, b, (base + 0x9E3779B9 * (i + 1)) % (1 << 63) or 1)
            for i, (n, b) in enumerate(zip(self.memory_sizes, self.memory_batch_sizes, strict=True))
        ]
        for _ in range(self.start):  # the memory minibatches of the skipped minibatches
            for part in parts:
                next(part, None)
        for batch in self.data:
            out = list(batch)
            for offset, part in zip(self.offsets, parts, strict=True):
                picked = next(part, None)
                if picked is not None:
                    if self.data.world_size > 1:
                        picked = self.data._shard(picked)
                    out += [offset + i for i in picked]
            yield out

    def _memory_batches(self, n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
        return _batches(n, batch_size, seed, shuffle=self.shuffle, cycle=self.oversample,
                        drop_last=self.data.drop_last)  # fmt: skip


class MemoryStream:
    """An endless stream of memory minibatches, as Avalanche's
    ``GroupBalancedInfiniteDataLoader`` gives them (``batch_size`` samples of each
    buffer, collated; a buffer used up is reshuffled), ordered by ``seed`` alone;
    ``drawn`` counts the minibatches given (a stream made with ``drawn=k`` goes on
    after the k-th)."""

    def __init__(self, buffers: list[Any], batch_size: int, seed: int, drawn: int = 0) -> None:
        self.buffers = buffers
        self.collate = getattr(buffers[0], "collate_fn", None) or default_collate
        self._parts = [
            _batches(len(b), batch_size, (seed + 0x9E3779B9 * (i + 1)) % (1 << 63) or 1)
            for i, b in enumerate(buffers)
        ]
        self.drawn = 0
        for _ in range(drawn):
            self._next_indices()

    def _next_indices(self) -> list[list[int]]:
        self.drawn += 1
        return [next(part, []) for part in self._parts]

    def __iter__(self) -> MemoryStream:
        return self

    def __next__(self) -> Any:
        picked = self._next_indices()
        return self.collate(
            [b[i] for b, idx in zip(self.buffers, picked, strict=True) for i in idx]
        )


def _batches(
    n: int, batch_size: int, seed: int, *, shuffle: bool = True, cycle: bool = True,
    drop_last: bool = False,
) -> Iterator[list[int]]:  # fmt: skip
    """Minibatches of ``range(n)`` (the last of a pass smaller unless ``drop_last``),
    reshuffled each pass by a generator of ``seed``; passes repeat if ``cycle``."""
    if n == 0 or (drop_last and n < batch_size):
        return
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
        for i in range(0, n, batch_size):
            chunk = order[i : i + batch_size]
            if drop_last and len(chunk) < batch_size:
                break
            yield chunk
        if not cycle:
            return
