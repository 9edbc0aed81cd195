"""A model's signature: what it takes and what it answers, recorded with every version.

    {"input": {"dtype": "float32", "shape": [64]},     # one sample's shape
     "classes": [0, 1, ..., 9],                         # the label space, declared up front
     "task_labels": false}                              # multi-head: a task id per sample

``engram-train`` records it in ``meta["signature"]``; :class:`engram.ModelHandle` and
:func:`engram.load_model` check it at load, and :func:`check_input` at predict time, so a
caller passing the wrong shape gets one clear line instead of a traceback from inside
NumPy or torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engram.errors import EngramError


class SignatureError(EngramError, ValueError):
    """An input does not fit the model's recorded signature."""


def signature(
    input_shape: Sequence[int], classes: Sequence[int], *, dtype: str = "float32",
    task_labels: bool = False,
) -> dict[str, Any]:  # fmt: skip
    return {
        "input": {"dtype": dtype, "shape": [int(d) for d in input_shape]},
        "classes": [int(c) for c in classes],
        "task_labels": bool(task_labels),
    }


def check_input(sig: Mapping[str, Any] | None, x: Any, *, what: str = "the model") -> None:
    """Raise SignatureError if ``x`` (a batch: N samples) does not fit ``sig``."""
    if not sig:
        return
    want = list(sig["input"]["shape"])
    shape = list(getattr(x, "shape", ()))
    if shape[1:] != want:
        got = "a scalar" if not shape else f"shape ({', '.join(map(str, shape))})"
        raise SignatureError(
            f"the input has {got}; {what} takes a batch of shape "
            f"(N, {', '.join(map(str, want))}) of {sig['input']['dtype']}"
        )
    kind = getattr(getattr(x, "dtype", None), "kind", None)
    if kind is None and hasattr(x, "is_floating_point"):  # a torch tensor
        kind = "f" if x.is_floating_point() else "i"
    if kind not in ("f", "i", "u", "b"):
        raise SignatureError(f"the input must be numeric for {what}, not {getattr(x, 'dtype', x)}")


def check_labels(sig: Mapping[str, Any], labels: Sequence[int], *, where: str) -> None:
    """Raise SignatureError naming labels outside the declared label space."""
    known = set(sig["classes"])
    unknown = sorted({int(y) for y in labels} - known)
    if unknown:
        raise SignatureError(
            f"{where} holds label {unknown[0]}{' and more' if len(unknown) > 1 else ''} "
            f"outside the declared label space {sig['classes'][0]}..{sig['classes'][-1]} "
            "(set benchmark.n_classes to the number of classes when the store is created)"
        )
