"""What an ``engram-train`` job returns to Hydra's sweeper: ``run.objective``.

Sweepers that optimise (Optuna, Nevergrad, Ax) read the task function's return value;
``run.objective`` names the metric (or a list of them, for a multi-objective study)
computed from the run's accuracy matrix. A job whose stream was already trained returns
the stored matrix's value without training, so re-running a study costs nothing for the
trials it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from engram.metrics.forgetting import Matrix, average_accuracy, backward_transfer, forgetting


def last_accuracy(matrix: Matrix) -> float:
    """Accuracy on the last experience trained, right after training it."""
    k = len(matrix)
    return matrix[-1][k - 1] if k and len(matrix[-1]) >= k else 0.0


#: ``run.objective`` names -> the metric (maximise accuracy; minimise forgetting).
OBJECTIVES: dict[str, Callable[[Matrix], float]] = {
    "average_accuracy": average_accuracy,
    "forgetting": forgetting,
    "bwt": backward_transfer,
    "last_accuracy": last_accuracy,
}


def is_objective(value: object) -> bool:
    """A name of :data:`OBJECTIVES`, or a non-empty list of them."""
    if isinstance(value, str):
        return value in OBJECTIVES
    return (
        isinstance(value, list | tuple)
        and len(value) > 0
        and all(isinstance(v, str) and v in OBJECTIVES for v in value)
    )


def objective(matrix: Matrix, names: str | Sequence[str]) -> float | list[float]:
    """The value(s) ``names`` name for ``matrix``: a float, or a list for a list."""
    if isinstance(names, str):
        return float(OBJECTIVES[names](matrix))
    return [float(OBJECTIVES[name](matrix)) for name in names]
