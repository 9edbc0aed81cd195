"""A strategy section's registry entry (:data:`engram.strategies.registry.PLUGINS`): light,
so that the registry and the Avalanche sections both declare theirs with it."""

from __future__ import annotations

from dataclasses import dataclass


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
