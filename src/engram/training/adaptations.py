"""The model's adaptations: the modules a run grew, recorded and grown again on restore.

Avalanche's dynamic modules (multi-head, incremental classifiers) grow when the model
adapts to an experience. The template records each adaptation it performed —
``[stream name, experience index, training]`` — as the app state's ``adaptations``
part; a restore performs the same adaptations, in order, so the grown modules exist
before the checkpoint's weights load, then checks that the shapes match.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from avalanche.models.utils import avalanche_model_adaptation
from torch import nn

from engram.errors import ArchitectureMismatchError, EngramError


class Adaptations:
    """The adaptations a run performed (Stateful: its state is the list itself)."""

    def __init__(self) -> None:
        self.performed: list[list[Any]] = []
        self.replaying = False  # adaptations done by a restore are not recorded again

    def record(self, experience: Any, training: bool) -> None:
        entry = [experience.origin_stream.name, experience.current_experience, training]
        if not self.replaying and entry not in self.performed:
            self.performed.append(entry)

    def state_dict(self) -> list[list[Any]]:  # type: ignore[override]
        return self.performed

    def load_state_dict(self, state: list[list[Any]]) -> None:  # type: ignore[override]
        self.performed = [list(a) for a in state]

    def replay(self, model: nn.Module, recorded: list, experiences: Sequence[Any]) -> None:
        """Perform ``recorded`` on ``model`` with the run's ``experiences`` (train and
        test streams), in order."""
        by_key = {(exp.origin_stream.name, exp.current_experience): exp for exp in experiences}
        was_training = model.training
        self.replaying = True
        try:
            for stream, index, training in recorded:
                exp = by_key.get((stream, index))
                if exp is None:
                    raise EngramError(
                        f"the store's model was adapted to experience {index} of stream "
                        f"{stream!r}, which this run was not given; pass the same streams"
                    )
                model.train(training)
                avalanche_model_adaptation(model, exp)
        finally:
            self.replaying = False
            model.train(was_training)


def check_architecture(
    model: nn.Module, weights: Mapping[str, torch.Tensor], where: str, head: str
) -> None:
    """Raise :class:`ArchitectureMismatchError` listing how ``model``'s parameters differ
    from the checkpoint's ``weights`` (``where``, ``head``: the store and version)."""
    current = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in weights.items()}
    problems = [f"missing in the model: {k}" for k in sorted(stored.keys() - current.keys())]
    problems += [f"not in the store: {k}" for k in sorted(current.keys() - stored.keys())]
    problems += [
        f"{k}: model {current[k]} vs store {stored[k]}"
        for k in sorted(current.keys() & stored.keys())
        if current[k] != stored[k]
    ]
    if problems:
        raise ArchitectureMismatchError(
            f"the model does not match the checkpoint in {where} ({head}): "
            + "; ".join(problems[:20])
            + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
            + ". Use the architecture that produced the store, or a new store."
        )
