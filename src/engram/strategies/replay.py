"""Experience replay (ER) over an LMDB-backed buffer: each step trains on the current
minibatch concatenated with a minibatch drawn from the buffer.

Avalanche's ReplayPlugin keeps index views into the original datasets (pickling one
pickles the whole dataset) and rebuilds its loader every experience; here the buffer's
samples are written once to the store and only its slot table is committed. The
buffer, its admission and its persistence are the plugin's
:class:`~engram.strategies.memory.ReplayMemory`.
"""

from __future__ import annotations

from typing import Any

import torch

from engram.memory.replay import Draw, Policy
from engram.strategies.memory import Admission, MemoryPlugin, ReplayMemory, check_admission
from engram.strategies.registry import default


class ERPlugin(MemoryPlugin):
    """Experience replay: the minibatch is extended with ``batch_size_mem`` buffer samples.

    ``admission``: see :mod:`engram.strategies.memory`. ``draw``: how buffer minibatches
    are drawn (:class:`~engram.memory.replay.ReplayBuffer`): independently with
    replacement, or passes through the buffer in random order as Avalanche's loaders do.
    """

    engram_name = "replay"

    def __init__(
        self,
        mem_size: int = default("replay", "mem_size"),
        batch_size_mem: int | None = default("replay", "batch_size_mem"),
        policy: Policy = default("replay", "policy"),
        seed: int = 0,
        admission: Admission = default("replay", "admission"),
        draw: Draw = default("replay", "draw"),
    ) -> None:
        super().__init__()
        self.admission = check_admission(admission)
        self.mem_size = mem_size
        self.policy = policy
        self.seed = seed
        self.batch_size_mem = batch_size_mem
        self.draw = draw
        self.memory = ReplayMemory(mem_size, policy, seed, draw)

    def hparams(self) -> dict[str, Any]:
        out = {"mem_size": self.mem_size, "policy": self.policy, "seed": self.seed,
               "admission": self.admission, "batch_size_mem": self.batch_size_mem}  # fmt: skip
        if self.draw != "with_replacement":  # runs recorded before draw existed: unchanged
            out["draw"] = self.draw
        return out

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        x, y, task = self.memory.observe(strategy)
        buffer = self.memory.buffer
        if not len(buffer):
            return
        replayed = buffer.sample(self.batch_size_mem or len(strategy.mb_x))
        strategy.mbatch[0] = torch.cat([x, replayed["x"].to(x.device, x.dtype)])
        strategy.mbatch[1] = torch.cat([y, replayed["y"].to(y.device)])
        strategy.mbatch[-1] = torch.cat([task, replayed["task"].to(task.device)])

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.admission == "stream":
            self.memory.admit(strategy)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.admission == "experience_end":
            self.memory.admit_experience(strategy)
