"""The accuracy-matrix figure costs the same at any stream length (issue 25): cells are
labelled up to MAX_LABELLED experiences a side, and the figure stops growing there."""

from __future__ import annotations

import pytest

from engram.metrics.tensorboard import MAX_LABELLED, heatmap

plt = pytest.importorskip("matplotlib.pyplot")


def _matrix(n: int) -> list[list[float]]:
    return [[(i + j) % 10 / 10 for j in range(i + 1)] for i in range(n)]  # ragged rows


def test_a_small_matrix_has_every_cell_labelled() -> None:
    fig = heatmap(_matrix(4))
    assert len(fig.axes[0].texts) == 4 * 5 // 2
    plt.close(fig)


def test_a_long_stream_gets_a_figure_of_the_capped_size_without_labels() -> None:
    capped = heatmap(_matrix(MAX_LABELLED))
    long = heatmap(_matrix(3 * MAX_LABELLED))
    assert tuple(long.get_size_inches()) == tuple(capped.get_size_inches())
    assert len(long.axes[0].texts) == 0  # colours and a colour bar only
    assert len(long.axes) == 2
    plt.close(capped)
    plt.close(long)
