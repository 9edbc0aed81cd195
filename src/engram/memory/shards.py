"""A data-parallel run's replay buffer: one shard per rank, dealt anew when the world
size changes (:class:`~engram.memory.replay.ReplayBuffer` states, engram.distributed)."""

from __future__ import annotations

from typing import Any

import torch

from engram.store import SampleIds


def shard_capacity(capacity: int, rank: int, size: int) -> int:
    """Rank ``rank``'s share of a global ``capacity`` (they sum to it)."""
    return capacity // size + (rank < capacity % size)


def repartition(shards: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """Buffer shard states of one world size as ``size`` shards (a resume at another
    world size): every buffered sample is kept, dealt round-robin in (old rank, slot)
    order; counters are split so they sum as before; shard ``r`` keeps old shard
    ``r``'s random streams (a new rank takes rank 0's, re-seeded by its rank)."""
    ids = torch.cat([s["slots"].as_subclass(torch.Tensor) for s in shards])
    keys = torch.cat([s["slot_keys"] for s in shards])
    seen = sum(s["seen"] for s in shards)
    per_key: dict[str, int] = {}
    for s in shards:
        for k, v in s["seen_per_key"].items():
            per_key[k] = per_key.get(k, 0) + v
    capacity = sum(s["hparams"]["capacity"] for s in shards)
    out = []
    for r in range(size):
        old = shards[r] if r < len(shards) else shards[0]
        take = torch.arange(r, len(ids), size)
        state = {
            **old,
            "hparams": {**old["hparams"], "capacity": shard_capacity(capacity, r, size)},
            "seen": seen // size + (r < seen % size),
            "seen_per_key": {k: v // size + (r < v % size) for k, v in per_key.items()},
            "slots": SampleIds.of(ids[take]),
            "slot_keys": keys[take].clone(),
        }
        state.pop("order", None)  # another shard's pass: each starts a new one
        state.pop("order_size", None)
        if r >= len(shards):
            for name, offset in (("admit_rng", 0), ("sample_rng", 1)):
                g = torch.Generator().manual_seed(old["hparams"]["seed"] + 7919 * r + offset)
                state[name] = g.get_state()
        out.append(state)
    return out
