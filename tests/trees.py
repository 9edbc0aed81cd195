"""One exact-equality check for nested states (tensors, arrays, dicts, lists, scalars),
shared by the tests that compare a resumed or restored state with a reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def assert_same_tree(a: Any, b: Any, path: str = "") -> None:
    """``a`` and ``b`` hold the same values bit for bit: tensors and arrays of the same
    dtype, shape and bytes, dicts with the same keys in the same order."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, path
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{path}/{i}")
    else:
        assert a == b, path
