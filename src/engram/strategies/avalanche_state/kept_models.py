"""State adapters of Avalanche's plugins that keep a model or its weights: LwF and LFL
(the previous model), CWR* (the consolidated class weights), FromScratch (the initial
weights)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from engram.errors import EngramError
from engram.strategies.avalanche_state.base import AvalancheAdapter
from engram.strategies.avalanche_state.params import detached, jsonable, module_in, module_out


class LwFAdapter(AvalancheAdapter):
    """``LwFPlugin``: the previous model (weights), ``expcount`` and
    ``prev_classes_by_task``."""

    engram_name = "avalanche_lwf"

    def hparams(self) -> dict[str, Any]:
        lwf = self.plugin.lwf
        return {"alpha": jsonable(lwf.alpha), "temperature": jsonable(lwf.temperature)}

    def state_dict(self) -> dict[str, Any]:
        lwf = self.plugin.lwf
        return {
            "prev_model": module_out(lwf.prev_model),
            "expcount": lwf.expcount,
            # in the sets' own order: the distillation indexes the logits with it
            "prev_classes_by_task": {t: list(c) for t, c in lwf.prev_classes_by_task.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lwf = self.plugin.lwf
        lwf.prev_model = module_in(state["prev_model"], self.strategy.model)
        lwf.expcount = state["expcount"]
        lwf.prev_classes_by_task = defaultdict(
            set, {t: set(c) for t, c in state["prev_classes_by_task"].items()}
        )


class LFLAdapter(AvalancheAdapter):
    """``LFLPlugin``: the previous (frozen) model; its after-experience hook also froze
    the current model's last linear layer, which loading does again."""

    engram_name = "avalanche_lfl"
    hparam_names = ("lambda_e",)

    def __init__(self, plugin: Any, strategy: Any) -> None:
        super().__init__(plugin, strategy)
        from avalanche.models import BaseModel

        model = strategy.model
        if isinstance(model, BaseModel):
            return
        if not callable(getattr(model, "get_features", None)):
            raise EngramError(
                f"Avalanche's LFLPlugin compares features: the model ({type(model).__name__}) "
                "needs a get_features(x) method (engram's mlp and cnn have one)"
            )
        # LFL asks isinstance(model, BaseModel) only to know get_features exists
        BaseModel.register(type(model))

    def state_dict(self) -> dict[str, Any]:
        return {"prev_model": module_out(self.plugin.prev_model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from avalanche.training.utils import get_last_fc_layer

        self.plugin.prev_model = module_in(state["prev_model"], self.strategy.model)
        if self.plugin.prev_model is not None:
            for param in get_last_fc_layer(self.strategy.model)[1].parameters():
                param.requires_grad = False


class CWRStarAdapter(AvalancheAdapter):
    """``CWRStarPlugin``: the consolidated class weights and counts it keeps on the
    model (``saved_weights``, ``past_j``, ``cur_j``) and ``cur_class``."""

    engram_name = "avalanche_cwr_star"
    hparam_names = ("cwr_layer_name", "freeze_remaining_model")

    def state_dict(self) -> dict[str, Any]:
        model = self.plugin.model
        return {
            "saved_weights": {c: np.array(w) for c, w in model.saved_weights.items()},
            "past_j": dict(model.past_j),
            "cur_j": dict(model.cur_j),
            "cur_class": list(self.plugin.cur_class),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        model = self.plugin.model
        model.saved_weights = {c: np.array(w) for c, w in state["saved_weights"].items()}
        model.past_j = defaultdict(int, state["past_j"])
        model.cur_j = defaultdict(int, state["cur_j"])
        self.plugin.cur_class = list(state["cur_class"])


class FromScratchAdapter(AvalancheAdapter):
    """``FromScratchTrainingPlugin``: the initial weights each experience starts from."""

    engram_name = "avalanche_from_scratch"
    hparam_names = ("reset_optimizer",)

    def state_dict(self) -> dict[str, Any]:
        weights = self.plugin.initial_weights
        return {"initial_weights": None if weights is None else detached(dict(weights))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["initial_weights"]
        self.plugin.initial_weights = None if weights is None else dict(weights)
