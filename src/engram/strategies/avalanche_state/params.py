"""What the Avalanche adapters (:mod:`engram.strategies.avalanche_state`) share: plugin
parameters and kept models to and from state."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from engram.errors import EngramError

# ------------------------------------------------- ParamData and kept models


def params_out(params: dict[str, Any]) -> dict[str, Any]:
    """A ``{name: ParamData}`` dict as ``{name: {"name", "data"}}``."""
    return {k: {"name": pd.name, "data": pd.data.detach().clone()} for k, pd in params.items()}


def params_in(state: dict[str, Any], cpu: bool = False) -> dict[str, Any]:
    from avalanche.training.utils import ParamData

    out = {}
    for k, item in state.items():
        data = item["data"].cpu() if cpu else item["data"]
        out[k] = ParamData(item["name"], init_tensor=data, device=data.device)
    return out


def maybe_params_out(params: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if params is None else params_out(params)


def maybe_params_in(state: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if state is None else params_in(state)


def module_out(module: nn.Module | None) -> dict[str, Any] | None:
    """A model a plugin keeps: its weights, each submodule's train/eval mode and the
    parameters it froze."""
    if module is None:
        return None
    return {
        "weights": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "training": {name: m.training for name, m in module.named_modules()},
        "frozen": [name for name, p in module.named_parameters() if not p.requires_grad],
    }


def module_in(state: dict[str, Any] | None, current: nn.Module) -> nn.Module | None:
    """A kept model rebuilt as a deep copy of ``current`` with the stored weights.

    Modules the current model gained since (a new head) keep the copy's weights.
    """
    if state is None:
        return None
    module = copy.deepcopy(current)
    result = module.load_state_dict(state["weights"], strict=False)  # raises on shapes
    if result.unexpected_keys:
        raise EngramError(
            "a model kept by an Avalanche plugin has weights the current model lacks ("
            + ", ".join(result.unexpected_keys[:5])
            + "); use the architecture that produced the store"
        )
    for name, m in module.named_modules():
        if name in state["training"]:
            m.training = bool(state["training"][name])
    frozen = set(state["frozen"])
    for name, p in module.named_parameters():
        p.requires_grad_(name not in frozen)
    return module


def detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    return value


def jsonable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
