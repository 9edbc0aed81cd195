"""One exact-equality check for nested states (tensors, arrays, dicts, lists, scalars),
shared by the tests that compare a resumed or restored state with a reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def assert_same_tree(a: Any, b: Any, path: str = "", *, key_order: bool = True) -> None:
    """``a`` and ``b`` hold the same values bit for bit: the same types (containers too),
    tensors and arrays of the same dtype, shape and bytes (a NaN equals the same NaN;
    -0.0 is not 0.0), dicts with the same keys (``key_order``: in the same order)."""
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype)
        assert _bytes(a) == _bytes(b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, (path, a.dtype, b.dtype)
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        same = list(a) == list(b) if key_order else a.keys() == b.keys()
        assert same, (path, list(map(str, a)), list(map(str, b)))
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}/{k}", key_order=key_order)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{path}/{i}", key_order=key_order)
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, (path, a, b)


def _bytes(t: torch.Tensor) -> bytes:
    if not t.numel():
        return b""
    return bytes(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
