"""The body of an ``engram-train`` run, once its config is validated (:func:`run`):
threads and seeds, the data, the store (opened once; rank 0's under torchrun), the
learner (:mod:`engram.run.build`), the fit with TensorBoard kept in step with the store,
the summary and, when asked, what losing the memory would have cost
(:mod:`engram.run.counterfactual`). :func:`engram.train.train` calls it.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engram import distributed
from engram.errors import GateFailed, NotAStoreError, StoreNotFoundError
from engram.run import build
from engram.run.build import model_spec
from engram.sklearn.estimators import is_sklearn


def _open_existing(cfg: DictConfig) -> Any:
    """The store for writing if it exists (None: created once the data is validated)."""
    from engram.store import Store

    try:
        return Store.open(cfg.store.path, mode="w", lock_timeout=cfg.store.lock_timeout,
                          allow_network_fs=cfg.store.allow_network_fs)  # fmt: skip
    except (StoreNotFoundError, NotAStoreError):  # validate() refused foreign directories
        return None


def run(cfg: DictConfig) -> list[list[float]]:
    """The run after validation: threads, device, the data, the store, the learner, fit.
    Long because it is the runner's steps in order, each a few lines."""
    import numpy as np
    import torch

    from engram.distributed.sync import agree
    from engram.store import Store
    from engram.streams import build_benchmark
    from engram.training.resumed import UNREAD, read_head

    if cfg.training.threads is not None:
        torch.set_num_threads(cfg.training.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    world = distributed.world()  # data-parallel: rank 0 owns the store
    store = None
    resumed = None  # HEAD, read once: it sizes the benchmark and the learner resumes it

    def open_store() -> dict[str, Any]:
        nonlocal store, resumed
        if cfg.store.remote is not None:
            _catch_up(cfg)
        store = _open_existing(cfg)
        resumed = read_head(store) if store is not None else None
        return resumed.model_spec() if resumed is not None else {}

    def create_store() -> None:
        nonlocal store
        if store is None:
            store = Store.open(cfg.store.path, mode="c", lock_timeout=cfg.store.lock_timeout,
                               allow_network_fs=cfg.store.allow_network_fs)  # fmt: skip

    try:
        stored = agree(world, "open the store", open_store) if world.size > 1 else open_store()
        bench = build_benchmark(
            OmegaConf.to_container(cfg.benchmark), n_classes=stored.get("args", {}).get("n_classes")
        )
        spec = model_spec(cfg, bench.input_shape, bench.n_classes, bench.task_labels)
        agree(world, "create the store", create_store) if world.size > 1 else create_store()
        if store is not None and cfg.store.signing_key is not None:  # rank 0's commits
            store.sign_with(cfg.store.signing_key)
        quiet = cfg.run.quiet or not world.is_main
        signature = build.signature(spec, bench)
        made = build.learner(cfg, spec, store, bench, signature, quiet,
                             resumed=resumed if world.is_main else UNREAD)  # fmt: skip
    except BaseException:
        if store is not None:
            store.close()
        raise
    comparison = None
    resumed = None  # the learner holds it until it restores, then drops it
    with store or contextlib.nullcontext(), made as strategy:
        shadow = None
        if cfg.run.compare_memory_lost and world.size == 1 and not is_sklearn(spec["name"]):

            def shadow(temp_store: Any) -> Any:  # the run's objects, fresh, on another store
                return build.template(cfg, spec, temp_store, bench, signature, quiet=True)

        # rank 0 owns the store, so it alone pushes
        remote = cfg.store.remote and world.is_main and store is not None
        pusher = _pusher(cfg, store) if remote else None
        try:
            matrix, comparison = _fit(cfg, strategy, bench, shadow, pusher)
        except BaseException as e:
            if pusher is not None:  # waits after the gate's stop: the versions it kept are good
                with contextlib.suppress(Exception):  # the run's own error is what is raised
                    pusher.finish(wait=isinstance(e, GateFailed))
            raise
        if pusher is not None and pusher.finish() == [] and not quiet:
            print(f"pushed {cfg.store.path} to {pusher.url} (HEAD {store.head.name})")
    if not quiet and matrix:
        _summary(matrix, strategy.initial_accuracy)
        if comparison is not None:
            from engram.run.counterfactual import print_comparison

            print_comparison(matrix, *comparison)
        elif cfg.run.compare_memory_lost and len(matrix) < len(bench.train_stream):
            print(f"\nrun the same command again: a new process continues {cfg.store.path} "
                  "from the store, and shows what losing the memory at that restart would "
                  "cost")  # fmt: skip
    return matrix


def _fit(
    cfg: DictConfig, strategy: Any, bench: Any, shadow: Any = None, pusher: Any = None
) -> tuple[list[list[float]], tuple[list[list[float]], int, str] | None]:
    """Restore, fit the stream, and keep TensorBoard (when on) in step with the store;
    ``pusher`` (:class:`~engram.store.remote.background.BackgroundPusher`) is asked to
    push after each experience's commit.

    ``shadow``: ``shadow(store) -> template`` to measure, for a resumed run, what the
    experiences it trained would have given with only the model file
    (engram.run.counterfactual); returns the matrix and ``(rows, first, resumed_from)``.
    Long because TensorBoard's writes interleave with the fit's callbacks."""
    from engram.metrics.curves import TrainingCurves
    from engram.metrics.tensorboard import ForgettingWriter

    path, store = cfg.store.path, strategy.store
    plugins = getattr(strategy, "plugins", [])
    curves = next((p for p in plugins if isinstance(p, TrainingCurves)), None)
    quiet = cfg.run.quiet or store is None  # data-parallel: rank 0 reports, alone
    train_list, test_list = list(bench.train_stream), list(bench.test_stream)
    done_before = strategy.restore(train_list + test_list)
    already = strategy.cursor.experience
    board = None
    if cfg.logger.tensorboard and store is not None:
        board = ForgettingWriter(Path(path) / "tb", initial=strategy.initial_accuracy)
        sizes = strategy.experience_bytes[: len(strategy.accuracy_matrix)]
        board.history(strategy.accuracy_matrix, sizes)  # from the store: same after resume
        if curves is not None:
            board.curves(curves.losses, curves.epochs, strategy.accuracy_matrix)
            curves.on_epoch = board.epoch
    if done_before and not quiet:
        print(f"resuming {path} after experience {already - 1}")
    resumed = None
    if shadow is not None and done_before and already < len(train_list):
        weights = {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}
        resumed = (weights, strategy.resumed_from)

    started = [time.perf_counter()]  # the experience's start: its line gives its seconds

    def report(index: int, row: list[float]) -> None:
        seconds, started[0] = time.perf_counter() - started[0], time.perf_counter()
        if pusher is not None:  # before the rest: the upload overlaps it
            pusher.request()
        if board is not None:
            board.initial = strategy.initial_accuracy  # measured by fit() before training
            iteration = len(curves.losses) if curves is not None else None
            board.experience(strategy.accuracy_matrix, strategy.last_commit_seconds,
                             strategy.last_commit_bytes, iteration)  # fmt: skip
        if not quiet:
            accuracy = " ".join(f"{a:.2f}" for a in row)
            print(f"experience {index}: accuracy {accuracy} ({seconds:.1f} s)", flush=True)

    try:
        matrix = strategy.fit(train_list, test_list, max_experiences=cfg.run.max_experiences,
                              on_experience=report)  # fmt: skip
    finally:
        if board is not None:
            board.initial = strategy.initial_accuracy
            board.hparams(build.flat_hparams(cfg), strategy.accuracy_matrix)
            board.close()
    if already >= len(train_list) and store is not None:
        print(f"{path}: all {already} experiences are already trained")
    comparison = None
    if resumed is not None and len(matrix) > already:
        from engram.run.counterfactual import memory_lost_rows

        if not quiet:
            print(f"\ntraining experiences {already}..{len(matrix) - 1} again from the weights "
                  "alone, to compare ...", flush=True)  # fmt: skip
        rows = memory_lost_rows(shadow, resumed[0], train_list, test_list, already, len(matrix))
        comparison = (rows, already, resumed[1])
    return matrix, comparison


def _catch_up(cfg: DictConfig) -> None:
    """Resume anywhere: before the store opens, pull the remote's versions it lacks (a
    clone into a new store, a fast-forward of one that is behind); diverged: one line."""
    from engram.store import version_name
    from engram.store.remote.background import catch_up

    report = catch_up(cfg.store.remote, cfg.store.path)
    if report is not None and report.pulled and not cfg.run.quiet:
        print(f"pulled {version_name(report.head)} from {report.remote}")


def _pusher(cfg: DictConfig, store: Any) -> Any:
    from engram.store.remote.background import BackgroundPusher

    return BackgroundPusher(store, cfg.store.remote)


def _summary(matrix: list[list[float]], initial: list[float] | None) -> None:
    from engram.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer

    print("\naccuracy matrix (row i: after training experience i; column j: tested on j)")
    for i, row in enumerate(matrix):
        print(f"  {i}: " + " ".join(f"{a:.3f}" for a in row))
    print(
        f"average accuracy {average_accuracy(matrix):.3f}  forgetting {forgetting(matrix):.3f}"
        f"  BWT {backward_transfer(matrix):+.3f}  FWT {forward_transfer(matrix, initial):+.3f}"
    )
