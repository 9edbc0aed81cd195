"""What the Avalanche adapters (:mod:`engram.strategies.avalanche_state`) share: the
resumable replay loaders and memory streams."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Sampler, default_collate

from engram.errors import EngramError
from engram.training.sampler import ResumableBatchSampler, epoch_seed

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
