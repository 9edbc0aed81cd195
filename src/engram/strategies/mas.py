"""Memory Aware Synapses (Aljundi et al. 2018) with persistent importance and anchors.

Importance is the per-sample mean of |d ||f(x)||^2 / d theta| over the experience's
data (:func:`engram.memory.importance.mas_importance`), merged across experiences
as ``alpha * old + (1 - alpha) * new`` (Avalanche's convention).
"""

from __future__ import annotations

from typing import Any

import torch
from avalanche.core import SupervisedPlugin

from engram.memory.importance import mas_importance, quadratic_penalty
from engram.stateful import PersistentFields
from engram.strategies._common import detached_params, experience_batches
from engram.strategies.entry import DeclaredHparams
from engram.strategies.registry import default


class MASPlugin(DeclaredHparams, PersistentFields, SupervisedPlugin):
    engram_name = "mas"
    persistent_fields = ("importance", "anchors")

    def __init__(
        self,
        lambda_reg: float = default("mas", "lambda_reg"),
        alpha: float = default("mas", "alpha"),
        batch_size: int = default("mas", "batch_size"),
    ) -> None:
        super().__init__()
        self.lambda_reg = lambda_reg
        self.alpha = alpha
        self.batch_size = batch_size
        self.importance: dict[str, torch.Tensor] = {}
        self.anchors: dict[str, torch.Tensor] = {}

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.importance:
            penalty = quadratic_penalty(strategy.model, self.anchors, self.importance)
            strategy.loss += self.lambda_reg * penalty

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        new = mas_importance(strategy.model, experience_batches(strategy, self.batch_size))
        self.importance = {
            k: self.alpha * self.importance[k] + (1 - self.alpha) * v
            if k in self.importance and self.importance[k].shape == v.shape
            else v
            for k, v in new.items()
        }
        self.anchors = detached_params(strategy.model)
