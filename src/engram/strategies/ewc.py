"""Elastic Weight Consolidation (Kirkpatrick et al. 2017), separate or online, persistent.

Separate mode keeps one (Fisher, anchor) pair per experience and penalizes
``lambda/2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2``; online mode keeps one
running Fisher, ``F <- decay * F + F_new``, anchored at the latest parameters
(Schwarz et al. 2018). The Fisher is estimated per sample with ``torch.func``
(:func:`engram.memory.importance.fisher_diagonal`), not from minibatch gradients as
Avalanche's EWCPlugin does.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from avalanche.core import SupervisedPlugin

from engram.memory.importance import FisherEstimator, fisher_diagonal, quadratic_penalty
from engram.strategies._common import detached_params, experience_batches
from engram.strategies.entry import DeclaredHparams
from engram.strategies.registry import default


class EWCPlugin(DeclaredHparams, SupervisedPlugin):
    """EWC whose Fisher matrices, anchors and label-sampling RNG persist in the store."""

    engram_name = "ewc"
    hparams_also = ("seed",)  # besides the section's fields (registry)

    def __init__(
        self,
        ewc_lambda: float = default("ewc", "ewc_lambda"),
        mode: Literal["separate", "online"] = default("ewc", "mode"),
        decay_factor: float | None = default("ewc", "decay_factor"),
        estimator: FisherEstimator = default("ewc", "estimator"),
        fisher_mb_size: int = default("ewc", "fisher_mb_size"),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if mode not in ("separate", "online"):
            raise ValueError(f"mode must be 'separate' or 'online', not {mode!r}")
        if mode == "online" and decay_factor is None:
            raise ValueError("online EWC needs a decay_factor (e.g. 0.9)")
        self.ewc_lambda = ewc_lambda
        self.mode = mode
        self.decay_factor = decay_factor
        self.estimator = estimator
        self.fisher_mb_size = fisher_mb_size
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # labels of the "true" Fisher
        # separate: experience id -> {"fisher": {...}, "anchors": {...}}; online: one entry "0"
        self.importances: dict[str, dict[str, dict[str, torch.Tensor]]] = {}

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        total = torch.zeros(())
        for entry in self.importances.values():
            total = total + quadratic_penalty(model, entry["anchors"], entry["fisher"])
        return 0.5 * self.ewc_lambda * total

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.importances:
            strategy.loss += self.penalty(strategy.model)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        fisher = fisher_diagonal(
            strategy.model,
            experience_batches(strategy, self.fisher_mb_size),
            estimator=self.estimator,
            generator=self.generator,
        )
        anchors = detached_params(strategy.model)
        if self.mode == "separate":
            key = str(strategy.clock.train_exp_counter)
            self.importances[key] = {"fisher": fisher, "anchors": anchors}
            return
        old = self.importances.get("0", {}).get("fisher", {})
        merged = {
            k: self.decay_factor * old[k] + f if k in old and old[k].shape == f.shape else f
            for k, f in fisher.items()
        }
        self.importances["0"] = {"fisher": merged, "anchors": anchors}

    def state_dict(self) -> dict[str, Any]:
        return {
            "importances": self.importances,
            "generator": self.generator.get_state(),
            "hparams": self.hparams(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importances = state["importances"]
        self.generator.set_state(state["generator"])
