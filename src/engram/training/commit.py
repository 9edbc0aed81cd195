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
from engram.errors import NonFiniteError
from engram.store import Later, RefMoves, VersionInfo
from engram.training.guard import nonfinite_paths, oversized
from engram.training.state import RngStreams

# NaN there means "no value" (an epoch row with no trained minibatch), not divergence
_NAN_MEANS_NONE = ("plugins/curves/epochs",)


class Commit:
    """The template's commit (see the module docstring)."""

    def commit(
        self,
        message: str = "",
        *,
        gate: Mapping[str, Any] | None = None,
        refs: RefMoves | None = None,
    ) -> VersionInfo | None:
        """Commit the current state now (the template also commits by itself).

        ``gate``: the regression gate's verdict, recorded in the version's meta;
        ``refs``: the refs the commit moves (see :meth:`engram.store.Store.commit`).
        Returns the version committed here (None: committed in the background, or by
        rank 0 when this is another rank).
        """
        self._check_weights()  # replicated: every rank decides alike
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
        meta["experience_bytes"] = list(self.experience_bytes)  # the ones before this
        if gate is not None:
            meta["gate"] = dict(gate)
        if self.skipped_updates:
            meta["skipped_updates"] = self.skipped_updates
        if self.accuracy_matrix and kind == "experience":
            meta["accuracy"] = self.accuracy_matrix[-1]
            meta["metrics"] = metrics.summary(self.accuracy_matrix, self.initial_accuracy)
        start = time.perf_counter()
        version = None
        if refs is not None and mid:
            raise ValueError("refs move with experience versions only")
        if self.world.size > 1:
            version = self._commit_ranks(message, meta, mid, refs)
        elif self._committer is not None and mid:
            # Staged (copied) here, persisted in the background; last_commit_seconds is
            # then the training thread's stall, last_commit_bytes follows on the next wait.
            state = self._checked(self.state_dict())
            self._committer.submit(state, self.model.state_dict(), message=message, meta=meta)
        else:
            self._wait_for_commit()
            state = self._checked(self.state_dict())
            version = self.store.commit(
                state, model=self.model, message=message, meta=meta, refs=refs
            )
            self.last_commit_bytes = version.new_bytes
        self.last_commit_seconds = time.perf_counter() - start
        if version is not None and kind == "experience":
            self.experience_bytes.append(version.new_bytes)
        self.policy.committed()
        return version

    def _commit_ranks(
        self, message: str, meta: dict[str, Any], mid: bool, refs: RefMoves | None
    ) -> VersionInfo | None:
        """The collective commit: rank 0 commits its state with every other rank's
        part (``state["ranks"]``); see :mod:`engram.distributed.sync`. Returns rank 0's
        version (None on the other ranks, or committed in the background)."""
        if not self.world.is_main:  # its part only: the rest is rank 0's (replicated)
            part = {"rng": RngStreams(cuda=self.device.type == "cuda").state_dict(),
                    "plugins": self._plugin_states()}  # fmt: skip
            sync.commit(self.world, part, self._local_samples, None, lambda gather: None)
            return None

        own = self.state_dict()  # while the other ranks stage and send theirs
        committed: list[VersionInfo] = []

        def commit(gather: Callable[[], list[dict[str, Any]]]) -> None:
            if self._committer is not None and mid:
                self._committer.submit({**own, "ranks": gather()}, self.model.state_dict(),
                                       message=message, meta=meta)  # fmt: skip
                return
            self._wait_for_commit()
            self._checked(own)  # an error here still receives every part (sync.commit)
            # the other ranks' parts are received while the weights are written
            version = self.store.commit({**own, "ranks": Later(gather)}, model=self.model,
                                        message=message, meta=meta, refs=refs)  # fmt: skip
            self.last_commit_bytes = version.new_bytes
            committed.append(version)

        part = {"rng": own["rng"], "plugins": own["plugins"]}
        sync.commit(self.world, part, None, self.store.samples, commit)
        return committed[0] if committed else None

    def _check_weights(self) -> None:
        """The guard's part on the weights (engram.training.guard): finite, and within
        ``max_abs_weight``; raises NonFiniteError, nothing committed."""
        self._check_finite_weights("committing")
        big = oversized(self.model.state_dict(), self.max_abs_weight)
        if big:
            shown = ", ".join(f"{name} ({value:.3g})" for name, value in big[:5])
            raise NonFiniteError(
                f"{self._where()}: weights beyond the bound |w| <= {self.max_abs_weight:g} "
                f"(training.max_abs_weight) in {shown}; {self._advice()}"
            )

    def _checked(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state``, once every tensor in it is finite (else NonFiniteError)."""
        bad = nonfinite_paths(state, exempt=_NAN_MEANS_NONE)
        if bad:
            raise NonFiniteError(
                f"{self._where()}: non-finite values in the state ({', '.join(bad[:5])}) "
                f"before committing; {self._advice()}"
            )
        return state
