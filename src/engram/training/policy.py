"""When the template commits mid-experience, and which versions it prunes afterwards."""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from engram.errors import CorruptionError, VersionNotFoundError
from engram.store import Store, VersionInfo, version_name
from engram.store.gc import Fence, prune


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
    # Where this process's commits since its last prune begin, and the older
    # mid-experience versions still kept, by experience (meta["experience"]) and id:
    # what the next prune reads instead of every manifest.
    _fence: Fence | None = field(default=None, repr=False)
    _older_mids: dict[Any, dict[int, VersionInfo]] = field(default_factory=dict, repr=False)

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

    def watch(self, store: Store) -> None:
        """Note where ``store`` (open for writing) stands before this process commits,
        so that even its first :meth:`prune` reads only what it committed (one listing
        of the store now, as the first prune would make)."""
        if not self.keep_mid_experience:
            self._remember(store, store.versions(), fence=None, stale=[])

    def prune(self, store: Store, before: set[int], index: int) -> None:
        """Drop :meth:`stale` versions; what they parented is re-linked.

        The first prune of a process (unless :meth:`watch` came first) and the first
        after a full gc or compaction list every version and run a full gc. The others
        read only the versions committed since the previous prune and delete exactly
        what only the dropped ones referenced (:func:`engram.store.gc.prune`): their
        cost does not grow with the store's history.
        """
        if self.keep_mid_experience:
            return
        fence = self._fence if self._fence is not None and self._fence.holds(store) else None
        listed = store.versions() if fence is None else self._since(store, fence, before, index)
        stale = self.stale(listed, before, index)
        try:
            if stale and (fence is None or prune(store, stale, fence) is None):
                store.gc(drop=stale)
        except CorruptionError as e:  # housekeeping: the committed version is safe
            warnings.warn(
                f"mid-experience versions {', '.join(version_name(v) for v in stale)} were "
                f"not pruned: {e}",
                stacklevel=2,
            )
            return
        self._remember(store, listed, fence, stale)

    def _remember(
        self, store: Store, listed: list[VersionInfo], fence: Fence | None, stale: list[int]
    ) -> None:
        """A new fence, and the mid-experience versions older than it still kept:
        ``listed`` (every version when ``fence`` is None) less ``stale``, just dropped."""
        if fence is None:
            self._older_mids = {}
        gone = set(stale)
        for mids in self._older_mids.values():
            for vid in gone & mids.keys():
                del mids[vid]
        for v in listed:
            if v.id not in gone and v.meta.get("kind") == "mid-experience":
                # keyed so a lookup finds what == the index (stale()'s test: 2.0 for 2);
                # an unhashable experience (a list) == no index
                with contextlib.suppress(TypeError):
                    self._older_mids.setdefault(v.meta.get("experience"), {})[v.id] = v
        self._fence = Fence.take(store)

    def _since(self, store: Store, fence: Fence, before: set[int], index: int) -> list[VersionInfo]:
        """The versions of ``before`` committed since ``fence``, and the older
        mid-experience versions of experience ``index`` (with their tags now): every
        version :meth:`stale` may return."""
        out = []
        for vid in sorted(v for v in before if v >= fence.next_version):
            try:
                out.append(store.info(vid))
            except (CorruptionError, VersionNotFoundError):
                continue  # as store.versions() leaves it out; the prune reports it
        tags_of: dict[int, list[str]] = {}
        for name, vid in store.tags().items():
            tags_of.setdefault(vid, []).append(name)
        for vid, v in sorted(self._older_mids.get(index, {}).items()):
            now = tuple(sorted(tags_of.get(vid, ())))
            out.append(v if now == v.tags else dataclasses.replace(v, tags=now))
        return out
