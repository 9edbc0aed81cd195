"""What may be committed: a version whose every tensor is finite and whose weights have
not blown up.

The step guard (:func:`engram.training.numerics.finite_step`) sees the loss and the
gradients; this one sees what a version would hold: every floating tensor and array of
the state (optimizer moments, plugins' importances, anchors, teachers, replay logits,
curves), the weights, and a scikit-learn estimator's fitted arrays. A diverged version
is never committed, so HEAD stays on the last healthy one.

A finite blow-up is caught by a bound on the weights' magnitude, :data:`MAX_ABS_WEIGHT`.
Measured (experiments/weight_bound.py, 2026-12-06): the largest ``|weight|`` of every
shipped strategy's MLP at its defaults is below 4, of the scikit-learn models below 20,
230 for the scaled SGD pipeline; a diverged run's weights reach 1e29-1e30 within a few
steps (``optimizer.lr=1e30``; SGDClassifier with ``eta0=1e30``). 1e6 leaves over three
orders of magnitude of head room on either side. A model that is meant to hold larger
weights sets ``training.max_abs_weight`` (or ``null``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

MAX_ABS_WEIGHT = 1e6  # see the module docstring; training.max_abs_weight=null disables it

# scikit-learn's fitted arrays that are weights (the bound applies); any other fitted
# array (class counts, variances, feature statistics) is only checked to be finite.
# (GaussianNB's theta_ is a feature mean: as large as the user's features are.)
SKLEARN_WEIGHTS = frozenset(("coef_", "intercept_", "coefs_", "intercepts_"))


def nonfinite_paths(tree: Any, prefix: str = "", *, exempt: tuple[str, ...] = ()) -> list[str]:
    """Where ``tree`` (dicts, lists and tuples of tensors, arrays and scalars) holds a
    non-finite floating value: ``"plugins/si/importance"``, ... ``exempt``: paths
    whose NaN means "no value" (a curve's epoch without a trained minibatch)."""
    return [
        path for path, value in _arrays(tree, prefix)
        if path not in exempt and not _finite(value)
    ]  # fmt: skip


def oversized(weights: Mapping[str, Any], bound: float | None) -> list[tuple[str, float]]:
    """The weights whose largest magnitude exceeds ``bound``, with that magnitude."""
    if bound is None:
        return []
    out = []
    for name, value in weights.items():
        largest = _largest(value)
        if largest is not None and largest > bound:
            out.append((name, largest))
    return out


def estimator_arrays(estimator: Any, prefix: str = "") -> dict[str, Any]:
    """A fitted scikit-learn estimator's arrays by attribute path (a pipeline's or
    ensemble's inner estimators too): ``"coef_"``, ``"steps/1/coef_"``, ..."""
    out: dict[str, Any] = {}

    def walk(obj: Any, at: str, depth: int) -> None:
        if depth > 4:  # pipelines of ensembles are as deep as estimators go
            return
        if isinstance(obj, np.ndarray):
            out[at] = obj
        elif isinstance(obj, list | tuple):
            for i, item in enumerate(obj):
                walk(item, f"{at}/{i}" if at else str(i), depth + 1)
        elif hasattr(obj, "get_params") and hasattr(obj, "__dict__"):  # an estimator
            for name, value in vars(obj).items():
                if name.endswith("_") or isinstance(value, list | tuple):
                    walk(value, f"{at}/{name}" if at else name, depth + 1)

    walk(estimator, prefix, 0)
    return out


def estimator_problems(estimator: Any, bound: float | None) -> str | None:
    """What makes a fitted scikit-learn estimator uncommittable (None: nothing)."""
    arrays = estimator_arrays(estimator)
    weights = {k: v for k, v in arrays.items() if SKLEARN_WEIGHTS & set(k.split("/"))}
    # NaN anywhere; inf in weights only: a naive Bayes' log prior of a class not seen yet
    # is -inf by design (log 0)
    bad = [k for k, v in arrays.items() if _has_nan(v)] + nonfinite_paths(weights)
    if bad:
        return f"non-finite values in {', '.join(dict.fromkeys(bad[:5]))}"
    big = oversized(weights, bound)
    if big:
        shown = ", ".join(f"{name} ({value:.3g})" for name, value in big[:5])
        return f"weights beyond the bound |w| <= {bound:g} (training.max_abs_weight) in {shown}"
    return None


def _arrays(tree: Any, at: str) -> Iterator[tuple[str, Any]]:
    if isinstance(tree, torch.Tensor | np.ndarray):
        yield at, tree
    elif isinstance(tree, float):
        yield at, np.float64(tree)
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _arrays(value, f"{at}/{key}" if at else str(key))
    elif isinstance(tree, list | tuple):
        if tree and all(type(v) is float or type(v) is int for v in tree):
            # a row of numbers (an accuracy-matrix row) is one array: one check, not one
            # per number (the matrix grows with the square of the stream's length)
            yield at, np.asarray(tree, dtype=np.float64)
            return
        for i, value in enumerate(tree):
            yield from _arrays(value, f"{at}/{i}" if at else str(i))


def _finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()) or value.numel() == 0:
            return True
        return bool(torch.isfinite(value).all())
    value = np.asarray(value)
    if value.dtype.kind not in "fc" or value.size == 0:
        return True
    return bool(np.isfinite(value).all())


def _has_nan(value: Any) -> bool:
    value = np.asarray(value)
    return value.dtype.kind in "fc" and bool(np.isnan(value).any())


def _largest(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.numel() == 0:
            return None
        return float(value.detach().abs().max())
    value = np.asarray(value)
    if value.dtype.kind != "f" or value.size == 0:
        return None
    return float(np.abs(value).max())
