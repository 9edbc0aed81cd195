"""Dark Experience Replay, DER and DER++ (Buzzega et al. 2020), buffer in the store.

The buffer keeps each admitted sample's logits (as the model produced them when it
was admitted). DER adds ``alpha * MSE(f(x_mem), logits_mem)``; DER++ also
``beta * CE(f(x_mem'), y_mem')`` on a second buffer minibatch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from avalanche.models import avalanche_forward

from engram.memory.replay import Policy
from engram.strategies.entry import DeclaredHparams
from engram.strategies.memory import Admission, MemoryPlugin, ReplayMemory, check_admission
from engram.strategies.registry import default


class DERPlugin(DeclaredHparams, MemoryPlugin):
    engram_name = "der"
    hparams_also = ("seed",)  # besides the section's fields (registry)

    def __init__(
        self,
        mem_size: int = default("der", "mem_size"),
        alpha: float = default("der", "alpha"),
        beta: float = default("der", "beta"),
        batch_size_mem: int | None = default("der", "batch_size_mem"),
        policy: Policy = default("der", "policy"),
        seed: int = 0,
        admission: Admission = default("der", "admission"),
    ) -> None:
        super().__init__()
        self.admission = check_admission(admission)
        self.mem_size = mem_size
        self.policy = policy
        self.seed = seed
        self.alpha = alpha
        self.beta = beta  # > 0: DER++
        self.batch_size_mem = batch_size_mem
        self.memory = ReplayMemory(mem_size, policy, seed)

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        self.memory.observe(strategy)

    def _forward(self, strategy: Any, replayed: dict[str, torch.Tensor]) -> torch.Tensor:
        x = replayed["x"].to(strategy.device, strategy.mb_x.dtype)
        return avalanche_forward(strategy.model, x, replayed["task"].to(strategy.device))

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        buffer = self.memory.buffer
        if not len(buffer):
            return
        size = self.batch_size_mem or len(strategy.mb_x)
        replayed = buffer.sample(size)
        logits = replayed["logits"].to(strategy.device)
        strategy.loss += self.alpha * F.mse_loss(self._forward(strategy, replayed), logits)
        if self.beta > 0:
            replayed = buffer.sample(size)
            out = self._forward(strategy, replayed)
            strategy.loss += self.beta * F.cross_entropy(out, replayed["y"].to(strategy.device))

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.admission == "stream":
            self.memory.admit(strategy, logits=strategy.mb_output.detach())

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.admission == "experience_end":
            self.memory.admit_experience(strategy, self.logits_for)

    def logits_for(self, strategy: Any, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        # experience_end: the trained model's logits, as Avalanche's DER stores them
        return avalanche_forward(strategy.model, x.to(strategy.device), task.to(strategy.device))
