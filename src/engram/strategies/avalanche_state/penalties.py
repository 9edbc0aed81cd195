"""State adapters of Avalanche's regularization plugins (EWC, SI, MAS, RWalk): their
anchors, importances and scores as :class:`~avalanche.training.utils.ParamData` dicts."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from engram.strategies.avalanche_state.base import AvalancheAdapter
from engram.strategies.avalanche_state.params import (
    maybe_params_in,
    maybe_params_out,
    params_in,
    params_out,
)

# ------------------------------------------------------------- regularization


class EWCAdapter(AvalancheAdapter):
    """``EWCPlugin``: ``saved_params`` and ``importances``, per experience (both modes)."""

    engram_name = "avalanche_ewc"
    hparam_names = ("ewc_lambda", "mode", "decay_factor", "keep_importance_data")

    def state_dict(self) -> dict[str, Any]:
        p = self.plugin
        return {
            "saved_params": {t: params_out(d) for t, d in p.saved_params.items()},
            "importances": {t: params_out(d) for t, d in p.importances.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.plugin
        p.saved_params = defaultdict(
            dict, {t: params_in(d) for t, d in state["saved_params"].items()}
        )
        p.importances = defaultdict(
            dict, {t: params_in(d) for t, d in state["importances"].items()}
        )


class SIAdapter(AvalancheAdapter):
    """``SynapticIntelligencePlugin``: ``ewc_data`` (anchors, importance) and ``syn_data``
    (old/new theta, gradient, trajectory, cumulative trajectory); kept on the CPU, as
    the plugin keeps them."""

    engram_name = "avalanche_si"
    hparam_names = ("si_lambda", "eps")

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "excluded_parameters": sorted(self.plugin.excluded_parameters)}

    def state_dict(self) -> dict[str, Any]:
        p = self.plugin
        return {
            "ewc_data": [params_out(d) for d in p.ewc_data],
            "syn_data": {k: params_out(d) for k, d in p.syn_data.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.plugin
        p.ewc_data = tuple(params_in(d, cpu=True) for d in state["ewc_data"])
        p.syn_data = {k: params_in(d, cpu=True) for k, d in state["syn_data"].items()}


class MASAdapter(AvalancheAdapter):
    """``MASPlugin``: the anchors ``params`` and the ``importance``."""

    engram_name = "avalanche_mas"

    def hparams(self) -> dict[str, Any]:
        return {"lambda_reg": self.plugin._lambda, "alpha": self.plugin.alpha}

    def state_dict(self) -> dict[str, Any]:
        p = self.plugin
        return {
            "params": maybe_params_out(p.params),
            "importance": maybe_params_out(p.importance),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plugin.params = maybe_params_in(state["params"])
        self.plugin.importance = maybe_params_in(state["importance"])


class RWalkAdapter(AvalancheAdapter):
    """``RWalkPlugin``: the checkpoint, iteration and experience tensors (scores,
    importances, anchors, penalties)."""

    engram_name = "avalanche_rwalk"
    hparam_names = ("ewc_lambda", "ewc_alpha", "delta_t")
    fields = (
        "checkpoint_params", "checkpoint_loss", "checkpoint_scores", "iter_grad",
        "iter_importance", "iter_params", "exp_scores", "exp_params", "exp_importance",
        "exp_penalties",
    )  # fmt: skip

    def __init__(self, plugin: Any, strategy: Any) -> None:
        super().__init__(plugin, strategy)
        if not plugin.__dict__.get("_engram_zero_score_guard"):
            original = plugin.after_training_exp

            def after_training_exp(strategy: Any, *args: Any, **kwargs: Any) -> None:
                original(strategy, *args, **kwargs)
                _without_nan_scores(plugin)

            plugin.after_training_exp = after_training_exp
            plugin.__dict__["_engram_zero_score_guard"] = True

    def state_dict(self) -> dict[str, Any]:
        return {f: maybe_params_out(getattr(self.plugin, f)) for f in self.fields}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in self.fields:
            setattr(self.plugin, f, maybe_params_in(state[f]))


def _without_nan_scores(plugin: Any) -> None:
    """Avalanche's RWalk (0.6) normalises the scores by their maximum: 0/0 when no score
    was taken — an experience of fewer than ``delta_t`` iterations, such as one epoch of
    split digits — so every penalty is NaN and the next experience's loss too. A zero
    maximum means no score: the penalty is the normalised importance alone."""
    from avalanche.training.utils import ParamData

    if max(s.data.max() for s in plugin.exp_scores.values()) > 0:
        return
    top = max(i.data.max() for i in plugin.exp_importance.values())
    plugin.exp_penalties = {
        k: ParamData(k, device=plugin.exp_importance[k].device,
                     init_tensor=plugin.exp_importance[k].data / top)
        for k in plugin.exp_penalties
    }  # fmt: skip
