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
from engram.strategies.registry import default
from engram.strategies.replay import Admission, BufferPlugin


class DERPlugin(BufferPlugin):
    engram_name = "der"

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
        super().__init__(mem_size, policy, seed, admission)
        self.alpha = alpha
        self.beta = beta  # > 0: DER++
        self.batch_size_mem = batch_size_mem

    def hparams(self) -> dict[str, Any]:
        return {
            **super().hparams(),
            "alpha": self.alpha,
            "beta": self.beta,
            "batch_size_mem": self.batch_size_mem,
        }

    def _forward(self, strategy: Any, memory: dict[str, torch.Tensor]) -> torch.Tensor:
        x = memory["x"].to(strategy.device, strategy.mb_x.dtype)
        return avalanche_forward(strategy.model, x, memory["task"].to(strategy.device))

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if not len(self.buffer):
            return
        size = self.batch_size_mem or len(strategy.mb_x)
        memory = self.buffer.sample(size)
        logits = memory["logits"].to(strategy.device)
        strategy.loss += self.alpha * F.mse_loss(self._forward(strategy, memory), logits)
        if self.beta > 0:
            memory = self.buffer.sample(size)
            out = self._forward(strategy, memory)
            strategy.loss += self.beta * F.cross_entropy(out, memory["y"].to(strategy.device))

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.admission == "stream":
            self.admit(strategy, logits=strategy.mb_output.detach())

    def logits_for(self, strategy: Any, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        # experience_end: the trained model's logits, as Avalanche's DER stores them
        return avalanche_forward(strategy.model, x.to(strategy.device), task.to(strategy.device))
