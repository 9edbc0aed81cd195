"""Data-parallel continual learning on ``torch.distributed`` (launched by ``torchrun``).

One process per rank; every rank holds the whole model (replicated, as in DDP) and
trains on a disjoint shard of each global minibatch; gradients are averaged with one
all-reduce per step. Rank 0 owns the store: at a commit every rank sends it its part
(RNG streams, plugin state, new replay samples) as tensors, never pickles, and rank 0
commits one version holding every rank's part (docs/distributed.md).

:func:`world` is the process's view: ``World(0, 1)`` outside a process group, so
single-process code paths ask ``world().size > 1`` and nothing else changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from engram.errors import EngramError


class DistributedError(EngramError):
    """A data-parallel job cannot go on: another rank failed, or the ranks disagree."""


class PeerFailed(DistributedError):
    """Rank 0 failed a step every rank takes: rank 0 reports why; the others exit
    non-zero without repeating it."""


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` ranks; ``group``: the gloo group state travels
    on (the default group when it is gloo; a gloo group beside NCCL otherwise)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's items of ``range(n)`` (strided: every ``size``-th from ``rank``)."""
        return range(self.rank, n, self.size)


_SINGLE = World()
_world: World | None = None


def world() -> World:
    """The process's world: the initialised process group's, else a single rank."""
    global _world
    if _world is not None:
        return _world
    import sys

    dist = sys.modules.get("torch.distributed")  # never import torch for a single process
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return _SINGLE
    group = None
    if dist.get_backend() != "gloo":  # NCCL moves CUDA tensors; state travels on CPU
        group = dist.new_group(backend="gloo")
    _world = World(dist.get_rank(), dist.get_world_size(), group)
    return _world


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets
    the ``torch.distributed`` environment) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device: str) -> str:
    """The process group's backend for ``training.device``: NCCL where the run trains on
    CUDA (``cuda``, ``cuda:N``, or ``auto`` with a GPU present, as the template resolves
    it), else gloo."""
    import torch

    on_cuda = device == "auto" or device.startswith("cuda")
    return "nccl" if on_cuda and torch.cuda.is_available() else "gloo"


def init_from_env(device: str, timeout_s: float = 1800.0) -> World:
    """Join the process group the launcher described (:func:`backend_for` the device).

    Raises:
        DistributedError: the rendezvous failed (a rank cannot reach the others).
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError, OSError) as e:
            where = os.environ.get("MASTER_ADDR", "?") + ":" + os.environ.get("MASTER_PORT", "?")
            raise DistributedError(
                f"rank {os.environ.get('RANK', '?')} cannot join the job at {where}: {e}"
            ) from None
    return world()


def shutdown() -> None:
    """Leave the process group (if this module's caller joined one)."""
    global _world
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from engram.distributed import wire

        try:
            wire.settle()  # a commit's outcome still on its way
        except RuntimeError:
            pass  # a peer is gone: the job is ending anyway
        finally:
            dist.destroy_process_group()
    _world = None


__all__ = [
    "DistributedError",
    "PeerFailed",
    "World",
    "backend_for",
    "init_from_env",
    "launched",
    "shutdown",
    "world",
]
