"""Metrics over an accuracy matrix ``R`` where ``R[i][j]`` is the accuracy on test
experience j after training experience i (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018).

They read only the matrix (and, for FWT, the accuracies of the untrained model), which
the store persists, so values after a resume equal those of an uninterrupted run.

Rows may be ragged: with the ``files`` benchmark the test stream grows when a new file
arrives, so earlier rows have fewer columns. Each metric uses the entries it needs and
skips those that were never measured.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _at(matrix: Matrix, i: int, j: int) -> float | None:
    row = matrix[i]
    return row[j] if j < len(row) else None


def average_accuracy(matrix: Matrix) -> float:
    """Mean accuracy over the experiences trained so far, after the last one."""
    k = len(matrix)
    return sum(matrix[-1][:k]) / k if k else 0.0


def forgetting(matrix: Matrix) -> float:
    """Mean over earlier experiences j of max_{i<k} R[i][j] - R[k-1][j] (0 with one row)."""
    k = len(matrix)
    if k < 2:
        return 0.0
    drops = []
    for j in range(k - 1):
        earlier = [a for i in range(j, k - 1) if (a := _at(matrix, i, j)) is not None]
        if earlier:
            drops.append(max(earlier) - matrix[-1][j])
    return sum(drops) / len(drops) if drops else 0.0


def backward_transfer(matrix: Matrix) -> float:
    """BWT: mean over j < k-1 of R[k-1][j] - R[j][j] (negative when the model forgets)."""
    k = len(matrix)
    if k < 2:
        return 0.0
    return sum(matrix[-1][j] - matrix[j][j] for j in range(k - 1)) / (k - 1)


def forward_transfer(matrix: Matrix, initial: Sequence[float] | None) -> float:
    """FWT: mean over 0 < j < k of R[j-1][j] - b[j], b[j] being the accuracy on test
    experience j of the model before any training (0 when nothing is measurable)."""
    if not initial:
        return 0.0
    gains = [
        a - initial[j]
        for j in range(1, len(matrix))
        if j < len(initial) and (a := _at(matrix, j - 1, j)) is not None
    ]
    return sum(gains) / len(gains) if gains else 0.0


def summary(matrix: Matrix, initial: Sequence[float] | None) -> dict[str, float]:
    """Every metric of an accuracy matrix, as each version records it."""
    return {
        "average_accuracy": average_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "bwt": backward_transfer(matrix),
        "fwt": forward_transfer(matrix, initial),
    }
