"""When the template commits mid-experience, and which versions it prunes afterwards."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

from engram.errors import CorruptionError
from engram.store import Store, VersionInfo, version_name


@dataclass
class CommitPolicy:
    """Commit every ``every_iterations`` training iterations and/or ``every_seconds``.

    Experience ends always commit; this decides the checkpoints in between. A commit
    is never due on an epoch's last iteration: the epoch's after-hooks (clock, LR
    schedule) have not run yet, so resuming there would skip them.
    """

    every_iterations: int | None = None
    every_seconds: float | None = None
    keep_mid_experience: bool = False  # keep a finished experience's checkpoints
    _last: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        if self.every_iterations is not None and self.every_iterations < 1:
            raise ValueError("commit_every_iterations must be >= 1 or None")
        if self.every_seconds is not None and not self.every_seconds >= 0:
            raise ValueError("commit_every_seconds must be >= 0 or None")

    def due(self, train_iterations: int, *, epoch_end: bool) -> bool:
        if epoch_end:
            return False
        every = self.every_iterations
        if every is not None and train_iterations % every == 0:
            return True
        return self.every_seconds is not None and self.seconds_since() >= self.every_seconds

    def committed(self) -> None:
        self._last = time.monotonic()

    def seconds_since(self) -> float:
        return time.monotonic() - self._last

    def stale(self, versions: Iterable[VersionInfo], before: set[int], index: int) -> list[int]:
        """The mid-experience versions of experience ``index`` that existed before its
        experience-end commit (``before``), untagged: what pruning drops."""
        if self.keep_mid_experience:
            return []
        return [
            v.id
            for v in versions
            if v.id in before
            and v.meta.get("kind") == "mid-experience"
            and v.meta.get("experience") == index
            and not v.tags
        ]

    def prune(self, store: Store, before: set[int], index: int) -> None:
        """Drop :meth:`stale` versions; gc re-links what they parented."""
        stale = self.stale(store.versions(), before, index)
        if not stale:
            return
        try:
            store.gc(drop=stale)
        except CorruptionError as e:  # housekeeping: the committed version is safe
            warnings.warn(
                f"mid-experience versions {', '.join(version_name(v) for v in stale)} were "
                f"not pruned: {e}",
                stacklevel=2,
            )
