"""Helpers shared by the strategy plugins."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from avalanche.models import MultiTaskModule
from torch.utils.data import DataLoader

from engram import distributed


def experience_batches(strategy: Any, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """The current experience's training data, in order, untransformed for evaluation.

    Yields ``(x, y, task_labels)`` for multi-task models and ``(x, y)`` otherwise — the
    batch convention of :mod:`engram.memory.importance`. In a data-parallel run, this
    rank's shard of it (the importances sum the shards).
    """
    dataset = strategy.experience.dataset.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=distributed.world().shard(len(dataset)),  # data-parallel: this rank's
        collate_fn=getattr(dataset, "collate_fn", None),
    )
    multi_task = isinstance(strategy.model, MultiTaskModule)
    for batch in loader:
        x, y = batch[0].to(strategy.device), batch[1].to(strategy.device)
        yield (x, y, batch[-1].to(strategy.device)) if multi_task else (x, y)


def detached_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
