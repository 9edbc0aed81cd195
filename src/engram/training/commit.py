"""Committing a :class:`~engram.training.template.DurableTemplate`'s state as a version.

A mixin of the template (it is not used alone): :meth:`Commit.commit` builds the
version's meta (cursor, hyperparameters, execution, metrics, the gate's verdict) and
commits the template's ``state_dict()`` with the model — in the background for a
mid-experience commit with ``async_commit``, collectively across ranks under torchrun
(rank 0 commits every rank's part: :mod:`engram.distributed.sync`). When to commit is
:class:`~engram.training.policy.CommitPolicy`'s; this is how.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from engram import metrics
from engram.distributed import sync
from engram.store import Later
from engram.training.state import RngStreams


class Commit:
    """The template's commit (see the module docstring)."""

    def commit(self, message: str = "", *, gate: Mapping[str, Any] | None = None) -> None:
        """Commit the current state now (the template also commits by itself).

        ``gate``: the regression gate's verdict, recorded in the version's meta.
        """
        self._check_finite_weights("committing")
        mid = self.cursor.mid_experience
        # a boundary cursor points at the next experience; the version is the last one's
        experience = self.cursor.experience if mid else max(self.cursor.experience - 1, 0)
        kind = "mid-experience" if mid else "experience"
        meta = {
            "experience": experience,
            "epoch": self.cursor.epoch,
            "iteration": self.cursor.iteration,
            "kind": kind,
            "strategy": self.name,
            "hparams": self.hparams(),
        }
        if self.model_spec is not None:
            meta["model_spec"] = self.model_spec
        meta.update(self.extra_meta)
        meta["execution"] = self._execution()
        if gate is not None:
            meta["gate"] = dict(gate)
        if self.skipped_updates:
            meta["skipped_updates"] = self.skipped_updates
        if self.accuracy_matrix and kind == "experience":
            meta["accuracy"] = self.accuracy_matrix[-1]
            meta["metrics"] = metrics.summary(self.accuracy_matrix, self.initial_accuracy)
        start = time.perf_counter()
        if self.world.size > 1:
            self._commit_ranks(message, meta, mid)
        elif self._committer is not None and mid:
            # Staged (copied) here, persisted in the background; last_commit_seconds is
            # then the training thread's stall, last_commit_bytes follows on the next wait.
            self._committer.submit(
                self.state_dict(), self.model.state_dict(), message=message, meta=meta
            )
        else:
            self._wait_for_commit()
            version = self.store.commit(
                self.state_dict(), model=self.model, message=message, meta=meta
            )
            self.last_commit_bytes = version.new_bytes
        self.last_commit_seconds = time.perf_counter() - start
        self.policy.committed()

    def _commit_ranks(self, message: str, meta: dict[str, Any], mid: bool) -> None:
        """The collective commit: rank 0 commits its state with every other rank's
        part (``state["ranks"]``); see :mod:`engram.distributed.sync`."""
        if not self.world.is_main:  # its part only: the rest is rank 0's (replicated)
            part = {"rng": RngStreams(cuda=self.device.type == "cuda").state_dict(),
                    "plugins": self._plugin_states()}  # fmt: skip
            sync.commit(self.world, part, self._local_samples, None, lambda gather: None)
            return

        own = self.state_dict()  # while the other ranks stage and send theirs

        def commit(gather: Callable[[], list[dict[str, Any]]]) -> None:
            if self._committer is not None and mid:
                self._committer.submit({**own, "ranks": gather()}, self.model.state_dict(),
                                       message=message, meta=meta)  # fmt: skip
                return
            self._wait_for_commit()
            # the other ranks' parts are received while the weights are written
            version = self.store.commit({**own, "ranks": Later(gather)}, model=self.model,
                                        message=message, meta=meta)  # fmt: skip
            self.last_commit_bytes = version.new_bytes

        part = {"rng": own["rng"], "plugins": own["plugins"]}
        sync.commit(self.world, part, None, self.store.samples, commit)
