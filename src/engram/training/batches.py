"""Minibatches of an in-memory tensor stream without a per-sample fetch.

Avalanche fetches every sample through its dataset tree (index remapping at each level,
transform groups, data attributes), then collates: on the digits streams that is the
largest cost of a run after the imports (a third of a 4-epoch EWC run's time, measured
with cProfile in benchmarks/vs_avalanche.py's setting), paid again every epoch and every
evaluation. When every leaf of the tree is a plain ``TensorDataset`` and every transform set
for the group in use is known to be fixed (none, or Avalanche's class-id remapping), a
sample is the same every time it is fetched, so the dataset
is read once into one tensor per field and each minibatch is one ``index_select`` per
field — the same values, in the same order the sampler gives. Anything else (an image
folder, a transform, a dataset of the user's own class) keeps Avalanche's path.

The copy is bounded by :data:`MAX_BYTES`: a stream larger than that keeps the per-sample
path rather than hold a second copy of it in memory.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

try:  # Avalanche's class-id remapping; a later Avalanche without it: per-sample fetch
    from avalanche.benchmarks.utils.classification_dataset import lookup as _LOOKUP
except ImportError:  # pragma: no cover
    _LOOKUP = None

# A second in-memory copy of one experience's data; above this, fetching per sample
# costs less than the memory (the embedded streams are under 1 MiB an experience).
MAX_BYTES = 256 * 2**20


class TensorBatches(Dataset):
    """A dataset's samples as one tensor per field; ``__getitems__`` gives a collated
    minibatch (``[x, y, t]``), so its DataLoader's ``collate_fn`` is :func:`as_is`."""

    def __init__(self, fields: list[torch.Tensor]) -> None:
        self.fields = fields

    def __len__(self) -> int:
        return len(self.fields[0])

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return [f[i] for f in self.fields]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [f.index_select(0, idx) for f in self.fields]


def as_is(batch: Any) -> Any:
    """The collate of :class:`TensorBatches` (its minibatches come collated)."""
    return batch


def tensor_batches(dataset: Any) -> TensorBatches | None:
    """``dataset`` (an Avalanche dataset, with its current transform group) read into
    tensors, or None when a sample is not a plain function of tensors (see the module)
    or the copy would exceed :data:`MAX_BYTES`."""
    flat = getattr(dataset, "_flat_data", None)
    if flat is None or len(dataset) == 0 or not _plain(flat, _group(flat)):
        return None
    first = dataset.collate_fn([dataset[0]])
    if not isinstance(first, list | tuple) or not all(
        isinstance(f, torch.Tensor) and f.ndim >= 1 and len(f) == 1 for f in first
    ):
        return None
    if sum(f.element_size() * f.numel() for f in first) * len(dataset) > MAX_BYTES:
        return None
    # its own generator: iterating a DataLoader draws a seed from the global RNG, and a
    # read the run did not make before (or makes once, not per epoch) would move it
    parts = list(DataLoader(dataset, batch_size=4096, collate_fn=dataset.collate_fn,
                            generator=torch.Generator()))  # fmt: skip
    return TensorBatches([torch.cat(field) for field in zip(*parts, strict=True)])


def _group(flat: Any) -> str | None:
    groups = getattr(flat, "_transform_groups", None)
    return getattr(groups, "current_group", None)


def _plain(node: Any, group: str | None) -> bool:
    """Whether every leaf below ``node`` is a TensorDataset (its own ``__getitem__``)
    and no level sets a transform for ``group``."""
    children = getattr(node, "_datasets", None)
    if children is None:  # a leaf
        return isinstance(node, TensorDataset) and (
            type(node).__getitem__ is TensorDataset.__getitem__
        )
    for attr in ("_transform_groups", "_frozen_transform_groups"):
        groups = getattr(node, attr, None)
        # indexed as Avalanche's fetch does: a group's entry may be a default's
        if groups is not None and group is not None and not _fixed(groups[group]):
            return False
    return all(_plain(child, group) for child in children)


def _fixed(transform: Any) -> bool:
    """Whether ``transform`` is known to give a sample the same value every time: None,
    Avalanche's class-id remapping (``partial(lookup, table)``, which its generators add
    to the targets), or Avalanche's tuple of per-field transforms, each of those."""
    if transform is None:
        return True
    if isinstance(transform, functools.partial):
        return transform.func is _LOOKUP and not transform.keywords
    fields = getattr(transform, "transforms", None)
    return type(transform).__name__ == "TupleTransform" and all(_fixed(t) for t in fields)


class BatchesCache:
    """:func:`tensor_batches` of the datasets a run evaluates on, kept across calls.

    Avalanche builds a new dataset object each time it adapts an experience for
    evaluation (``experience.dataset.eval()``), a shallow clone sharing the children and
    index map of the one before; an entry is found by those (their ids, held alive by the
    entry), so a dataset a plugin replaced or transformed is never served from it. At
    most :data:`MAX_BYTES` in all; the oldest entries go first.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[Any, TensorBatches]] = {}

    def get(self, dataset: Any) -> TensorBatches | None:
        key = _signature(dataset)
        if key is None:
            return None
        if key in self._entries:
            return self._entries[key][1]
        batches = tensor_batches(dataset)
        if batches is not None:
            self._entries[key] = (dataset, batches)
            while sum(_nbytes(b) for _, b in self._entries.values()) > MAX_BYTES:
                del self._entries[next(iter(self._entries))]
        return batches


def _signature(dataset: Any) -> tuple | None:
    flat = getattr(dataset, "_flat_data", None)
    children = getattr(flat, "_datasets", None)
    if children is None or not _plain(flat, _group(flat)):
        return None
    return (tuple(map(id, children)), id(getattr(flat, "_indices", None)), _group(flat),
            len(dataset))  # fmt: skip


def _nbytes(batches: TensorBatches) -> int:
    return sum(f.element_size() * f.numel() for f in batches.fields)
