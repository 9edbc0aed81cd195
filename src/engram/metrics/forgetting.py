"""Metrics over an accuracy matrix ``R`` where ``R[i][j]`` is the accuracy on test
experience j after training experience i (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018).

They read only the matrix, which the store persists, so values after a resume equal
those of an uninterrupted run.
"""

from __future__ import annotations

Matrix = list[list[float]]


def average_accuracy(matrix: Matrix) -> float:
    """Mean accuracy over the experiences trained so far, after the last one."""
    k = len(matrix)
    return sum(matrix[-1][:k]) / k if k else 0.0


def forgetting(matrix: Matrix) -> float:
    """Mean over earlier experiences j of max_{i<k} R[i][j] - R[k-1][j] (0 with one row)."""
    k = len(matrix)
    if k < 2:
        return 0.0
    drops = [max(matrix[i][j] for i in range(j, k - 1)) - matrix[-1][j] for j in range(k - 1)]
    return sum(drops) / len(drops)


def backward_transfer(matrix: Matrix) -> float:
    """BWT: mean over j < k-1 of R[k-1][j] - R[j][j] (negative when the model forgets)."""
    k = len(matrix)
    if k < 2:
        return 0.0
    return sum(matrix[-1][j] - matrix[j][j] for j in range(k - 1)) / (k - 1)
