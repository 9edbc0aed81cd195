"""One object commits and restores a learner's application state: :class:`Checkpointer`.

A learner (the Avalanche template, the scikit-learn learner, a plain PyTorch loop) names
everything it must get back after a restart once, as its *app state*: a mapping of
names to :class:`~engram.stateful.Stateful` objects (optimizer, plugins, RNG streams,
clock, cursor, metrics history, a replay buffer...), plus its model — an ``nn.Module``
committed as the version's safetensors checkpoint, or an :class:`ArtifactModel` (a
scikit-learn estimator as a ``.skops`` file). The Checkpointer commits it all as one
version and restores it all from HEAD, with the same call whether the commit is
synchronous, in the background (:class:`~engram.store.background.BackgroundCommitter`)
or collective across ranks (:mod:`engram.distributed.sync`: rank 0 commits every rank's
``ranked`` parts). The state layout is the app state's: ``state[name]`` is
``app_state[name].state_dict()``, so stores written before this class read the same.

An entry that is not Stateful is refused by name when the Checkpointer is built (the
plugins' own allowlist is :mod:`engram.training.app_state`).

    ckpt = Checkpointer(store, lambda: {"optimizer": opt, "cursor": cursor}, model=net)
    resumed = ckpt.restore()          # None: an empty store
    ...
    ckpt.commit({"experience": 0, "kind": "experience"}, message="after experience 0")
    ckpt.close()

The anchor is torchsnapshot / torch.distributed.checkpoint: the application state is one
explicit dict of named Stateful objects, and one object commits and restores it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from engram.distributed import World, sync
from engram.errors import EngramError
from engram.stateful import Stateful
from engram.store import Artifact, Later, RefMoves, Snapshot, Store, VersionInfo
from engram.store.background import BackgroundCommitter, stage
from engram.store.codec import Encoded
from engram.training.app_state import UnkeptStateError
from engram.training.resumed import UNREAD, Resumed, take

AppState = Mapping[str, Stateful]


class ArtifactModel(Protocol):
    """A model committed as one file rather than tensors (e.g. a skops estimator)."""

    def dump(self) -> Artifact: ...

    def load(self, data: bytes, version: VersionInfo) -> None: ...


class Checkpointer:
    """Commits and restores ``app_state`` (see the module docstring).

    Args:
        store: the open, writable store (None on the ranks other than 0 of a
            data-parallel run: rank 0 owns the store).
        app_state: the named Stateful objects, or a function returning them (called at
            each commit and restore, for a learner whose parts are replaced over time,
            such as a cursor).
        model: the model whose weights are the version's checkpoint file (or a function
            returning it, for a learner that may replace it); or
        artifact: the model as a file (:class:`ArtifactModel`). Not both.
        world: the process group (default: one process).
        ranked: the app state's names that differ by rank (RNG streams, plugin states):
            each rank commits its own; the rest is rank 0's.
        background: commit mid-experience versions in a background thread
            (:meth:`commit` ``background=True``); the training thread only copies.
        local_samples: a non-zero rank's replay samples, kept in memory until sent.
        guard: called with the state before it is committed; raises to commit nothing.
        resumed: HEAD as the caller already read it
            (:func:`engram.training.resumed.read_head`); by default :meth:`restore`
            reads it.
    """

    def __init__(
        self,
        store: Store | None,
        app_state: AppState | Callable[[], AppState],
        *,
        model: nn.Module | Callable[[], nn.Module] | None = None,
        artifact: ArtifactModel | None = None,
        world: World | None = None,
        ranked: tuple[str, ...] = sync.RANKED,
        background: bool = False,
        local_samples: Any = None,
        guard: Callable[[dict[str, Any]], None] | None = None,
        resumed: Resumed | object | None = UNREAD,
    ) -> None:
        if model is not None and artifact is not None:
            raise ValueError("a Checkpointer commits a model or an artifact, not both")
        self.store = store
        self._app_state = app_state if callable(app_state) else (lambda: app_state)
        self._model, self.artifact = model, artifact
        self.world = world if world is not None else World(0, 1, None)
        self.ranked = ranked
        self.local_samples = local_samples
        self.guard = guard
        self._resumed = resumed
        self.committer = BackgroundCommitter(store) if background and store is not None else None
        self.last_seconds: float | None = None  # the latest commit's duration (background:
        self.last_bytes: int | None = None  # the training thread's stall) and its bytes
        self.app_state()  # refuses an entry nothing keeps, now rather than at a commit

    @property
    def model(self) -> nn.Module | None:
        """The model whose weights are committed (an nn.Module is itself callable, hence
        the isinstance test first)."""
        if self._model is None or isinstance(self._model, nn.Module):
            return self._model
        return self._model()

    def app_state(self) -> dict[str, Stateful]:
        """The named Stateful objects, each checked to be Stateful."""
        named = dict(self._app_state())
        for name, part in named.items():
            if not isinstance(part, Stateful):
                raise UnkeptStateError(
                    f"app state {name!r} ({type(part).__name__}) has no state_dict/"
                    "load_state_dict: a resumed run would lose it. Make it Stateful"
                )
        return named

    def state_dict(self) -> dict[str, Any]:
        """Every entry's state, by name (the model's weights are committed beside it)."""
        return {name: part.state_dict() for name, part in self.app_state().items()}

    # ------------------------------------------------------------------ restore

    def restore(
        self,
        *,
        check: Callable[[Resumed], None] | None = None,
        prepare: Callable[[Snapshot], None] | None = None,
    ) -> Resumed | None:
        """Restore HEAD into the app state and the model; None for an empty store.

        ``check(resumed)`` runs on rank 0 once HEAD is read, before anything is applied
        (the lineage checks: it raises to refuse); ``prepare(snapshot)`` runs on every
        rank before the state is applied (e.g. growing the model's modules to the
        checkpoint's shapes). On a rank other than 0 the returned value's ``version`` is
        None: HEAD's summary is rank 0's.
        """
        read: list[Resumed] = []

        def load() -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
            resumed, self._resumed = take(self.store, self._resumed), None
            if resumed is None:
                return None
            if check is not None:
                check(resumed)
            read.append(resumed)
            return resumed.snapshot.state, resumed.snapshot.model or {}

        if self.world.size == 1:
            loaded = load()
            if loaded is not None and "ranks" in loaded[0]:  # written by more ranks
                state = loaded[0]
                stored = [sync.part(state), *state["ranks"]]
                common = {k: v for k, v in state.items() if k != "ranks"}
                loaded = {**common, **self._repartition(stored, 1)[0]}, loaded[1]
        else:
            read_records = self.store.samples.read_records if self.store is not None else None
            loaded = sync.restore(self.world, load, read_records, self.local_samples,
                                  self._repartition)  # fmt: skip
        if loaded is None:
            return None
        head = read[0].snapshot if read else None
        snapshot = Snapshot(head.version if head else None, loaded[0],  # type: ignore[arg-type]
                            loaded[1], head.artifact if head else None)  # fmt: skip
        if prepare is not None:
            prepare(snapshot)
        self.apply(snapshot)
        return Resumed(snapshot)

    def apply(self, snapshot: Snapshot) -> None:
        """Load ``snapshot`` into the model and every app state entry it holds (again
        after hooks that reset counters, for a resumed experience)."""
        if self.model is not None:
            self.model.load_state_dict(snapshot.model or {})
        if self.artifact is not None and snapshot.artifact is not None:
            self.artifact.load(snapshot.artifact, snapshot.version)
        for name, part in self.app_state().items():
            if name in snapshot.state:
                part.load_state_dict(snapshot.state[name])

    def _repartition(self, parts: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
        """The stored ranks' ``ranked`` parts (another world size) as ``size`` parts: an
        entry with ``repartition(states, size)`` (the plugins: replay buffers deal their
        shards anew) splits its own; otherwise a rank keeps its stored part, and a new
        rank takes rank 0's."""
        named = self.app_state()
        out: list[dict[str, Any]] = [{} for _ in range(size)]
        for name in self.ranked:
            states = [p[name] for p in parts]
            split = getattr(named.get(name), "repartition", None)
            shards = split(states, size) if split is not None else [
                states[r] if r < len(states) else states[0] for r in range(size)
            ]  # fmt: skip
            for r in range(size):
                out[r][name] = shards[r]
        return out

    # ------------------------------------------------------------------ commit

    def commit(
        self,
        meta: Mapping[str, Any],
        *,
        message: str = "",
        refs: RefMoves | None = None,
        background: bool = False,
    ) -> VersionInfo | None:
        """Commit the app state and the model as one version with ``meta``.

        ``background``: persist it in the background thread (with ``background=True``
        at construction; otherwise synchronously): the training thread copies the state
        and goes on. ``refs``: the refs the commit moves (see
        :meth:`engram.store.Store.commit`). Returns the version committed (None: in the
        background, or on a rank other than 0).
        """
        start = time.perf_counter()
        background = background and self.committer is not None
        if refs is not None and background:
            raise ValueError("refs move with synchronous commits only")
        if self.world.size > 1:
            version = self._commit_ranks(dict(meta), message, refs, background)
        elif background:
            state = self._guarded(self.state_dict())
            self.committer.submit(state, self._weights(), message=message, meta=meta)
            version = None
        else:
            self.wait()
            state = self._guarded(self.state_dict())
            version = self._commit_now(state, meta, message, refs)
        self.last_seconds = time.perf_counter() - start
        return version

    def _commit_now(
        self, state: dict[str, Any], meta: Mapping[str, Any], message: str, refs: RefMoves | None
    ) -> VersionInfo:
        model = {"model": self.model} if self.model is not None else {}
        if self.artifact is not None:
            model = {"artifact": self.artifact.dump()}
        version = self.store.commit(state, message=message, meta=meta, refs=refs, **model)
        self.last_bytes = version.new_bytes
        return version

    def _commit_ranks(
        self, meta: dict[str, Any], message: str, refs: RefMoves | None, background: bool
    ) -> VersionInfo | None:
        """The collective commit: rank 0 commits its state with every other rank's
        ``ranked`` parts (``state["ranks"]``), received while the weights are written;
        see :mod:`engram.distributed.sync`."""
        if not self.world.is_main:  # its part only: the rest is rank 0's (replicated)
            named = self.app_state()
            part = {name: named[name].state_dict() for name in self.ranked}
            sync.commit(self.world, part, self.local_samples, None, lambda gather: None)
            return None

        own = self.state_dict()  # while the other ranks stage and send theirs
        committed: list[VersionInfo] = []

        def commit(gather: Callable[[], list[Encoded]]) -> None:
            if background:
                self._guarded(own)  # an error here still receives every part
                # a part's places rank 0 filled hold its live tensors: staged, as own is
                ranks = [part.with_values(stage) for part in gather()]
                self.committer.submit({**own, "ranks": ranks}, self._weights(),
                                      message=message, meta=meta)  # fmt: skip
                return
            self.wait()
            self._guarded(own)  # an error here still receives every part (sync.commit)
            committed.append(self._commit_now({**own, "ranks": Later(gather)}, meta,
                                              message, refs))  # fmt: skip

        sync.commit(self.world, sync.part(own), None, self.store.samples, commit)
        return committed[0] if committed else None

    def _weights(self) -> dict[str, torch.Tensor] | None:
        if self.artifact is not None:  # no background committer takes a file today
            raise EngramError("an artifact model is committed synchronously")
        return self.model.state_dict() if self.model is not None else None

    def _guarded(self, state: dict[str, Any]) -> dict[str, Any]:
        if self.guard is not None:
            self.guard(state)
        return state

    def wait(self) -> VersionInfo | None:
        """Wait for the background commit in flight, if any (raising its error)."""
        if self.committer is None:
            return None
        version = self.committer.wait()
        if version is not None:
            self.last_bytes = version.new_bytes
        return version

    def close(self) -> None:
        """Wait for the background commit in flight, and stop the background thread."""
        if self.committer is not None:
            self.committer.close()
