"""The run's state beside the model and the plugins, as named :class:`Stateful` parts.

The template commits ``{"optimizer", "plugins", "rng", "clock", "cursor",
"adaptations", "metrics"}``; the parts here are the ones that are the template's own:
each has ``state_dict``/``load_state_dict`` so the template only composes them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

CLOCK_FIELDS = (
    "train_iterations",
    "train_exp_counter",
    "train_exp_epochs",
    "train_exp_iterations",
    "train_epoch_iterations",
    "total_iterations",
)


@dataclass
class Cursor:
    """Where training stands: the next minibatch to train on."""

    experience: int = 0  # index in the train stream of the experience in progress (or next)
    epoch: int = 0
    iteration: int = 0  # minibatches of `epoch` already trained

    @property
    def mid_experience(self) -> bool:
        return self.epoch > 0 or self.iteration > 0

    def state_dict(self) -> dict[str, int]:
        return {"experience": self.experience, "epoch": self.epoch, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.experience, self.epoch = state["experience"], state["epoch"]
        self.iteration = state["iteration"]


class RngStreams:
    """The process-wide RNG streams: torch's, numpy's and Python's, and with ``cuda`` each
    visible CUDA device's (dropout on the GPU draws from those)."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda

    def state_dict(self) -> dict[str, Any]:
        state = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        if self.cuda:
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Another device or device count: the streams cannot be restored; the resume warns
        # about it (execution settings "device" and "device_count", ExecutionChangedWarning;
        # a store from before "device_count" was recorded cannot tell, and does not warn).
        if self.cuda and len(state.get("cuda") or []) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        version, internal, gauss = state["python"]  # JSON gave lists back, not tuples
        random.setstate((version, tuple(internal), gauss))


class ClockState:
    """Avalanche's clock (iteration and experience counters its plugins read)."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock

    def state_dict(self) -> dict[str, int]:
        return {f: getattr(self.clock, f) for f in CLOCK_FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in CLOCK_FIELDS:
            setattr(self.clock, f, state[f])


class SchedulerState:
    """An Avalanche ``LRSchedulerPlugin`` seen as Stateful: its scheduler's state."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin

    def state_dict(self) -> dict[str, Any]:
        return self.plugin.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plugin.scheduler.load_state_dict(state)


class OptimizerState:
    """An optimizer as Stateful, with the settings a branch changed (``branched()``:
    e.g. a new lr) applied over the stored state, which would bring the old ones back."""

    def __init__(self, optimizer: Any, branched: Any) -> None:
        self.optimizer, self.branched = optimizer, branched

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
        changed = self.branched()
        for group in self.optimizer.param_groups:
            group.update({k: v for k, v in changed.items() if k in group})


class Attributes:
    """Some attributes of an object as one Stateful part: ``names`` maps each state key
    to ``(attribute, load)``, ``load`` turning the stored value back into the attribute's
    (JSON gives lists back; a missing key takes ``load(None)``)."""

    def __init__(self, owner: Any, names: dict[str, tuple[str, Any]]) -> None:
        self.owner, self.names = owner, names

    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self.owner, attr) for key, (attr, _) in self.names.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, (attr, load) in self.names.items():
            setattr(self.owner, attr, load(state.get(key)))


def rows(value: Any) -> list[list[float]]:
    """A stored accuracy matrix as a list of lists."""
    return [list(row) for row in value or []]


def optional_list(value: Any) -> list | None:
    return list(value) if value is not None else None


def count(value: Any) -> int:
    return int(value or 0)


class CursorOf:
    """The cursor of a learner that replaces its :class:`Cursor` as it goes."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def state_dict(self) -> dict[str, int]:
        return self.owner.cursor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.owner.cursor.load_state_dict(state)
