"""Restoring a :class:`~engram.training.template.DurableTemplate` from its store's HEAD.

A mixin of the template (it is not used alone): :meth:`Restore.restore` checks that the
run may continue the store (:mod:`engram.training.lineage`, before anything is loaded
but the head's meta), loads the state (rank 0's, or every rank's part through
:mod:`engram.distributed.sync`, dealt anew when the world size changed), replays the
model's recorded adaptations so grown modules exist, checks the architecture, then
applies weights, optimizer, plugin states, clock and RNG streams. It works on the
template's attributes (``store``, ``world``, ``model``, ``optimizer``, ``cursor``,
``_stateful_plugins()``...), which the template's ``__init__`` sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from avalanche.models.utils import avalanche_model_adaptation

from engram.distributed import sync
from engram.errors import ArchitectureMismatchError, EngramError
from engram.store import Snapshot
from engram.training import execution
from engram.training import resumed as resumed_
from engram.training.lineage import check_lineage
from engram.training.state import ClockState, RngStreams


class Restore:
    """The template's restore (see the module docstring)."""

    def restore(self, experiences: Sequence[Any] = ()) -> bool:
        """Restore HEAD of the store (once); returns False for an empty store.

        ``experiences``: every experience the run may have adapted the model to (train
        and test streams), to rebuild dynamically grown modules.
        """
        if self._restored:
            return self._has_history
        self._restored = True
        if self.world.size == 1:
            loaded = self._load_head()
            if loaded is not None and "ranks" in loaded[0]:  # written by more ranks
                state, weights = loaded
                stored = [{"rng": state["rng"], "plugins": state["plugins"]}, *state["ranks"]]
                common = {k: v for k, v in state.items() if k != "ranks"}
                loaded = {**common, **self._repartition(stored, 1)[0]}, weights
        else:
            loaded = sync.restore(self.world, self._load_head, self._read_records,
                                  self._local_samples, self._repartition)  # fmt: skip
        self._has_history = loaded is not None
        if loaded is None:
            return False
        snapshot = Snapshot(None, *loaded)  # type: ignore[arg-type]
        self._replay_adaptations(snapshot.state["adaptations"], experiences)
        self._check_architecture(snapshot.model or {})
        # The optimizer must know the grown modules' parameters before its state loads;
        # Avalanche's first make_optimizer would otherwise reset that state.
        self.make_optimizer(reset_optimizer_state=True)
        self._apply(snapshot)
        self.cursor.load_state_dict(snapshot.state["cursor"])
        metrics = snapshot.state["metrics"]
        self.accuracy_matrix = [list(row) for row in metrics["accuracy_matrix"]]
        self.skipped_updates = int(metrics.get("skipped_updates", 0))
        initial = metrics.get("initial_accuracy")
        self.initial_accuracy = list(initial) if initial is not None else None
        self._adaptations = [list(a) for a in snapshot.state["adaptations"]]
        if self.cursor.mid_experience:
            self._snapshot = snapshot  # re-applied after the resumed epoch's hooks
        return True

    def _load_head(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """HEAD's state and weights once this run may continue it (rank 0's part): HEAD
        as read once (engram.training.resumed), by the caller or now."""
        resumed, self._resumed = resumed_.take(self.store, self._resumed), None
        if resumed is None:
            return None
        head = resumed.version
        stored_hparams = head.meta.get("hparams", {})
        check_lineage(head, path=self.store.path, hparams=self.hparams(),
                      model_spec=self.model_spec, branch=self.branch,
                      experience_ids=self.extra_meta.get("experience_ids"))  # fmt: skip
        # Branching with new optimizer settings (e.g. lr): the stored optimizer state
        # would bring the old values back, so the changed ones are re-applied over it.
        stored_optimizer = stored_hparams.get("optimizer", {})
        self._branched = {
            k: v for k, v in self.hparams()["optimizer"].items()
            if k != "class" and stored_optimizer.get(k) != v
        } if self.branch else {}  # fmt: skip
        self.execution_changes = execution.warn_if_changed(
            self.store.path, head.name, head.meta.get("execution"), self._execution()
        )
        self.resumed_from = head.name
        self.experience_bytes = resumed.experience_bytes(self.store)
        return resumed.snapshot.state, resumed.snapshot.model or {}

    def _read_records(self, ids: list[int]) -> list[bytes]:
        return self.store.samples.read_records(ids)

    def _repartition(self, parts: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
        """The stored ranks' parts (another world size) as ``size`` parts: each
        plugin with a ``repartition`` (replay buffers) deals its shards anew; other
        state is replicated (rank 0's); new ranks take rank 0's RNG streams."""
        plugins = self._stateful_plugins()
        out = [{"rng": (parts[r] if r < len(parts) else parts[0])["rng"], "plugins": {}}
               for r in range(size)]  # fmt: skip
        for key in parts[0]["plugins"]:
            states = [p["plugins"].get(key, {}) for p in parts]
            split = getattr(plugins.get(key), "repartition", None)
            shards = split(states, size) if split is not None else [states[0]] * size
            for r in range(size):
                out[r]["plugins"][key] = shards[r]
        return out

    def _replay_adaptations(self, recorded: list, experiences: Sequence[Any]) -> None:
        by_key = {}
        for exp in experiences:
            by_key[(exp.origin_stream.name, exp.current_experience)] = exp
        was_training = self.model.training
        self._replaying = True
        try:
            for stream, index, training in recorded:
                exp = by_key.get((stream, index))
                if exp is None:
                    raise EngramError(
                        f"the store's model was adapted to experience {index} of stream "
                        f"{stream!r}, which this run was not given; pass the same streams"
                    )
                self.model.train(training)
                avalanche_model_adaptation(self.model, exp)
        finally:
            self._replaying = False
            self.model.train(was_training)
        self.model.to(self.device)

    def _check_architecture(self, weights: Mapping[str, torch.Tensor]) -> None:
        current = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        stored = {k: tuple(v.shape) for k, v in weights.items()}
        head = self.resumed_from or "HEAD"
        problems = [f"missing in the model: {k}" for k in sorted(stored.keys() - current.keys())]
        problems += [f"not in the store: {k}" for k in sorted(current.keys() - stored.keys())]
        problems += [
            f"{k}: model {current[k]} vs store {stored[k]}"
            for k in sorted(current.keys() & stored.keys())
            if current[k] != stored[k]
        ]
        if problems:
            raise ArchitectureMismatchError(
                f"the model does not match the checkpoint in {self._store_path} "
                f"({head}): "
                + "; ".join(problems[:20])
                + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
                + ". Use the architecture that produced the store, or a new store."
            )

    def _apply(self, snapshot: Snapshot) -> None:
        state = snapshot.state
        self.model.load_state_dict(snapshot.model or {})
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group.update({k: v for k, v in self._branched.items() if k in group})
        stored = state["plugins"]
        for key, plugin in self._stateful_plugins().items():
            if key in stored:
                plugin.load_state_dict(_to_device(stored[key], self.device))
        ClockState(self.clock).load_state_dict(state["clock"])
        RngStreams(cuda=self.device.type == "cuda").load_state_dict(state["rng"])
        self.numerics.load_state_dict(state.get("scaler") or {})


def _to_device(state: Any, device: torch.device) -> Any:
    """Floating-point tensors of a plugin's state onto the run's device (Fisher, anchors,
    a teacher); integer ones (RNG states, sample ids, counters) stay where they are."""
    if isinstance(state, torch.Tensor):
        return state.to(device) if state.is_floating_point() else state
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_device(v, device) for v in state)
    return state
