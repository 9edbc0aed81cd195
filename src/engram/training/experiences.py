"""The experience loop that both learners run (:class:`~engram.training.template.
DurableTemplate` for torch models, :class:`~engram.sklearn.learner.SklearnLearner`).

Each experience not yet trained (``learner.cursor.experience`` says how far the store
got) is trained, evaluated on the test stream, and finished — committed, the gate
decided — before the next; a gate's rejection stops the loop with
:class:`~engram.errors.GateFailed` after ``on_experience`` saw the row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from engram.errors import GateFailed


class Learner(Protocol):
    """What the loop asks of a learner."""

    cursor: Any  # engram.training.state.Cursor
    accuracy_matrix: list[list[float]]

    def train_experience(self, index: int, experience: Any) -> None: ...
    def evaluate(self, test_stream: Sequence[Any]) -> list[float]: ...
    def finish_experience(self, index: int) -> str | None: ...  # the gate's rejection


def train_experiences(
    learner: Learner,
    train_list: Sequence[Any],
    test_list: Sequence[Any],
    max_experiences: int | None = None,
    on_experience: Callable[[int, list[float]], None] | None = None,
) -> list[list[float]]:
    """Train, evaluate and finish every experience not yet trained (at most
    ``max_experiences`` of them); returns the accuracy matrix."""
    trained = 0
    for index, experience in enumerate(train_list):
        if index < learner.cursor.experience:
            continue
        if max_experiences is not None and trained >= max_experiences:
            break
        learner.train_experience(index, experience)
        learner.accuracy_matrix.append(learner.evaluate(test_list))
        rejected = learner.finish_experience(index)
        trained += 1
        if on_experience is not None:
            on_experience(index, learner.accuracy_matrix[-1])
        if rejected is not None:
            raise GateFailed(rejected)
    return learner.accuracy_matrix
