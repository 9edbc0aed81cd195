"""Continual-learning metrics on small accuracy matrices computed by hand.

``R[i][j]`` is the accuracy on test experience j after training experience i; k = len(R).
"""

from __future__ import annotations

import pytest

from engram.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer

# A square run of three experiences. R[1][0] > R[0][0] (experience 0 got better before it
# was forgotten) tells forgetting (max over earlier rows) from BWT (the diagonal only);
# R[0][1] is high before experience 1 was trained, which forgetting must not count.
SQUARE = [
    [0.90, 0.99, 0.20],
    [0.95, 0.80, 0.30],
    [0.50, 0.70, 0.90],
]
SQUARE_INITIAL = [0.10, 0.20, 0.30]  # the untrained model on each test experience

# The files benchmark: a file arrives after each experience, so row i has i + 1 columns.
GROWING = [
    [0.8],
    [0.6, 0.9],
    [0.4, 0.7, 1.0],
]

# Two files at the start, then two more arrive after experience 1: row lengths 2, 2, 4.
# The last row measures experience 3, which is not trained yet.
BURSTS = [
    [0.8, 0.3],
    [0.6, 0.9],
    [0.4, 0.7, 1.0, 0.2],
]
BURSTS_INITIAL = [0.1, 0.2]  # measured when only the first two files existed


def test_average_accuracy() -> None:
    # (0.5 + 0.7 + 0.9) / 3 = 0.7
    assert average_accuracy(SQUARE) == pytest.approx(0.7)
    # (0.4 + 0.7 + 1.0) / 3 = 0.7
    assert average_accuracy(GROWING) == pytest.approx(0.7)
    # k = 3: the untrained experience 3 (0.2) is left out: (0.4 + 0.7 + 1.0) / 3 = 0.7
    assert average_accuracy(BURSTS) == pytest.approx(0.7)


def test_forgetting() -> None:
    # j=0: max(R00 0.90, R10 0.95) - R20 0.50 = 0.45
    # j=1: max(R11 0.80) - R21 0.70 = 0.10 (R01 0.99, before training 1, is not counted)
    # mean (0.45 + 0.10) / 2 = 0.275
    assert forgetting(SQUARE) == pytest.approx(0.275)
    # j=0: max(0.8, 0.6) - 0.4 = 0.4; j=1: 0.9 - 0.7 = 0.2; mean 0.3
    assert forgetting(GROWING) == pytest.approx(0.3)
    # same entries as GROWING for j < k - 1: 0.3
    assert forgetting(BURSTS) == pytest.approx(0.3)


def test_forgetting_is_negative_when_old_experiences_improve() -> None:
    # j=0: R00 0.5 - R10 0.75 = -0.25
    assert forgetting([[0.5, 0.0], [0.75, 0.9]]) == pytest.approx(-0.25)


def test_backward_transfer() -> None:
    # j=0: R20 0.5 - R00 0.9 = -0.4; j=1: R21 0.7 - R11 0.8 = -0.1; mean -0.25
    assert backward_transfer(SQUARE) == pytest.approx(-0.25)
    # j=0: 0.4 - 0.8 = -0.4; j=1: 0.7 - 0.9 = -0.2; mean -0.3
    assert backward_transfer(GROWING) == pytest.approx(-0.3)
    assert backward_transfer(BURSTS) == pytest.approx(-0.3)
    # j=0: R10 0.75 - R00 0.5 = +0.25: learning experience 1 helped experience 0
    assert backward_transfer([[0.5, 0.0], [0.75, 0.9]]) == pytest.approx(0.25)


def test_forward_transfer() -> None:
    # j=1: R01 0.99 - b1 0.2 = 0.79; j=2: R12 0.3 - b2 0.3 = 0.0; mean 0.395
    assert forward_transfer(SQUARE, SQUARE_INITIAL) == pytest.approx(0.395)
    # j=1: R01 0.3 - b1 0.2 = 0.1; j=2: no b2 (file 2 arrived later): skipped; 0.1
    assert forward_transfer(BURSTS, BURSTS_INITIAL) == pytest.approx(0.1)
    # no row measured an experience before training it (R01, R12 absent): nothing to average
    assert forward_transfer(GROWING, [0.1]) == 0.0
    assert forward_transfer(GROWING, [0.1, 0.2, 0.3]) == 0.0


def test_forward_transfer_without_initial_accuracy() -> None:
    # a run that never measured the untrained model (or measured no test experience)
    assert forward_transfer(SQUARE, None) == 0.0
    assert forward_transfer(SQUARE, []) == 0.0


def test_one_row() -> None:
    one = [[0.7, 0.2]]
    # k = 1: only experience 0 is trained: 0.7
    assert average_accuracy(one) == pytest.approx(0.7)
    assert forgetting(one) == 0.0  # nothing earlier to forget
    assert backward_transfer(one) == 0.0
    assert forward_transfer(one, [0.1, 0.15]) == 0.0  # j ranges over 1..k-1: none


def test_empty_matrix() -> None:
    assert average_accuracy([]) == 0.0
    assert forgetting([]) == 0.0
    assert backward_transfer([]) == 0.0
    assert forward_transfer([], [0.1]) == 0.0
    assert forward_transfer([], None) == 0.0
