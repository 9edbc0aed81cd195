"""The Stateful contract: how any component hands its memory to the store.

A component with memory implements two methods; the durable template gathers them
into one mapping per commit and hands each its part back on restore::

    class Stateful(Protocol):
        def state_dict(self) -> dict[str, Any]: ...      # tensors + JSON scalars only
        def load_state_dict(self, state: dict[str, Any]) -> None: ...

Nothing is pickled: a state may hold tensors, numpy arrays, and dicts, lists, tuples
of them and of str/int/float/bool/None (see :mod:`engram.store.codec`).

For the common case — a plugin whose memory is a few attributes — derive from
:class:`PersistentFields` and name them::

    class MyPlugin(PersistentFields, SupervisedPlugin):
        persistent_fields = ("importance", "anchors", "seen")

A plugin whose attributes are settings or scratch a restart may lose says so, or the
template refuses it (an allowlist: :mod:`engram.training.app_state`)::

    class Logger(SupervisedPlugin):
        engram_transient = ("writer",)
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch


@runtime_checkable
class Stateful(Protocol):
    """Anything whose memory can be committed to and restored from a store."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class DurablePlugin(Stateful, Protocol):
    """An engram strategy plugin: Stateful, named in the committed state, and with the
    hyperparameters a resumed run must share (checked by the template's lineage check).

    ``engram_name`` keys the plugin's part of the state (``plugins/<engram_name>``);
    ``hparams()`` returns JSON scalars only.
    """

    engram_name: str

    def hparams(self) -> dict[str, Any]: ...


class PersistentFields:
    """Implements :class:`Stateful` for the attributes named in ``persistent_fields``.

    ``state_dict`` returns detached copies of those attributes (tensors, nested
    dicts/lists of tensors, numbers, strings, None); ``load_state_dict`` sets them
    back. A field a store lacks (a state written by an older version of the
    plugin) keeps its current value.
    """

    persistent_fields: ClassVar[tuple[str, ...]] = ()

    def state_dict(self) -> dict[str, Any]:
        return {name: _detached(getattr(self, name)) for name in self.persistent_fields}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.persistent_fields:
            if name in state:
                setattr(self, name, state[name])


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_detached(v) for v in value)
    return copy.copy(value)
