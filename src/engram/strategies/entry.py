"""A strategy section's registry entry (:data:`engram.strategies.registry.PLUGINS`): light,
so that the registry and the Avalanche sections both declare theirs with it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar


@dataclass(frozen=True)
class Entry:
    """A strategy section of the config: the plugin that implements it, its schema."""

    plugin: str  # "module:Class", imported on use
    config: type
    wires: tuple[str, ...] = ()  # constructor arguments the run supplies (model, input_size)
    build: str | None = None  # "module:function"(kwargs) -> plugin, when not Class(**kwargs)

    @property
    def avalanche(self) -> bool:
        """Whether the plugin is Avalanche's own (made durable by an adapter)."""
        return self.plugin.startswith("avalanche.")


class DeclaredHparams:
    """``hparams()`` derived from the plugin's registry entry: each field of its config
    dataclass (read from the plugin's attribute of that name), then ``hparams_also``
    (settings the run passes that are not the section's, e.g. the seed). A plugin's
    hyperparameters are then written once, in its config dataclass."""

    engram_name: ClassVar[str]
    hparams_also: ClassVar[tuple[str, ...]] = ()

    def hparams(self) -> dict[str, Any]:
        from engram.strategies.registry import PLUGINS  # the registry imports this module

        names = [f.name for f in fields(PLUGINS[self.engram_name].config)]
        return {name: getattr(self, name) for name in (*names, *self.hparams_also)}
