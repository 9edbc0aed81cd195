"""Synaptic Intelligence (Zenke et al. 2017) with its path integral persisted mid-experience."""

from __future__ import annotations

from typing import Any

from avalanche.core import SupervisedPlugin

from engram.memory.importance import SynapticIntelligence
from engram.strategies.registry import default


class SIPlugin(SupervisedPlugin):
    engram_name = "si"

    def __init__(
        self, si_lambda: float = default("si", "si_lambda"), eps: float = default("si", "eps")
    ) -> None:
        super().__init__()
        self.si_lambda = si_lambda
        self.si = SynapticIntelligence(xi=eps)

    def hparams(self) -> dict[str, Any]:
        return {"si_lambda": self.si_lambda, "eps": self.si.xi}

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.si.begin(strategy.model)  # also covers parameters of newly grown heads

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        strategy.loss += self.si_lambda * self.si.penalty(strategy.model)

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        self.si.before_step(strategy.model)

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        self.si.after_step(strategy.model)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.si.consolidate(strategy.model)

    def state_dict(self) -> dict[str, Any]:
        return self.si.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.si.load_state_dict(state)
