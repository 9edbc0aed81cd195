"""HEAD of a store, read once for a resume: :class:`Resumed`.

A resume needs HEAD for several things — the model spec that sizes the benchmark, the
lineage and architecture checks, the execution settings, the state to apply, the
TensorBoard history, and whether the stream is already trained. They all read the one
value :func:`read_head` returns: one manifest read, in one read transaction with the
state and weights it names (so they cannot disagree if the store changes in between).

The lineage checks run after this read, not before it: a run refused for other
hyperparameters has read HEAD's state for nothing, which only costs time on that error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engram.errors import VersionNotFoundError
from engram.store import Snapshot, Store, VersionInfo

#: A learner's ``resumed`` argument when the caller has not read HEAD (it reads it then).
UNREAD = object()


@dataclass(frozen=True)
class Resumed:
    """The version a run continues: its summary (``version.meta``...), state and model."""

    snapshot: Snapshot

    @property
    def version(self) -> VersionInfo:
        return self.snapshot.version

    @property
    def meta(self) -> dict[str, Any]:
        return self.snapshot.version.meta

    @property
    def name(self) -> str:
        return self.snapshot.version.name

    def model_spec(self) -> dict[str, Any]:
        """The spec HEAD's model was built from (``{}`` when it records none)."""
        return dict(self.meta.get("model_spec") or {})

    def experience_bytes(self, store: Store) -> list[int]:
        """Bytes each experience's commit wrote, in order, through HEAD: from HEAD's meta,
        or, for a store from before the meta recorded them, from one listing of
        ``store``'s versions (recorded from then on)."""
        before = self.meta.get("experience_bytes")
        if before is None:
            n = len(self.snapshot.state["metrics"]["accuracy_matrix"])
            written = {v.meta["experience"]: v.new_bytes for v in store.versions()
                       if v.meta.get("kind") == "experience"}  # fmt: skip
            return [written.get(i, 0) for i in range(n)]
        own = [self.version.new_bytes] if self.meta.get("kind") == "experience" else []
        return [int(b) for b in before] + own


def read_head(store: Store) -> Resumed | None:
    """HEAD's state and model, read once (None: no HEAD)."""
    try:
        return Resumed(store.load("HEAD"))
    except VersionNotFoundError:
        return None


def take(store: Store, resumed: Resumed | object | None) -> Resumed | None:
    """``resumed``, or HEAD read now when it is :data:`UNREAD`."""
    if resumed is UNREAD:
        return read_head(store)
    return resumed  # type: ignore[return-value]
