"""The template's plugins as named state, by allowlist: each one is kept, or known to hold
nothing across a restart, or refused by name when the template is built.

A plugin is

* **kept** when it is :class:`~engram.stateful.Stateful` (engram's strategies, a user's
  plugin with ``state_dict``/``load_state_dict``, ``PersistentFields``), an
  ``LRSchedulerPlugin`` (its scheduler's state), or an Avalanche plugin with a state
  adapter (:mod:`engram.strategies.avalanche_state`);
* **left alone** when it is an Avalanche plugin known to hold no memory
  (:data:`~engram.strategies.avalanche_state.STATELESS`), or a plugin of the user's whose
  instance holds no attributes beyond the ones it declares transient
  (``engram_transient = ("bar", ...)``: settings, handles, per-step scratch a restart may
  lose) — checked again before every commit, since hooks may set attributes later;
* **refused** otherwise, naming the plugin and the attributes that would be lost: an
  Avalanche plugin with memory and no adapter, an Avalanche plugin engram does not know,
  a user's plugin with undeclared instance attributes, and a user's subclass of an
  adapted Avalanche plugin that defines its own ``__init__`` without declaring what it
  adds (the adapter persists the base's memory, not the subclass's).

The old rule was a denylist (anything not recognised was taken as stateless), so a
stateful plugin engram had never seen resumed without its state, silently.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from avalanche.training.plugins import LRSchedulerPlugin

from engram.errors import EngramError
from engram.stateful import Stateful
from engram.strategies import avalanche_state
from engram.training.state import SchedulerState

# what engram adds to an Avalanche plugin instance (its adapter, cached)
_ENGRAM_ATTRIBUTES = frozenset({"_engram_adapter"})


class UnkeptStateError(EngramError):
    """A plugin holds state the store would not keep (see :mod:`engram.training.app_state`)."""


def named_plugins(plugins: Iterable[Any], strategy: Any) -> dict[str, Any]:
    """The plugins' named state objects, ``{key: Stateful}``, in order (a repeated key
    gets a number: ``replay2``); raises :class:`UnkeptStateError` for a plugin that holds
    state nothing keeps (see the module)."""
    return classify(plugins, strategy)[0]


def classify(plugins: Iterable[Any], strategy: Any) -> tuple[dict[str, Any], list[Any]]:
    """:func:`named_plugins`, and the user's plugins taken as holding nothing (to check
    again before each commit: a hook may give one an attribute later)."""
    found: dict[str, Any] = {}
    transient: list[Any] = []
    for plugin in plugins:
        if isinstance(plugin, LRSchedulerPlugin):
            key, plugin = "lr_scheduler", SchedulerState(plugin)
        elif isinstance(plugin, Stateful):
            key = getattr(plugin, "engram_name", type(plugin).__name__.lower())
        elif (adapter := avalanche_state.adapter_for(plugin, strategy)) is not None:
            _refuse_unkept_subclass_fields(plugin)
            key, plugin = adapter.engram_name, adapter  # Avalanche's own, made durable
        elif avalanche_state.is_avalanche(plugin):
            avalanche_state.check_stateless(plugin)
            _refuse_unkept_subclass_fields(plugin)
            continue
        else:
            check_transient(plugin)
            transient.append(plugin)
            continue
        base, n = key, 1
        while key in found:
            n += 1
            key = f"{base}{n}"
        found[key] = plugin
    return found, transient


class PluginStates:
    """A learner's plugins as one Stateful part of its app state (``plugins/<key>``).

    ``plugins()`` returns the plugin list (it may change between calls: the kept and
    transient ones are classified again when it does); loaded floating-point tensors go
    onto ``device`` (Fisher, anchors, a teacher), integer ones (RNG states, sample ids,
    counters) stay where they are.
    """

    def __init__(self, plugins: Any, strategy: Any, device: Any) -> None:
        self._plugins, self._strategy, self.device = plugins, strategy, device
        self._ids: tuple[int, ...] | None = None
        self.named()  # refuses a plugin whose state nothing keeps, now

    def named(self) -> dict[str, Any]:
        """``{key: Stateful}`` of the kept plugins, classified once per plugin list."""
        plugins = tuple(self._plugins())
        ids = tuple(map(id, plugins))
        if ids != self._ids:
            self._named, self._transient = classify(plugins, self._strategy)
            self._ids = ids
        return self._named

    def state_dict(self) -> dict[str, Any]:
        named = self.named()
        for plugin in self._transient:  # may have been given state by a hook since
            check_transient(plugin)
        return {key: p.state_dict() for key, p in named.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, plugin in self.named().items():
            if key in state:
                plugin.load_state_dict(_to_device(state[key], self.device))

    def repartition(self, states: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
        """The stored ranks' plugin states as ``size`` ranks': a plugin with a
        ``repartition`` (replay buffers) deals its shards anew; the others take rank 0's."""
        named = self.named()
        out: list[dict[str, Any]] = [{} for _ in range(size)]
        for key in states[0]:
            each = [s.get(key, {}) for s in states]
            split = getattr(named.get(key), "repartition", None)
            shards = split(each, size) if split is not None else [each[0]] * size
            for r in range(size):
                out[r][key] = shards[r]
        return out


def _to_device(state: Any, device: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.to(device) if state.is_floating_point() else state
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_device(v, device) for v in state)
    return state


def check_transient(plugin: Any) -> None:
    """Raise :class:`UnkeptStateError` if a user's plugin (neither Stateful nor Avalanche's)
    holds instance attributes it has not declared transient."""
    undeclared = _undeclared(plugin)
    if undeclared:
        name = type(plugin).__name__
        shown = ", ".join(undeclared[:8]) + (", ..." if len(undeclared) > 8 else "")
        raise UnkeptStateError(
            f"plugin {name} holds state engram would not keep ({shown}): a resumed run would "
            f"lose it. Make it Stateful (state_dict/load_state_dict, or engram.stateful."
            f"PersistentFields naming them), or, if they are settings or scratch a restart may "
            f"lose, declare them: class {name}(...): engram_transient = {tuple(undeclared)!r}"
        )


def _undeclared(plugin: Any) -> list[str]:
    declared = set(getattr(plugin, "engram_transient", ()))
    return sorted(k for k in vars(plugin) if k not in declared and k not in _ENGRAM_ATTRIBUTES)


def _refuse_unkept_subclass_fields(plugin: Any) -> None:
    """A user's subclass of an adapted Avalanche plugin: its adapter keeps the base's
    memory; an ``__init__`` of the subclass's own may add more, which must be declared."""
    for cls in type(plugin).__mro__:
        if cls.__module__.startswith("avalanche."):
            return
        if "__init__" in vars(cls) and not hasattr(plugin, "engram_transient"):
            raise UnkeptStateError(
                f"plugin {type(plugin).__name__} extends Avalanche's "
                f"{avalanche_state.avalanche_base(plugin)} with an __init__ of its own: engram "
                "keeps the base's memory, not what the subclass adds. Declare the attributes "
                "it adds that a restart may lose (engram_transient = (...)), or make it Stateful"
            )
