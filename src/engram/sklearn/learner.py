"""A scikit-learn ``partial_fit`` learner over a continual stream, persisted in a store.

The same contract as :class:`~engram.training.template.DurableTemplate` where it
applies, so ``engram-train`` runs both through one loop (``restore``, ``fit``,
``cursor``, ``accuracy_matrix``, the regression gate, the lineage checks):

* every experience ends in one version: the estimator as a ``.skops`` artifact
  (:mod:`engram.sklearn.persist`), the replay buffer's state (its samples in the
  store's LMDB sample table), the cursor and the accuracy history;
* ``strategy=replay`` mixes buffered samples into each ``partial_fit`` call;
* the minibatch order of (experience, epoch) is derived from the run's seed and the
  replay buffer continues its own persisted RNG streams, so a run resumed in a new
  process (or after SIGKILL: the experience in progress is trained again from the last
  version) ends bit-identical to one that never stopped.

Strategies that need gradients (EWC, SI, MAS, LwF, DER, A-GEM) do not apply to
``partial_fit``: :mod:`engram.run.validation` refuses them before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from engram.errors import EngramError, NonFiniteError
from engram.signature import check_labels
from engram.sklearn import persist
from engram.sklearn.estimators import build_estimator, partial_fit
from engram.stateful import Stateful
from engram.store import Artifact, RefMoves, Store, VersionInfo
from engram.training.checkpointer import Checkpointer
from engram.training.experiences import train_experiences
from engram.training.gate import gate_refs, gate_verdict, settle_gate
from engram.training.guard import MAX_ABS_WEIGHT, estimator_problems
from engram.training.lineage import check_lineage
from engram.training.resumed import UNREAD, Resumed
from engram.training.sampler import epoch_seed
from engram.training.state import Attributes, Cursor, CursorOf, optional_list, rows
from engram.training.version_meta import version_meta


class SklearnLearner:
    """Trains a scikit-learn estimator over a stream, one version per experience.

    Args:
        spec: the estimator's spec (:mod:`engram.sklearn.estimators`).
        store: an open, writable store.
        signature: the model's signature (:mod:`engram.signature`); its ``classes`` are
            the label space given to the first ``partial_fit``.
        name: the strategy's name (``naive``, ``replay``), recorded.
        replay: the replay section (``mem_size``, ``batch_size_mem``, ``policy``,
            ``admission``), or None for naive ``partial_fit``.
        batch_size: samples per ``partial_fit`` call (before replayed ones).
        epochs: passes over each experience.
        hparams: more settings a resumed run must share (benchmark, model).
        meta: more JSON recorded in every version (e.g. the stream's experience ids).
        gate: a :class:`~engram.training.gate.RegressionGate`, or None.
        branch: continue HEAD even if the hyperparameters differ (recorded).
        max_abs_weight: the bound on ``|coef_|`` and the like beyond which a fit has
            blown up and is not committed (engram.training.guard); None: no bound.
        resumed: HEAD of ``store`` as the caller read it (engram.training.resumed);
            by default it is read when the learner restores.
    """

    def __init__(
        self,
        spec: Mapping[str, Any],
        store: Store,
        *,
        signature: Mapping[str, Any],
        name: str = "naive",
        replay: Mapping[str, Any] | None = None,
        batch_size: int = 32,
        epochs: int = 1,
        seed: int = 0,
        hparams: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        gate: Any = None,
        branch: bool = False,
        max_abs_weight: float | None = MAX_ABS_WEIGHT,
        resumed: Resumed | object | None = UNREAD,
    ) -> None:
        self.spec = dict(spec)
        self.experience_bytes: list[int] = []  # as the template's (engram.training.resumed)
        self.resumed_from: str | None = None  # the name of the version resumed
        self.max_abs_weight = max_abs_weight
        self.estimator = build_estimator(spec)
        self.store = store
        self.signature = dict(signature)
        self.classes = np.asarray(self.signature["classes"])
        self.name = name
        self.replay = dict(replay) if replay is not None else None
        self.batch_size, self.epochs, self.seed = batch_size, epochs, seed
        self.extra_hparams = dict(hparams or {})
        self.extra_meta = dict(meta or {})
        self.gate, self.branch = gate, branch
        self.buffer = None
        if self.replay is not None:
            from engram.memory.replay import ReplayBuffer

            r = self.replay
            draw = r.get("draw", "with_replacement")
            self.buffer = ReplayBuffer(store, r["mem_size"], r["policy"], seed, draw)
        self.cursor = Cursor()
        self.accuracy_matrix: list[list[float]] = []
        self.initial_accuracy: list[float] | None = None  # an unfitted estimator predicts nothing
        self._restored = self._has_history = False
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.checkpointer = Checkpointer(store, self.app_state, artifact=_EstimatorFile(self),
                                         resumed=resumed)  # fmt: skip

    def app_state(self) -> dict[str, Stateful]:
        """Everything committed beside the estimator, by name (each version's state)."""
        parts: dict[str, Stateful] = {
            "cursor": CursorOf(self),
            "metrics": Attributes(self, {"accuracy_matrix": ("accuracy_matrix", rows),
                                         "initial_accuracy": ("initial_accuracy",
                                                              optional_list)}),
        }  # fmt: skip
        if self.buffer is not None:
            parts["replay"] = self.buffer
        return parts

    @property
    def last_commit_seconds(self) -> float | None:
        return self.checkpointer.last_seconds

    @property
    def last_commit_bytes(self) -> int | None:
        return self.checkpointer.last_bytes

    def __enter__(self) -> SklearnLearner:
        return self

    def __exit__(self, *exc: object) -> None:
        pass  # the store is the caller's

    def hparams(self) -> dict[str, Any]:
        """Everything that must not silently change between a run and its resumption."""
        plugins = {}
        if self.replay:  # the default draw is left out, as stores before it have no draw
            replay = {k: v for k, v in self.replay.items()
                      if (k, v) != ("draw", "with_replacement")}  # fmt: skip
            plugins = {"replay": dict(replay, seed=self.seed)}
        return {
            "strategy": self.name,
            "train_mb_size": self.batch_size,
            "train_epochs": self.epochs,
            "seed": self.seed,
            "plugins": plugins,
            **self.extra_hparams,
        }

    # ------------------------------------------------------------------ restore

    def restore(self, experiences: Sequence[Any] = ()) -> bool:
        """Restore HEAD of the store (once); returns False for an empty store."""
        if self._restored:
            return self._has_history
        self._restored = True
        self._has_history = self.checkpointer.restore(check=self._continues) is not None
        return self._has_history

    def _continues(self, resumed: Resumed) -> None:
        """HEAD read: may this run continue it (engram.training.lineage), and does it
        hold an estimator?"""
        head = resumed.version
        self.resumed_from = head.name
        check_lineage(head, path=self.store.path, hparams=self.hparams(), model_spec=self.spec,
                      experience_ids=self.extra_meta.get("experience_ids"),
                      branch=self.branch)  # fmt: skip
        self.experience_bytes = resumed.experience_bytes(self.store)
        recorded = head.meta.get("sklearn", {}).get("versions")
        if resumed.snapshot.artifact is None or recorded is None:
            raise EngramError(f"{self.store.path} {head.name} holds no scikit-learn estimator")

    # ------------------------------------------------------------------ training

    def fit(
        self,
        train_stream: Sequence[Any],
        test_stream: Sequence[Any] | None = None,
        *,
        max_experiences: int | None = None,
        on_experience: Callable[[int, list[float]], None] | None = None,
    ) -> list[list[float]]:
        """Train every experience not yet trained, evaluate, commit each; returns the
        accuracy matrix (row i: accuracies on the test stream after experience i)."""
        train_list, test_list = list(train_stream), list(test_stream or [])
        self.restore(train_list + test_list)
        return train_experiences(self, train_list, test_list, max_experiences, on_experience)

    def train_experience(self, index: int, experience: Any) -> None:
        """``partial_fit`` over one experience: ``epochs`` passes in seeded minibatches,
        each with a replayed minibatch mixed in once the buffer holds samples."""
        import torch

        x, y = self._data(experience)
        check_labels(self.signature, np.unique(y), where=f"experience {index}")
        replay = self.replay or {}
        for epoch in range(self.epochs):
            order = np.random.default_rng(epoch_seed(self.seed, index, epoch)).permutation(len(y))
            for start in range(0, len(y), self.batch_size):
                batch = order[start : start + self.batch_size]
                xb, yb = x[batch], y[batch]
                if self.buffer is not None and len(self.buffer):
                    mem = self.buffer.sample(replay["batch_size_mem"] or len(batch))
                    xb = np.concatenate([xb, mem["x"].numpy()])
                    yb = np.concatenate([yb, mem["y"].numpy()])
                self._partial_fit(xb, yb, index)
                if self.buffer is not None and replay["admission"] == "stream":
                    self.buffer.add(torch.from_numpy(x[batch]), torch.from_numpy(y[batch]),
                                    experience=index)  # fmt: skip
        if self.buffer is not None and replay["admission"] == "experience_end":
            for start in range(0, len(y), 1024):
                self.buffer.add(
                    torch.from_numpy(x[start : start + 1024]),
                    torch.from_numpy(y[start : start + 1024]),
                    experience=index,
                )
        self.cursor = Cursor(experience=index + 1)

    def _partial_fit(self, x: np.ndarray, y: np.ndarray, index: int) -> None:
        try:
            partial_fit(self.estimator, x, y, self.classes)
        except ValueError as e:  # scikit-learn's own check of the data, e.g. MultinomialNB's
            why = " ".join(str(e).split())
            # its parameter check raises InvalidParameterError (a ValueError) at the first
            # fit: the user's model.args, not the data
            if type(e).__name__ == "InvalidParameterError":
                raise EngramError(f"model.args: {why} (fix +model.args.*)") from None
            raise EngramError(
                f"experience {index}: {type(self.estimator).__name__}.partial_fit refused the "
                f"data: {why}"
            ) from None

    def evaluate(self, test_stream: Sequence[Any]) -> list[float]:
        """Accuracy of the estimator on each test experience."""
        out = []
        for experience in test_stream:
            x, y = self._data(experience)
            out.append(float(np.mean(self.estimator.predict(x) == y)) if len(y) else 0.0)
        return out

    def _data(self, experience: Any) -> tuple[np.ndarray, np.ndarray]:
        """An experience's samples as arrays (x flattened to the signature's shape)."""
        key = id(experience)
        if key not in self._arrays:
            import torch
            from torch.utils.data import DataLoader

            xs, ys = [], []
            for batch in DataLoader(experience.dataset, batch_size=4096, shuffle=False):
                xs.append(batch[0])
                ys.append(batch[1])
            x = torch.cat(xs).reshape(-1, *self.signature["input"]["shape"])
            self._arrays[key] = (x.numpy(), torch.cat(ys).to(torch.int64).numpy())
        return self._arrays[key]

    # ------------------------------------------------------------------ commit

    def commit(
        self, index: int, gate: Mapping[str, Any] | None = None, refs: RefMoves | None = None
    ) -> VersionInfo:
        """Commit the state after experience ``index``: estimator, buffer, history
        (``refs``: the refs the commit moves, see :meth:`engram.store.Store.commit`).
        A diverged estimator (engram.training.guard) raises NonFiniteError instead."""
        problem = estimator_problems(self.estimator, self.max_abs_weight)
        if problem is not None:
            head = self.store.head
            raise NonFiniteError(
                f"experience {index}: {problem}; the model diverged and nothing was committed "
                f"from it (HEAD stays {'on ' + head.name if head else 'where it was'}). Lower "
                "the learning rate (eta0, learning_rate_init) or check the estimator's settings"
            )
        versions = persist.library_versions()
        meta = version_meta(
            self.cursor, strategy=self.name, hparams=self.hparams(),
            execution={"library": "scikit-learn", "world_size": 1, **versions},
            experience_bytes=self.experience_bytes, accuracy_matrix=self.accuracy_matrix,
            model_spec=self.spec, gate=gate,
            extra={**self.extra_meta, "signature": self.signature,
                   "sklearn": {"versions": versions,
                               "estimator": type(self.estimator).__name__}},
        )  # fmt: skip
        version = self.checkpointer.commit(meta, refs=refs, message=f"after experience {index}")
        self.experience_bytes.append(version.new_bytes)
        return version

    def finish_experience(self, index: int) -> str | None:
        """Commit experience ``index``'s version, then the gate (see engram.training.gate)."""
        failures, verdict = gate_verdict(self.gate, self.accuracy_matrix)
        version = self.commit(index, gate=verdict, refs=gate_refs(self.gate, self.store, failures))
        return settle_gate(self.store, version, index, failures)


class _EstimatorFile:
    """The learner's estimator as the version's artifact file (engram.sklearn.persist)."""

    def __init__(self, learner: SklearnLearner) -> None:
        self.learner = learner

    def dump(self) -> Artifact:
        return Artifact(persist.FORMAT, persist.dumps(self.learner.estimator))

    def load(self, data: bytes, version: VersionInfo) -> None:
        recorded = version.meta["sklearn"]["versions"]
        what = f"{self.learner.store.path} {version.name}"
        self.learner.estimator = persist.loads(data, recorded, what=what)
