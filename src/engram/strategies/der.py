"""Dark Experience Replay, DER and DER++ (Buzzega et al. 2020), buffer in the store.

The buffer keeps each admitted sample's logits (as the model produced them when it
was admitted). DER adds ``alpha * MSE(f(x_mem), logits_mem)``; DER++ also
``beta * CE(f(x_mem'), y_mem')`` on a second buffer minibatch.

The buffer minibatches go through the model in the same forward as the training
minibatch (appended to it in ``before_forward``, split off again in ``after_forward``, so
the criterion, the metrics and admission see only the training rows): one forward of
3n rows instead of three of n, the same loss. Not for a model with batch statistics
(batch norm, instance norm with running stats): there the rows a forward normalises
together change the result, so each buffer minibatch gets its own forward, as in the
paper's code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from avalanche.models import avalanche_forward
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

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
        # one step's buffer minibatches, their rows in the forward, their outputs
        self._replayed: list[dict[str, torch.Tensor]] = []
        self._rows: tuple[int, list[int]] | None = None
        self._outputs: list[torch.Tensor] = []

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        self.memory.observe(strategy)
        self._replayed, self._outputs, self._rows = [], [], None
        buffer = self.memory.buffer
        if not len(buffer):
            return
        size = self.batch_size_mem or len(strategy.mb_x)
        self._replayed = [buffer.sample(size) for _ in range(2 if self.beta > 0 else 1)]
        if not fusable(strategy.model):
            return  # each buffer minibatch gets its own forward in before_backward
        x, y, task = strategy.mb_x, strategy.mb_y, strategy.mb_task_id
        self._rows = (len(x), [len(r["x"]) for r in self._replayed])
        strategy.mbatch[0] = torch.cat([x] + [r["x"].to(x.device, x.dtype) for r in self._replayed])
        strategy.mbatch[1] = torch.cat([y] + [r["y"].to(y.device) for r in self._replayed])
        strategy.mbatch[-1] = torch.cat(
            [task] + [r["task"].to(task.device) for r in self._replayed]
        )

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self._rows is None:
            return
        (n, sizes), self._rows = self._rows, None
        end = n + sum(sizes)
        out = strategy.mb_output
        self._outputs = list(out[n:end].split(sizes))
        # rows appended after this plugin's (another plugin's before_forward) stay
        strategy.mb_output = torch.cat([out[:n], out[end:]])
        for i in (0, 1, -1):
            t = strategy.mbatch[i]
            strategy.mbatch[i] = torch.cat([t[:n], t[end:]])

    def _forward(self, strategy: Any, replayed: dict[str, torch.Tensor]) -> torch.Tensor:
        x = replayed["x"].to(strategy.device, strategy.mb_x.dtype)
        return avalanche_forward(strategy.model, x, replayed["task"].to(strategy.device))

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        replayed, outputs = self._replayed, self._outputs
        self._replayed, self._outputs = [], []
        if not replayed:
            return
        if not outputs:
            outputs = [self._forward(strategy, r) for r in replayed]
        out = _wide(outputs[0])
        logits = replayed[0]["logits"].to(strategy.device, out.dtype)
        strategy.loss += self.alpha * F.mse_loss(out, logits)
        if self.beta > 0:
            y = replayed[1]["y"].to(strategy.device)
            strategy.loss += self.beta * F.cross_entropy(_wide(outputs[1]), y)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.admission == "stream":
            self.memory.admit(strategy, logits=strategy.mb_output.detach())

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.admission == "experience_end":
            self.memory.admit_experience(strategy, self.logits_for)

    def logits_for(self, strategy: Any, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        # experience_end: the trained model's logits, as Avalanche's DER stores them
        return avalanche_forward(strategy.model, x.to(strategy.device), task.to(strategy.device))


def fusable(model: nn.Module) -> bool:
    """Whether rows of one forward of ``model`` are computed independently of each other
    (no layer with batch statistics), so buffer rows can share the training forward."""
    return not any(isinstance(m, _NormBase) for m in model.modules())


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if autocast made it half precision (the loss is taken in it)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
