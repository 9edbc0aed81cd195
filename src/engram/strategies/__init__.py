"""Continual-learning strategies as Avalanche plugins with persistent state.

Each plugin implements :class:`engram.stateful.DurablePlugin` (``Stateful`` plus
``engram_name`` and ``hparams()``); the :class:`~engram.training.template.DurableTemplate`
commits and restores them. :mod:`engram.strategies.registry` lists them with their
hyperparameters. Plugins are imported on first use (Avalanche takes seconds to import;
the registry and the runner's config do not need it).
"""

from __future__ import annotations

import importlib
from typing import Any

_PLUGINS = {
    "AGEMPlugin": "agem",
    "DERPlugin": "der",
    "ERACEPlugin": "er_ace",
    "ERPlugin": "replay",
    "EWCPlugin": "ewc",
    "LwFPlugin": "lwf",
    "MASPlugin": "mas",
    "SIPlugin": "si",
}

__all__ = sorted(_PLUGINS)


def __getattr__(name: str) -> Any:
    if name in _PLUGINS:
        return getattr(importlib.import_module(f"engram.strategies.{_PLUGINS[name]}"), name)
    raise AttributeError(f"module 'engram.strategies' has no attribute {name!r}")
