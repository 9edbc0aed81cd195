"""Embedded, offline benchmarks built from scikit-learn's bundled digits (8x8, 1797 images).

No download: the data ships with scikit-learn, so these run anywhere (tests, CI, the
README's main job).
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


class LabelledTensors(TensorDataset):
    """A TensorDataset with the ``targets`` Avalanche's generators read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(x, y)
        self.targets = y


def digits_tensors(seed: int = 0, test_fraction: float = 0.25):
    """(x_train, y_train, x_test, y_test): flat float32 inputs in [0, 1], a seeded split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)  # (1797, 64)
    y = torch.tensor(y, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = round(test_fraction * len(y))
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def split_digits(n_experiences: int = 5, *, task_labels: bool = False, seed: int = 0):
    """Digits split by class into ``n_experiences`` experiences (classes 0-1, 2-3, ...).

    Args:
        task_labels: give experience i task label i (task-incremental, multi-head models);
            classes are then relabelled from zero in each experience.
    """
    from avalanche.benchmarks import nc_benchmark

    x_train, y_train, x_test, y_test = digits_tensors(seed)
    train, test = LabelledTensors(x_train, y_train), LabelledTensors(x_test, y_test)
    return nc_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        task_labels=task_labels,
        shuffle=False,
        fixed_class_order=list(range(10)),
        class_ids_from_zero_in_each_exp=task_labels,
    )
