"""Embedded, offline benchmarks built from scikit-learn's bundled digits (8x8, 1797 images).

No download: the data ships with scikit-learn, so these run anywhere (tests, CI, the
README's main job).

* ``split_digits``: class-incremental, classes split into experiences (0-1, 2-3, ...);
  with ``task_labels`` task-incremental (one head per experience).
* ``permuted_digits``: domain-incremental, every experience holds all ten classes with
  its own fixed pixel permutation (the first one is the identity).
* ``rotated_digits``: domain-incremental, experience i rotates the images by
  ``i * max_angle / (n - 1)`` degrees.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import TensorDataset

INPUT_SHAPE = (64,)  # flat 8x8 images, pixel values in [0, 1]
N_CLASSES = 10


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
    return split_by_class(digits_tensors(seed), N_CLASSES, n_experiences, task_labels)


def split_by_class(tensors, n_classes: int, n_experiences: int, task_labels: bool):
    """``(x_train, y_train, x_test, y_test)`` split by class, in class order, into
    ``n_experiences`` experiences (Avalanche's ``nc_benchmark``)."""
    from avalanche.benchmarks import nc_benchmark

    x_train, y_train, x_test, y_test = tensors
    train, test = LabelledTensors(x_train, y_train), LabelledTensors(x_test, y_test)
    return nc_benchmark(
        train,
        test,
        n_experiences=n_experiences,
        task_labels=task_labels,
        shuffle=False,
        fixed_class_order=list(range(n_classes)),
        class_ids_from_zero_in_each_exp=task_labels,
    )


def permuted_digits(n_experiences: int = 5, *, seed: int = 0):
    """Every experience: all digits, pixels shuffled by that experience's permutation."""
    x_train, y_train, x_test, y_test = digits_tensors(seed)
    g = torch.Generator().manual_seed(seed)
    perms = [torch.arange(64)] + [torch.randperm(64, generator=g) for _ in range(n_experiences - 1)]
    return _domain_incremental([(x_train[:, p], y_train, x_test[:, p], y_test) for p in perms])


def rotated_digits(n_experiences: int = 5, *, max_angle: float = 90.0, seed: int = 0):
    """Experience i: all digits rotated by ``i * max_angle / (n_experiences - 1)`` degrees."""
    x_train, y_train, x_test, y_test = digits_tensors(seed)
    step = max_angle / max(n_experiences - 1, 1)
    return _domain_incremental(
        [
            (rotate(x_train, i * step), y_train, rotate(x_test, i * step), y_test)
            for i in range(n_experiences)
        ]
    )


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate flat 8x8 images about their centre (bilinear, zeros outside)."""
    import torch.nn.functional as F

    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    affine = torch.tensor([[c, -s, 0.0], [s, c, 0.0]]).expand(len(x), 2, 3)
    images = x.reshape(-1, 1, 8, 8)  # (N, 1, 8, 8)
    grid = F.affine_grid(affine, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False).reshape(len(x), 64)


def _domain_incremental(parts):
    from avalanche.benchmarks import dataset_benchmark

    train = [LabelledTensors(xt, yt) for xt, yt, _, _ in parts]
    test = [LabelledTensors(xe, ye) for _, _, xe, ye in parts]
    return dataset_benchmark(train, test)
