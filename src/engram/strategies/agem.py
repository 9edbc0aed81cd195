"""Averaged GEM (Chaudhry et al. 2019): project the update so it does not increase the
loss on a reference minibatch drawn from the replay buffer in the store.

If g . g_ref < 0, the gradient becomes g - (g . g_ref / g_ref . g_ref) g_ref.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from avalanche.models import avalanche_forward

from engram import distributed
from engram.distributed.reduce import average, sum_counts
from engram.memory.replay import Policy, ReplayBufferError
from engram.strategies.entry import DeclaredHparams
from engram.strategies.memory import Admission, MemoryPlugin, ReplayMemory
from engram.strategies.registry import default


class AGEMPlugin(DeclaredHparams, MemoryPlugin):
    engram_name = "agem"
    hparams_also = ("seed", "admission")  # besides the section's fields (registry)
    # each minibatch is admitted as it is trained on; hparams() records it (stores hold it)
    admission: Admission = "stream"

    def __init__(
        self,
        mem_size: int = default("agem", "mem_size"),
        sample_size: int = default("agem", "sample_size"),
        policy: Policy = default("agem", "policy"),
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.mem_size = mem_size
        self.policy = policy
        self.seed = seed
        self.sample_size = sample_size
        self.memory = ReplayMemory(mem_size, policy, seed)

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        self.memory.observe(strategy)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.memory.admit(strategy)

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        buffer = self.memory.buffer
        if not sum_counts([len(buffer)], distributed.world())[0]:
            return  # (every rank decides alike: the reference gradient is a collective)
        if not len(buffer):
            raise ReplayBufferError(
                "A-GEM: this rank's buffer shard is empty while others' are not; use a "
                "mem_size of at least the world size"
            )
        params = [p for p in strategy.model.parameters() if p.requires_grad]
        grads = [
            p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params
        ]
        replayed = buffer.sample(self.sample_size)
        x = replayed["x"].to(strategy.device, strategy.mb_x.dtype)
        out = avalanche_forward(strategy.model, x, replayed["task"].to(strategy.device))
        reference = torch.autograd.grad(
            F.cross_entropy(out, replayed["y"].to(strategy.device)), params, allow_unused=True
        )
        g = torch.cat([t.reshape(-1) for t in grads])
        g_ref = torch.cat(
            [
                (r if r is not None else torch.zeros_like(p)).reshape(-1)
                for r, p in zip(reference, params, strict=True)
            ]
        )
        g_ref = average(g_ref, distributed.world())  # data-parallel: the global reference
        dot = torch.dot(g, g_ref)
        if dot < 0:
            g = g - dot / torch.dot(g_ref, g_ref) * g_ref
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = g[offset : offset + n].view_as(p).clone()
            offset += n


def _flat(grads: Any, params: list[torch.Tensor]) -> torch.Tensor:
    """One flat vector of gradients; a missing gradient counts as zeros."""
    return torch.cat(
        [
            (g.detach() if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )
