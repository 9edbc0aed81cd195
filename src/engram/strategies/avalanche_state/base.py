"""The base of every Avalanche state adapter (:mod:`engram.strategies.avalanche_state`)."""

from __future__ import annotations

from typing import Any, ClassVar

from engram.strategies.avalanche_state.params import jsonable


class AvalancheAdapter:
    """Persists an Avalanche plugin's memory (subclasses name the attributes)."""

    engram_name: ClassVar[str]
    hparam_names: ClassVar[tuple[str, ...]] = ()  # the plugin's settings checked on resume

    def __init__(self, plugin: Any, strategy: Any) -> None:
        self.plugin = plugin
        self.strategy = strategy

    def hparams(self) -> dict[str, Any]:
        return {name: jsonable(getattr(self.plugin, name)) for name in self.hparam_names}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError
