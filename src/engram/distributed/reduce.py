"""All-reduces of a data-parallel step: gradients, importances, evaluation counts.

engram averages gradients itself (one all-reduce of one flat buffer per step) rather
than wrapping the model in ``DistributedDataParallel``: Avalanche's plugins address
the model's parameters by name and DDP renames them ``module.*``, and DDP's overlap of
communication with backward buys nothing for the small models continual learning
trains. Plain averaging is what DDP computes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from engram.distributed import World


def average_gradients(params: Iterable[torch.Tensor], world: World) -> None:
    """Replace each parameter's gradient by its mean over the ranks (a missing gradient
    counts as zeros, so every rank sends the same layout)."""
    params = [p for p in params if p.requires_grad]
    if world.size == 1 or not params:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}  # one buffer per dtype, in order
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in group])  # fmt: skip
        dist.all_reduce(flat)
        flat /= world.size
        at = 0
        for p in group:
            n = p.numel()
            p.grad = flat[at : at + n].view_as(p).clone()
            at += n


def average(t: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of ``t`` over the ranks (a new tensor)."""
    if world.size == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / world.size


def all_true(flag: bool, world: World) -> bool:
    """Whether ``flag`` holds on every rank: a decision every rank then takes alike."""
    if world.size == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=world.group)  # a CPU flag: the gloo group
    return bool(t.item())


def sum_counts(counts: list[int], world: World) -> list[int]:
    """Integer counts summed over the ranks (exact)."""
    if world.size == 1:
        return counts
    t = torch.tensor(counts, dtype=torch.int64)
    dist.all_reduce(t, group=world.group)
    return t.tolist()


def sum_tensors(tensors: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """Each tensor summed over the ranks, in place (one all-reduce per tensor, in
    sorted-key order so every rank issues the same sequence)."""
    if world.size > 1:
        for key in sorted(tensors):
            dist.all_reduce(tensors[key])
    return tensors


def broadcast_module(module: torch.nn.Module, world: World) -> None:
    """Rank 0's parameters and buffers on every rank (as DDP does at construction).

    On the default group, so the module must be on the device it trains on already:
    NCCL moves CUDA tensors only."""
    if world.size == 1:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)
