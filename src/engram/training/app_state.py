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
    found: dict[str, Any] = {}
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
            continue
        base, n = key, 1
        while key in found:
            n += 1
            key = f"{base}{n}"
        found[key] = plugin
    return found


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


def unkept_now(plugins: Iterable[Any]) -> None:
    """Before a commit: the user's plugins taken as holding nothing still hold nothing
    undeclared (a hook may have set an attribute since the template was built)."""
    for plugin in plugins:
        if not isinstance(
            plugin, LRSchedulerPlugin | Stateful
        ) and not avalanche_state.is_avalanche(plugin):
            check_transient(plugin)
