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


def _exports() -> dict[str, str]:
    """Plugin class name -> its module, from the registry (the one place a strategy is
    declared). Imported here on use: the registry imports this package."""
    from engram.strategies.registry import PLUGINS

    pairs = (entry.plugin.partition(":") for entry in PLUGINS.values())
    return {name: module for module, _, name in pairs if module.startswith("engram.strategies.")}


def __getattr__(name: str) -> Any:
    if name == "__all__":
        return sorted(_exports())
    if name.endswith("Plugin"):  # not a submodule: those the import system finds itself
        exports = _exports()
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
    raise AttributeError(f"module 'engram.strategies' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_exports()})
