"""engram-train: a Hydra-configured continual-learning run that persists everything.

    engram-train                                      # naive, split digits, runs/...
    engram-train strategy=ewc run.max_experiences=1   # train one new experience, exit
    engram-train -m strategy=naive,ewc,replay seed=0,1,2

Re-running a command resumes its store (``store=...``, by default one per strategy,
benchmark, seed and the overrides that change training) or reports that the stream is
already trained. :func:`train` is the whole run as a plain function: validate, build,
open the store once, fit, report.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engram import distributed
from engram.build import build_optimizer, build_plugins, model_spec
from engram.config import register
from engram.errors import EngramError, GateFailed, NotAStoreError, StoreNotFoundError
from engram.sklearn.estimators import is_sklearn

__all__ = ["GateFailed", "build_optimizer", "build_plugins", "main", "model_spec", "train"]

register()


def train(cfg: DictConfig) -> list[list[float]]:
    """Run (or resume) the configured stream; returns the accuracy matrix.

    torch's thread count (``training.threads``) holds for the run only: the caller's
    setting is restored on return, so a library caller's process is left as it was.
    """
    import torch

    from engram.training.execution import deterministic_algorithms
    from engram.validation import validate

    validate(cfg)  # every option, before anything trains or a store opens
    threads = torch.get_num_threads()
    joined = False
    try:
        if distributed.launched() and distributed.world().size == 1:  # torchrun, N > 1
            import hashlib

            import engram.training.template  # noqa: F401 - Avalanche creates its default

            # loggers on import, and refuses to on a non-main rank once the group exists
            from engram.distributed.sync import same_config

            world = distributed.init_from_env(cfg.training.device)
            joined = True
            same_config(world, hashlib.sha256(OmegaConf.to_yaml(cfg).encode()).hexdigest())
        with deterministic_algorithms(cfg.training.deterministic):
            return _run(cfg)
    finally:
        torch.set_num_threads(threads)
        if joined:
            distributed.shutdown()


def _open_existing(cfg: DictConfig) -> Any:
    """The store for writing if it exists (None: created once the data is validated)."""
    from engram.store import Store

    try:
        return Store.open(cfg.store.path, mode="w", lock_timeout=cfg.store.lock_timeout)
    except (StoreNotFoundError, NotAStoreError):  # validate() refused foreign directories
        return None


def _run(cfg: DictConfig) -> list[list[float]]:
    """The run after validation: threads, device, the data, the store, the learner, fit.
    Long because it is the runner's steps in order, each a few lines."""
    import numpy as np
    import torch

    from engram.distributed.sync import agree
    from engram.store import Store
    from engram.streams import build_benchmark

    if cfg.training.threads is not None:
        torch.set_num_threads(cfg.training.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    world = distributed.world()  # data-parallel: rank 0 owns the store
    store = None

    def open_store() -> dict[str, Any]:
        nonlocal store
        store = _open_existing(cfg)
        head = store.head if store is not None else None
        return (head.meta.get("model_spec") if head is not None else None) or {}

    def create_store() -> None:
        nonlocal store
        if store is None:
            store = Store.open(cfg.store.path, mode="c", lock_timeout=cfg.store.lock_timeout)

    try:
        stored = agree(world, "open the store", open_store) if world.size > 1 else open_store()
        bench = build_benchmark(
            OmegaConf.to_container(cfg.benchmark), n_classes=stored.get("args", {}).get("n_classes")
        )
        spec = model_spec(cfg, bench.input_shape, bench.n_classes, bench.task_labels)
        agree(world, "create the store", create_store) if world.size > 1 else create_store()
    except BaseException:
        if store is not None:
            store.close()
        raise
    quiet = cfg.run.quiet or not world.is_main
    signature = _signature(spec, bench)
    make = _sklearn_learner if is_sklearn(spec["name"]) else _template
    comparison = None
    with store or contextlib.nullcontext(), make(cfg, spec, store, bench, signature,
                                                 quiet) as strategy:  # fmt: skip
        shadow = None
        if cfg.run.compare_memory_lost and world.size == 1 and make is _template:

            def shadow(temp_store: Any) -> Any:  # the run's objects, fresh, on another store
                return _template(cfg, spec, temp_store, bench, signature, quiet=True)

        matrix, comparison = _fit(cfg, strategy, bench, shadow)
    if not quiet and matrix:
        _summary(matrix, strategy.initial_accuracy)
        if comparison is not None:
            from engram.counterfactual import print_comparison

            print_comparison(matrix, *comparison)
        elif cfg.run.compare_memory_lost and len(matrix) < len(bench.train_stream):
            print(f"\nrun the same command again: a new process continues {cfg.store.path} "
                  "from the store, and shows what losing the memory at that restart would "
                  "cost")  # fmt: skip
    return matrix


def _signature(spec: dict[str, Any], bench: Any) -> dict[str, Any]:
    """What the model takes and answers (engram.signature), recorded in every version."""
    from engram.signature import signature

    shape = spec["args"]["input_shape"] if is_sklearn(spec["name"]) else bench.input_shape
    return signature(shape, range(bench.n_classes), task_labels=bench.task_labels)


def _template(cfg: DictConfig, spec: dict[str, Any], store: Any, bench: Any,
              signature: dict[str, Any], quiet: bool) -> Any:  # fmt: skip
    """The torch model's durable Avalanche template for this run."""
    from engram import build
    from engram.metrics.curves import TrainingCurves
    from engram.models import build_model
    from engram.training.progress import ProgressBar
    from engram.training.template import DurableTemplate

    model = build_model(spec)
    meta = {"signature": signature}
    if bench.experience_ids:
        meta["experience_ids"] = bench.experience_ids
    return DurableTemplate(
        model=model,
        optimizer=build_optimizer(cfg, model),
        store=store if store is not None else cfg.store.path,
        plugins=build_plugins(cfg.strategy, {"model": model, "input_size": list(bench.input_shape)})
        + [TrainingCurves()]
        + ([] if quiet else [ProgressBar()]),
        train_mb_size=cfg.training.batch_size,
        train_epochs=cfg.training.epochs,
        eval_mb_size=cfg.training.eval_batch_size,
        seed=cfg.seed,
        commit_every_iterations=cfg.training.commit_every_iterations,
        commit_every_seconds=cfg.training.commit_every_seconds,
        async_commit=cfg.training.async_commit,
        keep_mid_experience=cfg.store.keep_mid_experience,
        hparams={"benchmark": build.benchmark_hparams(cfg), "model": spec},
        branch=cfg.branch,
        name=cfg.strategy.name,
        model_spec=spec,
        meta=meta,
        gate=build.gate(cfg),
        nonfinite=cfg.training.nonfinite,
        device=cfg.training.device,
        precision=cfg.training.precision,
    )


def _sklearn_learner(cfg: DictConfig, spec: dict[str, Any], store: Any, bench: Any,
                     signature: dict[str, Any], quiet: bool) -> Any:  # fmt: skip
    """The scikit-learn estimator's learner for this run (engram.sklearn)."""
    from engram import build
    from engram.sklearn.learner import SklearnLearner

    replay = cfg.strategy.get("replay")
    return SklearnLearner(
        spec,
        store,
        signature=signature,
        name=cfg.strategy.name,
        replay=OmegaConf.to_container(replay) if replay is not None else None,
        batch_size=cfg.training.batch_size,
        epochs=cfg.training.epochs,
        seed=cfg.seed,
        hparams={"benchmark": build.benchmark_hparams(cfg), "model": spec},
        meta={"experience_ids": bench.experience_ids} if bench.experience_ids else None,
        gate=build.gate(cfg),
        branch=cfg.branch,
    )


def _fit(
    cfg: DictConfig, strategy: Any, bench: Any, shadow: Any = None
) -> tuple[list[list[float]], tuple[list[list[float]], int, str] | None]:
    """Restore, fit the stream, and keep TensorBoard (when on) in step with the store.

    ``shadow``: ``shadow(store) -> template`` to measure, for a resumed run, what the
    experiences it trained would have given with only the model file
    (engram.counterfactual); returns the matrix and ``(rows, first, resumed_from)``.
    Long because TensorBoard's writes interleave with the fit's callbacks."""
    from engram import build
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
        written = {v.meta["experience"]: v.new_bytes for v in store.versions()
                   if v.meta.get("kind") == "experience"}  # fmt: skip
        sizes = [written.get(i, 0) for i in range(len(strategy.accuracy_matrix))]
        board.history(strategy.accuracy_matrix, sizes)  # from the store: same after resume
        if curves is not None:
            board.curves(curves.losses, curves.epochs, strategy.accuracy_matrix)
            curves.on_epoch = board.epoch
    if done_before and not quiet:
        print(f"resuming {path} after experience {already - 1}")
    resumed = None
    if shadow is not None and done_before and already < len(train_list):
        weights = {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}
        resumed = (weights, store.head.name)

    def report(index: int, row: list[float]) -> None:
        if board is not None:
            board.initial = strategy.initial_accuracy  # measured by fit() before training
            iteration = len(curves.losses) if curves is not None else None
            board.experience(strategy.accuracy_matrix, strategy.last_commit_seconds,
                             strategy.last_commit_bytes, iteration)  # fmt: skip
        if not quiet:
            print(f"experience {index}: accuracy " + " ".join(f"{a:.2f}" for a in row), flush=True)

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
        from engram.counterfactual import memory_lost_rows

        if not quiet:
            print(f"\ntraining experiences {already}..{len(matrix) - 1} again from the weights "
                  "alone, to compare ...", flush=True)  # fmt: skip
        rows = memory_lost_rows(shadow, resumed[0], train_list, test_list, already, len(matrix))
        comparison = (rows, already, resumed[1])
    return matrix, comparison


def _summary(matrix: list[list[float]], initial: list[float] | None) -> None:
    from engram.metrics import average_accuracy, backward_transfer, forgetting, forward_transfer

    print("\naccuracy matrix (row i: after training experience i; column j: tested on j)")
    for i, row in enumerate(matrix):
        print(f"  {i}: " + " ".join(f"{a:.3f}" for a in row))
    print(
        f"average accuracy {average_accuracy(matrix):.3f}  forgetting {forgetting(matrix):.3f}"
        f"  BWT {backward_transfer(matrix):+.3f}  FWT {forward_transfer(matrix, initial):+.3f}"
    )


# An OS fault leaves the store as it was: the same command resumes once it is fixed.
_RETRY = "run the same command again (it resumes from HEAD)"


def _hydra_main() -> None:
    import hydra

    from engram.cli.faults import describe
    from engram.validation import check_overrides

    try:  # overrides omegaconf itself would reject with a traceback
        check_overrides(sys.argv[1:])
    except EngramError as e:
        print(f"engram-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 alone writes Hydra's files
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]  # fmt: skip

    @hydra.main(version_base="1.3", config_path="configs", config_name="train")
    def run(cfg: DictConfig) -> None:
        warnings.filterwarnings("ignore")  # libraries' noise; engram's own warnings:
        warnings.filterwarnings("always", module="engram")
        warnings.showwarning = _one_line_warning
        try:
            train(cfg)
        except GateFailed as e:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"engram-train: {e}", file=sys.stderr)
            sys.exit(3)
        except distributed.PeerFailed:  # rank 0 said why
            sys.exit(1)
        except EngramError as e:  # (or an OS fault behind it, e.g. a store "not readable")
            _error_exit(describe(e, _store_path(cfg), _RETRY) or str(e))
        except Exception as e:  # an OS fault (a full disk, a read-only file system, ...)
            message = describe(e, _store_path(cfg), _RETRY)
            if message is None:
                raise  # a bug: its traceback
            _error_exit(message)

    _run_hydra_app(run)


def _run_hydra_app(run: Any) -> None:
    """``run()``, with an OS fault in Hydra's own job setup (it creates the run
    directory, by default in the store, and writes its config files there before
    ``train``) reported in one line with exit 2 too; any other error as Hydra does."""
    import os

    from engram.cli.faults import describe

    asked = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing and exit(1)
    try:
        run()
        return
    except Exception as e:
        error = e
    finally:
        if asked is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = asked
    # a write to an open file names none, and Hydra's config no longer says where it was
    run_dir = "Hydra's run directory (hydra.run.dir, by default STORE/hydra/)"
    message = describe(error, run_dir, _RETRY)
    if message is not None:
        _error_exit(message)
    from hydra._internal.utils import run_and_report  # Hydra's own report of the error

    def reraise() -> None:
        raise error

    run_and_report(reraise)  # prints as Hydra would have and exits 1 (re-raises when asked)
    raise error


def _store_path(cfg: DictConfig) -> str:
    try:
        return str(cfg.store.path)
    except Exception:  # not resolvable (the error being reported may be why)
        return "the store"


def _error_exit(message: str) -> None:
    rank = int(os.environ.get("RANK", "0"))
    who = f"engram-train (rank {rank})" if rank else "engram-train"
    print(f"{who}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


#: Warnings no user can act on, shown despite the filters: Avalanche's ReplayPlugin calls
#: its storage policy's deprecated ``update``, which warns with its own filter ("always").
_UNACTIONABLE = ("Call to deprecated function update (removal in version 0.7",)


def _one_line_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    if str(message).startswith(_UNACTIONABLE):
        return
    print(f"engram-train: warning: {message}", file=sys.stderr, flush=True)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
