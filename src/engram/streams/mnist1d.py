"""Offline real-data benchmarks on MNIST-1D (Greydanus 2020), generated, never downloaded.

MNIST-1D turns ten 1-D digit templates into signals of 40 points by random padding,
scaling, translation, correlated and i.i.d. noise and shear: a small dataset that is
harder than scikit-learn's digits (with the default MLP and 3 epochs, the two-class
experiences of ``split_mnist1d`` reach 0.65-0.97 accuracy, split digits' about 0.99) and
needs no download. The data is made here by the ``mnist1d`` package's own generator,
:func:`mnist1d.data.make_dataset`, from a seed — not by ``get_dataset``, which
downloads the reference pickle and caches it in the working directory. Nothing is
written to disk: the default 5,000 signals (4,000 train, 1,000 test) take about 0.7 s to
generate on one CPU core, and importing the package (scipy, matplotlib) about 0.7 s more.

* ``split_mnist1d``: class-incremental, classes split into experiences (0-1, 2-3, ...);
  with ``task_labels`` task-incremental (one head per experience).
* ``permuted_mnist1d``: domain-incremental, every experience holds all ten classes with
  its own fixed permutation of the 40 positions (the first one is the identity).
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch

from engram.streams.digits import _domain_incremental, split_by_class

INPUT_SHAPE = (40,)  # one signal of 40 points, standardised over the dataset
N_CLASSES = 10
N_SAMPLES = 5000  # the package's default size, split 80/20 into train and test


@contextmanager
def _global_rng_kept():
    """``make_dataset`` reseeds Python's and numpy's global RNGs: put them back after."""
    py, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)


def mnist1d_tensors(seed: int = 0, num_samples: int = N_SAMPLES):
    """(x_train, y_train, x_test, y_test): float32 signals (N, 40), int64 labels.

    The same ``seed`` gives the same data, bit for bit; the global ``random`` and
    ``numpy.random`` states are left as they were.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()  # a fresh ObjectView of the package's defaults
    args.seed = seed
    args.num_samples = num_samples
    with _global_rng_kept():
        data = make_dataset(args)
    x = torch.tensor(data["x"], dtype=torch.float32)
    y = torch.tensor(data["y"], dtype=torch.int64)
    x_test = torch.tensor(data["x_test"], dtype=torch.float32)
    y_test = torch.tensor(data["y_test"], dtype=torch.int64)
    return x, y, x_test, y_test


def split_mnist1d(n_experiences: int = 5, *, task_labels: bool = False, seed: int = 0):
    """MNIST-1D split by class into ``n_experiences`` experiences (classes 0-1, 2-3, ...).

    Args:
        task_labels: give experience i task label i (task-incremental, multi-head models);
            classes are then relabelled from zero in each experience.
    """
    return split_by_class(mnist1d_tensors(seed), N_CLASSES, n_experiences, task_labels)


def permuted_mnist1d(n_experiences: int = 5, *, seed: int = 0):
    """Every experience: all classes, the 40 positions shuffled by its own permutation."""
    x_train, y_train, x_test, y_test = mnist1d_tensors(seed)
    width = INPUT_SHAPE[0]
    g = torch.Generator().manual_seed(seed)
    perms = [torch.arange(width)]
    perms += [torch.randperm(width, generator=g) for _ in range(n_experiences - 1)]
    return _domain_incremental([(x_train[:, p], y_train, x_test[:, p], y_test) for p in perms])
