"""The meta every learner records with a version: where it stands, what it is, how it did.

Both learners (the Avalanche template, the scikit-learn learner) build it here, so the
fields that ``engram ls``, the lineage checks, the gate, TensorBoard's history and a
model card read are the same whichever wrote the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engram import metrics
from engram.training.state import Cursor


def version_meta(
    cursor: Cursor,
    *,
    strategy: str,
    hparams: Mapping[str, Any],
    execution: Mapping[str, Any],
    experience_bytes: list[int],
    accuracy_matrix: list[list[float]],
    initial_accuracy: list[float] | None = None,
    model_spec: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    gate: Mapping[str, Any] | None = None,
    skipped_updates: int = 0,
) -> dict[str, Any]:
    """The meta of a version committed at ``cursor`` (a boundary cursor points at the
    next experience: the version is the last one's).

    ``experience_bytes``: what each earlier experience's commit wrote (so a resume's
    TensorBoard history needs no listing); ``extra``: the caller's own fields (the
    stream's experience ids, a scikit-learn signature...), after the common ones.
    """
    mid = cursor.mid_experience
    kind = "mid-experience" if mid else "experience"
    meta: dict[str, Any] = {
        "experience": cursor.experience if mid else max(cursor.experience - 1, 0),
        "epoch": cursor.epoch,
        "iteration": cursor.iteration,
        "kind": kind,
        "strategy": strategy,
        "hparams": dict(hparams),
    }
    if model_spec is not None:
        meta["model_spec"] = dict(model_spec)
    meta.update(extra or {})
    meta["execution"] = dict(execution)
    meta["experience_bytes"] = list(experience_bytes)
    if gate is not None:
        meta["gate"] = dict(gate)
    if skipped_updates:
        meta["skipped_updates"] = skipped_updates
    if accuracy_matrix and kind == "experience":
        meta["accuracy"] = accuracy_matrix[-1]
        meta["metrics"] = metrics.summary(accuracy_matrix, initial_accuracy)
    return meta
