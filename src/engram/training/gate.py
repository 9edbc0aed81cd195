"""The regression gate: may the version an experience produced become what users get?

Checked by :class:`~engram.training.template.DurableTemplate` (and the scikit-learn
learner) when an experience ends, *before* the experience's version is committed and
before anything is pruned:

1. the gate's verdict is computed from the accuracy matrix the version will hold;
2. the version is committed with the verdict in its meta (``meta["gate"]``), so the
   history says which versions passed, and in the same transaction
   (:class:`~engram.store.RefMoves`, :func:`gate_refs`) a passing version takes HEAD
   and the ``promote`` tag (e.g. ``prod``), while a failing one is tagged
   ``gate-failed-vNNNN`` and HEAD stays on the nearest version that ends an
   experience and did not fail a gate (none: HEAD is reset, so the next run starts the
   stream afresh). No crash leaves a failing version on HEAD: a rerun continues from
   the last passing version;
3. a failure then raises :class:`~engram.errors.GateFailed` (:func:`settle_gate`'s
   message). ``engram-train`` exits with status 3.

Mid-experience versions of the experience are pruned after step 2, whatever the
commit cadence, so the walk in step 2 never meets a deleted parent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engram import metrics
from engram.errors import GateFailed
from engram.store import RefMoves, Store, VersionInfo

__all__ = [
    "FAILED_TAG",
    "GateFailed",
    "RegressionGate",
    "gate_refs",
    "gate_verdict",
    "passing_version",
    "settle_gate",
]

FAILED_TAG = "gate-failed-{version}"  # the tag a failing version is kept under


@dataclass(frozen=True)
class RegressionGate:
    """Thresholds checked after each experience (None: not checked).

    Args:
        max_forgetting: fail when average forgetting exceeds this.
        min_average_accuracy: fail when average accuracy falls below this.
        promote: move this tag to every version that passes.
    """

    max_forgetting: float | None = None
    min_average_accuracy: float | None = None
    promote: str | None = None

    def failures(self, matrix: Sequence[Sequence[float]]) -> list[str]:
        """Why the version holding ``matrix`` fails the gate (empty: it passes)."""
        out = []
        lost = metrics.forgetting(matrix)
        if self.max_forgetting is not None and lost > self.max_forgetting:
            out.append(f"forgetting {lost:.3f} > max {self.max_forgetting}")
        acc = metrics.average_accuracy(matrix)
        if self.min_average_accuracy is not None and acc < self.min_average_accuracy:
            out.append(f"average accuracy {acc:.3f} < min {self.min_average_accuracy}")
        return out


def gate_verdict(
    gate: RegressionGate | None, matrix: Sequence[Sequence[float]]
) -> tuple[list[str], dict | None]:
    """Step 1: the failures of the version holding ``matrix`` and the verdict its meta
    records (``None``: no gate)."""
    if gate is None:
        return [], None
    failures = gate.failures(matrix)
    return failures, {"passed": not failures, "failures": failures}


def gate_refs(gate: RegressionGate | None, store: Store, failures: list[str]) -> RefMoves | None:
    """Step 2's ref moves for the version about to be committed on ``store``'s HEAD
    (None: no gate, HEAD simply moves)."""
    if gate is None:
        return None
    if not failures:
        return RefMoves(tags=(gate.promote,) if gate.promote else ())
    good = passing_version(store, store.head)
    return RefMoves(tags=(FAILED_TAG,), head=None if good is None else good.id)


def settle_gate(
    store: Store, failed: VersionInfo | None, index: int, failures: list[str]
) -> str | None:
    """Step 3: the message GateFailed carries for ``failed``, the version committed off
    HEAD with :func:`gate_refs`' moves (None: it passed)."""
    if not failures:
        return None
    (tag,) = failed.tags
    good = store.head
    if good is not None:
        where = f"HEAD stays on {good.name} (experience {good.meta['experience']})"
    else:
        where = "No earlier version passed, so HEAD was reset (the next run starts afresh)"
    return (
        f"regression gate failed after experience {index}: {'; '.join(failures)}. "
        f"{where}; the failed version {failed.name} is kept as tag {tag!r} "
        f"(inspect: engram show {store.path} {tag})"
    )


def passing_version(store: Store, version: VersionInfo | None) -> VersionInfo | None:
    """``version`` or its nearest ancestor that ends an experience and passed (or never
    met) a gate."""
    seen: set[int] = set()
    while version is not None and version.id not in seen:
        seen.add(version.id)
        meta = version.meta
        if meta.get("kind") == "experience" and meta.get("gate", {}).get("passed", True):
            return version
        version = None if version.parent is None else store.info(version.parent)
    return None
