"""DurableTemplate: an Avalanche training template whose whole state lives in a store.

    strategy = DurableTemplate(model=net, optimizer=SGD(net.parameters(), lr=0.1),
                               store="runs/ewc", plugins=[EWCPlugin(ewc_lambda=10)])
    matrix = strategy.fit(benchmark.train_stream, benchmark.test_stream)

Run the same lines in a new process (or after a crash) and ``fit`` continues where the
store's HEAD stopped: experiences already trained are skipped, an interrupted
experience resumes at the exact epoch and minibatch, and the result is bit-identical
(on CPU, deterministic ops) to a run that never stopped.

What is committed, and why each part is needed for that guarantee:

* model weights (the checkpoint file) and the sequence of model adaptations the run
  performed, replayed on restore so dynamically grown modules (multi-head or
  incremental classifiers) exist, in the same order, before the weights load;
* optimizer state (momentum, Adam moments) and LR-scheduler state;
* every Stateful plugin's ``state_dict()`` (EWC's Fisher and anchors, SI's path
  integral, a replay buffer's slot table...);
* the torch, numpy and Python RNG streams; Avalanche's clock; the cursor (experience,
  epoch, minibatch); the accuracy matrix that forgetting is computed from;
* the hyperparameters, so a resume with different ones is refused unless the user
  asks to branch.

Plugins' ``before_training_exp``/``before_training_epoch`` hooks run again when an
experience resumes mid-way (they rebuild transient things such as data loaders); the
committed state is applied after them, so hooks that reset counters cannot undo it.

All of it is the template's *app state* (:meth:`DurableTemplate.app_state`: one mapping of
named Stateful parts), which one :class:`~engram.training.checkpointer.Checkpointer`
commits and restores — synchronously, in the background or across ranks behind the same
call. The template adds only what is Avalanche's: the hooks, the lineage and architecture
checks before a restore applies, and the meta of each version. The parts that stand alone
live in the sibling modules state, adaptations, lineage, policy, gate, numerics,
execution and sampler. (Over the 400-line budget on purpose: the class overrides a dozen
Avalanche hooks that share the cursor and the snapshot being resumed.)
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.utils.data import DataLoader

from engram import distributed
from engram.distributed import sync, wire
from engram.distributed.reduce import all_true, average_gradients, broadcast_module, sum_counts
from engram.distributed.state import LocalSamples
from engram.errors import EngramError, GateFailed, NonFiniteError
from engram.stateful import Stateful
from engram.store import RefMoves, Snapshot, Store, VersionInfo
from engram.strategies import avalanche_state
from engram.training import execution
from engram.training.adaptations import Adaptations, check_architecture
from engram.training.app_state import PluginStates
from engram.training.batches import BatchesCache, as_is, tensor_batches
from engram.training.checkpointer import Checkpointer
from engram.training.experiences import train_experiences
from engram.training.gate import RegressionGate, gate_refs, gate_verdict, settle_gate
from engram.training.guard import MAX_ABS_WEIGHT, nonfinite_paths, oversized
from engram.training.lineage import check_lineage
from engram.training.numerics import Precision, finite_step, nonfinite_weights
from engram.training.policy import CommitPolicy
from engram.training.resumed import UNREAD, Resumed
from engram.training.sampler import ResumableBatchSampler, epoch_seed
from engram.training.state import (
    Attributes,
    ClockState,
    Cursor,
    CursorOf,
    OptimizerState,
    RngStreams,
    count,
    optional_list,
    rows,
)
from engram.training.version_meta import version_meta

# NaN there means "no value" (an epoch row with no trained minibatch), not divergence
_NAN_MEANS_NONE = ("plugins/curves/epochs",)


class AccuracyRecorder(SupervisedPlugin):
    """Counts correct predictions during ``eval``, with no logging: the evaluation the
    template runs, usable on a plain Avalanche strategy too (comparisons against it)."""

    engram_transient = ("correct", "seen")  # one evaluation's counts

    def __init__(self) -> None:
        super().__init__()
        self.correct = 0
        self.seen = 0

    def before_eval_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.correct = self.seen = 0

    def after_eval_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self.correct += int((strategy.mb_output.argmax(dim=-1) == strategy.mb_y).sum())
        self.seen += len(strategy.mb_y)

    def accuracy_matrix(self, strategy: Any, train_stream: Any, test_stream: Any) -> list:
        """Train ``strategy`` (holding this plugin) on each experience, evaluating every
        test experience after each: row i, the accuracies after experience i."""
        matrix = []
        for exp in train_stream:
            strategy.train(exp)
            row = []
            for test in test_stream:
                strategy.eval(test)
                row.append(self.correct / max(self.seen, 1))
            matrix.append(row)
        return matrix


class DurableTemplate(SupervisedTemplate):
    """Avalanche's supervised template, restored from and committed to an engram store.

    Args:
        model, optimizer, criterion, train_mb_size, train_epochs, eval_mb_size, device,
            plugins: as for Avalanche's ``SupervisedTemplate``.
        store: a :class:`~engram.store.Store` opened for writing, or a directory
            (created if missing, opened for writing; closed by :meth:`close`).
        seed: the data-order seed (each epoch's shuffle derives from it).
        commit_every_iterations: also commit every N training iterations (None: only
            at the end of each experience).
        commit_every_seconds: also commit when this many seconds passed since the last.
        keep_mid_experience: keep the mid-experience versions of a finished experience
            (default: they are deleted once the experience's own version is committed).
        async_commit: persist mid-experience checkpoints in a background thread while
            training continues (see :mod:`engram.store.background`): the training thread
            only copies the state; at most one commit is in flight, and the next commit
            waits for it. Experience-end commits stay synchronous (they wait for the one
            in flight first), so ``fit`` returns with everything durable; ``close`` waits.
            An error of a background commit is raised by the next commit or ``close``.
        hparams: extra hyperparameters recorded with, and checked against, the store.
        branch: resume even if the hyperparameters differ from the store's lineage.
        name: the strategy's name, recorded in every version.
        model_spec: how to rebuild the model, ``{"name": ..., "args": {...}}`` (see
            :mod:`engram.models`), recorded in every version so
            :func:`engram.load_model` can rebuild it for inference.
        meta: extra JSON metadata recorded in every version (e.g. what the stream's
            experiences are).
        gate: a :class:`~engram.training.gate.RegressionGate` decided when each
            experience ends, before its version is committed and before mid-experience
            versions are pruned; a failure raises :class:`~engram.errors.GateFailed`
            with HEAD moved off the failed version (build a new template to go on).
        nonfinite: what a non-finite loss or gradient does: ``"stop"`` (default) raises
            :class:`~engram.errors.NonFiniteError` before anything more is committed, so
            HEAD stays on the last finite version; ``"skip"`` skips that minibatch's
            update (as mixed-precision scalers do) and counts it. Weights are checked
            before every commit and evaluation either way, and every tensor of the
            state before every commit (engram.training.guard).
        max_abs_weight: a version whose largest ``|weight|`` exceeds this is a finite
            blow-up and is not committed (NonFiniteError); None: no bound. The default's
            reason: :data:`engram.training.guard.MAX_ABS_WEIGHT`.
        resumed: HEAD of ``store`` as the caller already read it
            (:func:`engram.training.resumed.read_head`; None: the store has no HEAD), so
            a resume reads it once; by default the template reads it when it restores.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        store: Store | str | Path,
        criterion: nn.Module | None = None,
        train_mb_size: int = 32,
        train_epochs: int = 1,
        eval_mb_size: int = 256,
        device: str | torch.device = "cpu",
        plugins: Sequence[Any] = (),
        seed: int = 0,
        commit_every_iterations: int | None = None,
        commit_every_seconds: float | None = None,
        keep_mid_experience: bool = False,
        hparams: Mapping[str, Any] | None = None,
        branch: bool = False,
        name: str = "naive",
        model_spec: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        async_commit: bool = False,
        gate: RegressionGate | None = None,
        nonfinite: str = "stop",
        precision: str = "32",
        max_abs_weight: float | None = MAX_ABS_WEIGHT,
        resumed: Resumed | object | None = UNREAD,
    ) -> None:
        """Arguments: see the class. Long because it sets every attribute that the hooks
        share, each with its comment."""
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', not {nonfinite!r}")
        self._recorder = AccuracyRecorder()
        with warnings.catch_warnings():  # "no loggers": on purpose, metrics are ours
            warnings.simplefilter("ignore", UserWarning)
            evaluator = EvaluationPlugin(loggers=[])
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else nn.CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=execution.resolve_device(device),
            plugins=[*plugins, self._recorder],
            evaluator=evaluator,
            eval_every=-1,
        )
        # refuses, by name, a plugin whose memory nothing keeps (engram.training.app_state)
        self._plugins = PluginStates(self._user_plugins, self, self.device)
        # Avalanche's own (experimental) distributed mode checks plugins for its flag;
        # engram distributes the run itself (engram.distributed), so that check is moot.
        self._distributed_check = True
        self.policy = CommitPolicy(commit_every_iterations, commit_every_seconds,
                                   keep_mid_experience)  # fmt: skip
        # Data-parallel (inside a process group): rank 0 owns the store; the other ranks
        # keep their replay samples in memory and send their part at each commit.
        self.world = distributed.world()
        self._refuse_avalanche_plugins_across_ranks()
        main = self.world.is_main
        self._store_path = Path(store.path if isinstance(store, Store) else store)
        self._owns_store = main and not isinstance(store, Store)
        self.store: Store | None = None
        if main:
            self.store = Store.open(store, mode="c") if self._owns_store else store
        self._local_samples = None if main else LocalSamples()
        # Every rank starts from rank 0's model, broadcast on the device it trains on
        # (NCCL moves CUDA tensors only; Avalanche would move it there in train() anyway).
        self.model.to(self.device)
        broadcast_module(self.model, self.world)
        self.seed = seed
        self.branch = branch
        self.name = name
        self.model_spec = _jsonable(dict(model_spec)) if model_spec is not None else None
        self.extra_hparams = dict(hparams or {})
        self.extra_meta = _jsonable(dict(meta)) if meta is not None else {}
        self.gate = gate
        self.nonfinite = nonfinite
        self.max_abs_weight = max_abs_weight
        self.numerics = Precision(precision, self.device)
        self.execution_changes: list[str] = []  # recorded settings a resume differs in
        self.skipped_updates = 0  # minibatches whose update nonfinite="skip" dropped
        self.cursor = Cursor()
        self.accuracy_matrix: list[list[float]] = []
        # accuracy of the untrained model on each test experience (the FWT baseline)
        self.initial_accuracy: list[float] | None = None
        self.adaptations = Adaptations()  # the modules grown, to grow again on restore
        self._snapshot: Snapshot | None = None  # the state being resumed, until applied
        self.resumed_from: str | None = None  # the name of the version resumed
        # bytes each experience's commit wrote, recorded in every version's meta (so a
        # resume's TensorBoard history needs no listing of the store)
        self.experience_bytes: list[int] = []
        self._restored = False
        self._has_history = False
        self._branched: dict[str, Any] = {}  # optimizer settings a branch changed
        self._in_fit = False
        self._eval_batches = BatchesCache()  # the test experiences, read once
        self.checkpointer = Checkpointer(
            self.store, self.app_state, model=lambda: self.model, world=self.world,
            background=async_commit, local_samples=self._local_samples,
            guard=self._check_state, resumed=resumed,
        )  # fmt: skip

    # --------------------------------------------------------------- public API

    def fit(
        self,
        train_stream: Iterable[Any],
        test_stream: Iterable[Any] | None = None,
        *,
        max_experiences: int | None = None,
        on_experience: Callable[[int, list[float]], None] | None = None,
    ) -> list[list[float]]:
        """Train on every experience of ``train_stream`` not yet trained, evaluating on
        ``test_stream`` after each, and commit each experience with its accuracies.

        Args:
            max_experiences: train at most this many (not yet trained) experiences now.
            on_experience: called with (index, accuracy row) after each experience's commit.

        Returns:
            The accuracy matrix: row i holds the accuracy on each test experience after
            training experience i.
        """
        train_list = list(train_stream)
        test_list = list(test_stream) if test_stream is not None else []
        self.restore(train_list + test_list)
        fresh = self.cursor.experience == 0 and not self.cursor.mid_experience
        if fresh and self.initial_accuracy is None and test_list:
            self.initial_accuracy = self.evaluate(test_list)
        self._in_fit = True
        try:
            train_experiences(self, train_list, test_list, max_experiences, on_experience)
        finally:
            self._in_fit = False
        self.checkpointer.wait()
        return self.accuracy_matrix

    def train_experience(self, index: int, experience: Any) -> None:
        """Train experience ``index`` of the stream (Avalanche's ``train``, resumable)."""
        self.cursor.experience = index
        self.train(experience)

    def evaluate(self, test_stream: Iterable[Any]) -> list[float]:
        """Accuracy of the current model on each experience of ``test_stream``
        (data-parallel: each rank counts its shard; the counts are summed, exactly)."""
        self._check_finite_weights("evaluating")  # argmax of NaN is class 0, not a score
        counts = []
        for experience in test_stream:
            self.eval(experience)
            counts += [self._recorder.correct, self._recorder.seen]
        counts = sum_counts(counts, self.world)
        return [c / max(n, 1) for c, n in zip(counts[::2], counts[1::2], strict=True)]

    @property
    def samples(self) -> Any:
        """Where replay buffers write samples: the store's table (rank 0), or this
        rank's :class:`~engram.distributed.state.LocalSamples`."""
        return self.store.samples if self.store is not None else self._local_samples

    def close(self) -> None:
        """Wait for a background commit in flight (and, on rank 0 of a data-parallel
        run, for the last commit's outcome to reach the other ranks), then close the
        store if this template opened it."""
        try:
            self.checkpointer.close()
            if self.world.size > 1:
                wire.settle()  # before the caller may destroy the process group
        finally:
            if self._owns_store:
                self.store.close()

    @property
    def last_commit_seconds(self) -> float | None:
        """The latest commit's duration (a background one's: the training thread's stall)."""
        return self.checkpointer.last_seconds

    @property
    def last_commit_bytes(self) -> int | None:
        """The bytes the latest commit wrote (a background one's: once it is waited for)."""
        return self.checkpointer.last_bytes

    def __enter__(self) -> DurableTemplate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------- state

    def hparams(self) -> dict[str, Any]:
        """Everything that must not silently change between a run and its resumption."""
        plugins = {}
        for key, plugin in self.named_plugins().items():
            if hasattr(plugin, "hparams"):
                plugins[key] = plugin.hparams()
        optimizer = {
            k: v for k, v in self.optimizer.defaults.items() if isinstance(v, int | float | str)
        }
        return _jsonable(
            {
                "strategy": self.name,
                "optimizer": {"class": type(self.optimizer).__name__, **optimizer},
                "train_mb_size": self.train_mb_size,
                "train_epochs": self.train_epochs,
                "seed": self.seed,
                "plugins": plugins,
                **self.extra_hparams,
            }
        )

    def _refuse_avalanche_plugins_across_ranks(self) -> None:
        """Avalanche's plugins keep one process's memory (a buffer, importances): across
        ranks each would hold a different one, which no commit merges."""
        if self.world.size == 1:
            return
        adapted = [k for k, p in self.named_plugins().items()
                   if isinstance(p, avalanche_state.AvalancheAdapter)]  # fmt: skip
        if adapted:
            raise EngramError(
                f"Avalanche's plugins ({', '.join(adapted)}) keep one process's memory and "
                f"cannot train data-parallel ({self.world.size} ranks); use engram's own "
                "strategies under torchrun (docs/distributed.md) or train on one process"
            )

    def named_plugins(self) -> dict[str, Stateful]:
        """The plugins' named state, ``{key: Stateful}`` (engram.training.app_state: an
        allowlist, so a plugin whose state nothing keeps is refused by name)."""
        return self._plugins.named()

    def _user_plugins(self) -> tuple[Any, ...]:
        """The plugins the run was given (and Avalanche's own), not the template's."""
        return tuple(p for p in self.plugins if p is not self._recorder and p is not self.clock)

    def app_state(self) -> dict[str, Stateful]:
        """Everything the template commits beside the model weights, by name: the
        layout of every version's state (``state/<name>/...``)."""
        parts: dict[str, Stateful] = {
            "optimizer": OptimizerState(self.optimizer, lambda: self._branched),
            "plugins": self._plugins,
            "rng": RngStreams(cuda=self.device.type == "cuda"),
            "clock": ClockState(self.clock),
            "cursor": CursorOf(self),
            "adaptations": self.adaptations,
            "metrics": Attributes(self, {
                "accuracy_matrix": ("accuracy_matrix", rows),
                "initial_accuracy": ("initial_accuracy", optional_list),
                "skipped_updates": ("skipped_updates", count),
            }),
        }  # fmt: skip
        if self.numerics.scaler:
            parts["scaler"] = self.numerics
        return parts

    def state_dict(self) -> dict[str, Any]:
        """The template's whole state except the model weights (committed separately)."""
        return self.checkpointer.state_dict()

    # ------------------------------------------------------------ restore, commit

    def restore(self, experiences: Sequence[Any] = ()) -> bool:
        """Restore HEAD of the store (once); returns False for an empty store.

        ``experiences``: every experience the run may have adapted the model to (train
        and test streams), to rebuild dynamically grown modules.
        """
        if self._restored:
            return self._has_history
        self._restored = True

        def prepare(snapshot: Snapshot) -> None:
            if self.world.size > 1 and self.branch:
                # rank 0 alone read HEAD's meta (_continues): every rank re-applies the
                # optimizer settings the branch changed over the same stored state
                self._branched = wire.broadcast(self._branched, 0, self.world.group)
            self.adaptations.replay(self.model, snapshot.state["adaptations"], experiences)
            self.model.to(self.device)
            check_architecture(self.model, snapshot.model or {}, str(self._store_path),
                               self.resumed_from or "HEAD")  # fmt: skip
            # The optimizer must know the grown modules' parameters before its state
            # loads; Avalanche's first make_optimizer would otherwise reset that state.
            self.make_optimizer(reset_optimizer_state=True)

        resumed = self.checkpointer.restore(check=self._continues, prepare=prepare)
        self._has_history = resumed is not None
        if resumed is not None and self.cursor.mid_experience:
            self._snapshot = resumed.snapshot  # applied again after the epoch's hooks
        return self._has_history

    def _continues(self, resumed: Resumed) -> None:
        """Rank 0, HEAD read: may this run continue it (engram.training.lineage)? And what
        it changes: a branch's optimizer settings, the execution settings."""
        head = resumed.version
        stored_hparams = head.meta.get("hparams", {})
        check_lineage(head, path=self._store_path, hparams=self.hparams(),
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
            self._store_path, head.name, head.meta.get("execution"), self._execution()
        )
        self.resumed_from = head.name
        self.experience_bytes = resumed.experience_bytes(self.store)

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
        if refs is not None and mid:
            raise ValueError("refs move with experience versions only")
        # only rank 0 commits a version: the other ranks send their parts, never a meta
        meta = version_meta(
            self.cursor, strategy=self.name, hparams=self.hparams(),
            execution=self._execution(), experience_bytes=self.experience_bytes,
            accuracy_matrix=self.accuracy_matrix, initial_accuracy=self.initial_accuracy,
            model_spec=self.model_spec, extra=self.extra_meta, gate=gate,
            skipped_updates=self.skipped_updates,
        ) if self.world.is_main else {}  # fmt: skip
        # a mid-experience version in the background (async_commit): the training thread
        # only copies; an experience's version is durable when this returns
        version = self.checkpointer.commit(meta, message=message, refs=refs, background=mid)
        if version is not None and not mid:
            self.experience_bytes.append(version.new_bytes)
        self.policy.committed()
        return version

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

    def _check_state(self, state: dict[str, Any]) -> None:
        """The guard's part on the state: every tensor in it finite (else NonFiniteError)."""
        bad = nonfinite_paths(state, exempt=_NAN_MEANS_NONE)
        if bad:
            raise NonFiniteError(
                f"{self._where()}: non-finite values in the state ({', '.join(bad[:5])}) "
                f"before committing; {self._advice()}"
            )

    def _execution(self) -> dict[str, Any]:
        return execution.settings(self.device, self.numerics.name)

    def _check_finite_weights(self, doing: str) -> None:
        bad = nonfinite_weights(self.model)
        if bad:
            raise NonFiniteError(
                f"{self._where()}: non-finite weights in {', '.join(bad[:5])} before "
                f"{doing}; {self._advice()}"
            )

    def _where(self) -> str:
        c = self.cursor
        return f"experience {c.experience}, epoch {c.epoch}, iteration {c.iteration}"

    def _advice(self) -> str:
        head = self.store.head if self.store is not None else None
        kept = f"HEAD stays on {head.name}" if head is not None else "HEAD stays where it was"
        return (
            f"the model diverged and nothing was committed from it ({kept}). Lower the "
            "learning rate or check the strategy's settings; nonfinite='skip' "
            "(training.nonfinite=skip) skips such minibatches instead"
        )

    # ------------------------------------------------- hooks into the Avalanche loop

    def forward(self) -> Any:
        with self.numerics.autocast():
            return super().forward()

    def criterion(self) -> Any:
        with self.numerics.autocast():
            return super().criterion()

    def backward(self) -> None:
        self.numerics.backward(self.loss, retain_graph=self.retain_graph)
        # Data-parallel: the (fp16: still scaled) gradients are averaged before they are
        # unscaled, so every rank's scaler finds the same overflow in the same gradients.
        average_gradients(self.model.parameters(), self.world)
        self.numerics.unscale(self.optimizer)  # plugins after backward see true gradients

    def optimizer_step(self) -> None:
        loss_finite = bool(torch.isfinite(self.loss.detach()).all())
        # fp16: the scaler skips steps with inf/NaN gradients (and lowers its scale), so
        # only a non-finite loss is the run's problem; otherwise the gradients are too.
        if self.numerics.scaler is not None:
            finite = loss_finite
        else:
            finite = finite_step(self.loss, self.model.parameters())
        # The loss is this rank's own: every rank steps, skips or stops if any one must.
        local, finite = finite, all_true(finite, self.world)
        if finite:
            self.numerics.step(self.optimizer)
            return
        if self.nonfinite == "skip":
            self.optimizer.zero_grad()
            self.numerics.skip()
            self.skipped_updates += 1
            return
        what = "loss of another rank" if local else "gradient norm" if loss_finite else "loss"
        raise NonFiniteError(
            f"{self._where()}: the {what} is not finite ({float(self.loss.detach()):.4g} loss); "
            f"{self._advice()}"
        )

    def model_adaptation(self, model: nn.Module | None = None) -> nn.Module:
        if self.experience is not None:
            self.adaptations.record(self.experience, bool(self.is_training))
        return super().model_adaptation(model)

    def make_train_dataloader(
        self, num_workers: int = 0, shuffle: bool = True, pin_memory: bool | None = None,
        persistent_workers: bool = False, drop_last: bool = False, **kwargs: Any,
    ) -> None:  # fmt: skip
        # Replaces Avalanche's loaders (shuffled by the global RNG) with one whose order
        # is a function of (seed, experience, epoch): see engram.training.sampler.
        dataset = self.adapted_dataset
        sampler = ResumableBatchSampler(len(dataset), self.train_mb_size, self.seed,
                                        self.cursor.experience, drop_last,
                                        self.world.rank, self.world.size)  # fmt: skip
        # A tensor stream is read once, each minibatch an index_select (the same values):
        # engram.training.batches. Otherwise Avalanche's per-sample fetch.
        fast = tensor_batches(dataset)
        # Its own generator: a DataLoader draws its workers' base seed from the global
        # RNG each epoch otherwise, one draw a resumed epoch would repeat.
        self.dataloader = DataLoader(
            fast if fast is not None else dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=as_is if fast is not None else getattr(dataset, "collate_fn", None),
            pin_memory=bool(pin_memory),
            generator=torch.Generator(),  # seeded per epoch in _train_exp
        )

    def make_eval_dataloader(self, num_workers: int = 0, **kwargs: Any) -> None:
        dataset = self.adapted_dataset
        fast = self._eval_batches.get(dataset)  # read once per test experience
        if self.world.size == 1 and fast is None:
            return super().make_eval_dataloader(num_workers=num_workers, **kwargs)
        # data-parallel: this rank's shard, counts summed
        sampler = self.world.shard(len(dataset)) if self.world.size > 1 else None
        self.dataloader = DataLoader(
            fast if fast is not None else dataset, batch_size=self.eval_mb_size,
            sampler=sampler, num_workers=num_workers,
            collate_fn=as_is if fast is not None else getattr(dataset, "collate_fn", None),
        )  # fmt: skip
        return None

    def _train_exp(self, experience: Any, eval_streams: Any = None, **kwargs: Any) -> None:
        start_epoch = self.cursor.epoch
        for epoch in range(start_epoch, self.train_epochs):
            resuming = epoch == start_epoch and self._snapshot is not None
            start = self.cursor.iteration if resuming else 0
            self.cursor.epoch, self.cursor.iteration = epoch, start
            self.dataloader.batch_sampler.set_epoch(epoch, start)
            # Workers' base seed (data augmentation in workers) per epoch, not per process.
            self.dataloader.generator.manual_seed(
                epoch_seed(self.seed, self.cursor.experience, epoch)
            )
            self._before_training_epoch(**kwargs)
            if resuming:
                self.checkpointer.apply(self._snapshot)  # after hooks that reset counters
                self._snapshot = None
            if self._stop_training:
                self._stop_training = False
                break
            self.training_epoch(**kwargs)
            self._after_training_epoch(**kwargs)
        # The experience's training is done: the next commit is an experience boundary.
        self.cursor = Cursor(self.cursor.experience + 1, 0, 0)

    def _after_training_iteration(self, **kwargs: Any) -> None:
        super()._after_training_iteration(**kwargs)
        self.cursor.iteration += 1
        epoch_end = self.cursor.iteration >= len(self.dataloader.batch_sampler)
        if self.policy.due(self.clock.train_iterations, epoch_end=epoch_end):
            self.commit(f"experience {self.cursor.experience} epoch {self.cursor.epoch} "
                        f"iteration {self.cursor.iteration}")  # fmt: skip

    def _after_training_exp(self, **kwargs: Any) -> None:
        super()._after_training_exp(**kwargs)
        if not self._in_fit:  # plain Avalanche-style strategy.train(exp)
            rejected = self.finish_experience(self.cursor.experience - 1)
            if rejected is not None:
                raise GateFailed(rejected)

    def finish_experience(self, index: int) -> str | None:
        """Commit experience ``index``'s version, decide the gate, prune; returns the
        gate's rejection message (None: passed, or no gate)."""
        self.checkpointer.wait()  # a mid-experience version in flight is pruned below too
        main = self.store is not None
        before = set(self.store.version_ids()) if main else set()  # keys only: flat
        failures, verdict = gate_verdict(self.gate, self.accuracy_matrix)
        # the verdict's refs move in the version's own transaction (rank 0's store)
        refs = gate_refs(self.gate, self.store, failures) if main else None
        version = self.commit(f"after experience {index}", gate=verdict, refs=refs)

        def settle() -> str | None:  # the store's part: rank 0's (the matrix is every rank's)
            rejected = settle_gate(self.store, version, index, failures)
            self.policy.prune(self.store, before, index)
            return rejected

        if self.world.size == 1:
            return settle()
        return sync.agree(self.world, "finish the experience", settle)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
