"""The regression gate: may the version an experience produced become what users get?

Checked by :class:`~engram.training.template.DurableTemplate` when an experience ends,
*before* the experience's version is committed and before anything is pruned:

1. the gate's verdict is computed from the accuracy matrix the version will hold;
2. the version is committed with the verdict in its meta (``meta["gate"]``), so the
   history says which versions passed;
3. a passing version moves the ``promote`` tag (e.g. ``prod``) to itself;
4. a failing one is tagged ``gate-failed-vNNNN`` and HEAD moves back to the nearest
   ancestor that is an experience version and did not fail a gate (none: HEAD is reset,
   so the next run starts the stream afresh); then :class:`~engram.errors.GateFailed`
   is raised. ``engram-train`` exits with status 3.

Mid-experience versions of the experience are pruned after step 4, whatever the
commit cadence, so the walk in step 4 never meets a deleted parent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engram import metrics
from engram.errors import GateFailed
from engram.store import Store, VersionInfo

__all__ = ["GateFailed", "RegressionGate", "gate_verdict", "last_passing_ancestor", "settle_gate"]


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

    def reject(self, store: Store, failed: VersionInfo, index: int, failures: list[str]) -> str:
        """Tag ``failed``, move HEAD off it; returns the message GateFailed carries."""
        tag = f"gate-failed-{failed.name}"
        store.tag(tag, failed.id)
        good = last_passing_ancestor(store, failed)
        if good is not None:
            store.rollback(good.id)
            where = f"HEAD rolled back to {good.name} (experience {good.meta['experience']})"
        else:
            store.rollback(None)
            where = "No earlier version passed, so HEAD was reset (the next run starts afresh)"
        return (
            f"regression gate failed after experience {index}: {'; '.join(failures)}. "
            f"{where}; the failed version {failed.name} is kept as tag {tag!r} "
            f"(inspect: engram show {store.path} {tag})"
        )


def gate_verdict(
    gate: RegressionGate | None, matrix: Sequence[Sequence[float]]
) -> tuple[list[str], dict | None]:
    """Step 1: the failures of the version holding ``matrix`` and the verdict its meta
    records (``None``: no gate)."""
    if gate is None:
        return [], None
    failures = gate.failures(matrix)
    return failures, {"passed": not failures, "failures": failures}


def settle_gate(
    gate: RegressionGate | None, store: Store, index: int, failures: list[str]
) -> str | None:
    """Steps 3 and 4, once HEAD is the experience's version: move the promote tag, or
    reject the version; returns the message GateFailed carries (None: it passed)."""
    if failures:
        return gate.reject(store, store.head, index, failures)
    if gate is not None and gate.promote:
        store.tag(gate.promote, store.head.id)
    return None


def last_passing_ancestor(store: Store, version: VersionInfo) -> VersionInfo | None:
    """The nearest ancestor of ``version`` that ends an experience and passed (or never
    met) a gate."""
    seen = {version.id}
    parent = version.parent
    while parent is not None and parent not in seen:
        seen.add(parent)
        info = store.info(parent)
        if info.meta.get("kind") == "experience" and info.meta.get("gate", {}).get("passed", True):
            return info
        parent = info.parent
    return None
