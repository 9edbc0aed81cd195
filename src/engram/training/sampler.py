"""A minibatch order that is a pure function of (seed, experience, epoch).

Avalanche's training loaders shuffle with the global torch RNG (and its task-balanced
loader draws more from it), so the data order of a resumed run depends on everything
that consumed that RNG before. Here each epoch's permutation comes from its own
generator, seeded from the run's seed, the experience and the epoch, so a run resumed
in the middle of an epoch replays exactly the remaining minibatches by skipping the
ones already trained on, without loading them and without touching the global RNG.

Data-parallel: the minibatch order is the job's (the same on every rank); each rank
takes its shard of every global minibatch, so a resumed rank skips exactly as many.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def epoch_seed(seed: int, experience: int, epoch: int) -> int:
    """A distinct 63-bit seed per (run seed, experience, epoch)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + experience * 0xBF58476D1CE4E5B9 + epoch) % (1 << 63)
    return mixed or 1


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffled minibatches of ``range(n)``; :meth:`set_epoch` picks the order and start."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        experience: int,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.experience = experience
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0  # minibatches of this epoch to skip (already trained on)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.experience, self.epoch))
        order = torch.randperm(self.n, generator=gen).tolist()
        for b in range(self.start, len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._shard(batch) if self.world_size > 1 else batch

    def _shard(self, batch: list[int]) -> list[int]:
        """This rank's part of a global minibatch: every ``world_size``-th item from
        ``rank``. As ``DistributedSampler`` does, a minibatch whose size is not a
        multiple of the world size is padded by repeating its first items, so every
        rank gets the same number and the averaged gradient weighs ranks equally."""
        w = self.world_size
        padded = [batch[i % len(batch)] for i in range(-(-len(batch) // w) * w)]
        return padded[self.rank :: w]

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)
