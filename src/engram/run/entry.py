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
import copy
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engram import distributed
from engram.errors import EngramError, GateFailed
from engram.metrics.objective import objective
from engram.run import RUN_FILES, runner
from engram.run.build import build_optimizer, build_plugins, model_spec
from engram.run.validation import register
from engram.store.format import LMDB_DIR

__all__ = ["GateFailed", "build_optimizer", "build_plugins", "main", "model_spec", "train"]

register()
# configs/train.yaml searches ./configs too; most directories have none, which is fine
warnings.filterwarnings("ignore", message=r"provider=hydra\.searchpath in main, path=configs is")


def train(cfg: DictConfig) -> list[list[float]]:
    """Run (or resume) the configured stream; returns the accuracy matrix.

    torch's thread count (``training.threads``) holds for the run only: the caller's
    setting is restored on return, so a library caller's process is left as it was.
    """
    import torch

    from engram.run.validation import validate
    from engram.training.execution import deterministic_algorithms

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
            return runner.run(cfg)
    finally:
        torch.set_num_threads(threads)
        if joined:
            distributed.shutdown()


# An OS fault leaves the store as it was: the same command resumes once it is fixed.
_RETRY = "run the same command again (it resumes from HEAD)"


def _hydra_main() -> None:
    import hydra

    from engram.faults import describe
    from engram.run.validation import check_overrides

    try:  # overrides omegaconf itself would reject with a traceback
        check_overrides(sys.argv[1:])
    except EngramError as e:
        print(f"engram-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 alone writes Hydra's files
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]  # fmt: skip

    @hydra.main(version_base="1.3", config_path="pkg://engram.configs", config_name="train")
    def run(cfg: DictConfig) -> float | list[float] | None:
        """One job; returns ``run.objective`` for a sweeper that optimises (Optuna...)."""
        warnings.filterwarnings("ignore")  # libraries' noise; engram's own warnings:
        warnings.filterwarnings("always", module="engram")
        warnings.showwarning = _one_line_warning
        uncomposed = os.environ.get(_UNCOMPOSED)  # a sweep's job whose overrides failed
        if uncomposed is not None:
            overrides = os.environ.get(_UNCOMPOSED_OVERRIDES, "")
            return _job_failed(2, _error_line(uncomposed), None, overrides)
        store = Path(_store_path(cfg))
        created = not (store / LMDB_DIR).exists()  # a store this job may create
        try:
            return objective(train(cfg), OmegaConf.to_container(cfg.run).get("objective"))
        except GateFailed as e:
            code, line = 3, f"engram-train: {e}"
        except distributed.PeerFailed:  # rank 0 said why
            code, line = 1, None
        except EngramError as e:  # (or an OS fault behind it, e.g. a store "not readable")
            code, line = 2, _error_line(describe(e, str(store), _RETRY) or str(e))
        except Exception as e:  # an OS fault (a full disk, a read-only file system, ...)
            message = describe(e, str(store), _RETRY)
            if message is None:
                raise  # a bug: its traceback
            code, line = 2, _error_line(message)
        if created and int(os.environ.get("RANK", "0")) == 0:
            discard_if_empty(store)
        return _job_failed(code, line, store)

    with _sweep_jobs_fail_alone():
        _run_hydra_app(run)
    if _FAILED:  # a sweep whose jobs ran, some failing: each said why in its line
        jobs = ", ".join(f"{job} (exit {code})" for code, job in _FAILED)
        print(f"engram-train: {len(_FAILED)} job(s) of the sweep failed: {jobs}",
              file=sys.stderr)  # fmt: skip
        sys.exit(max(code for code, _ in _FAILED))


# (exit code, store or job) of each failed job of this process's sweep (the basic launcher's)
_FAILED: list[tuple[int, str]] = []
# hydra.job.env_set keys of a sweep's job whose overrides do not compose: its one line,
# and the job's own values of the swept keys
_UNCOMPOSED, _UNCOMPOSED_OVERRIDES = "ENGRAM_UNCOMPOSED_JOB", "ENGRAM_UNCOMPOSED_OVERRIDES"
_BASIC = ("hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
          "hydra._internal.core_plugins.basic_launcher.BasicLauncher")  # fmt: skip


class JobFailed(Exception):
    """A sweep's job failed; its line is printed. An Exception, not SystemExit: Hydra's
    launchers then record it and run the other jobs (a SystemExit would end the sweep)."""


def _job_failed(code: int, line: str | None, store: Path | None, overrides: str = "") -> None:
    """End the job: exit with ``code``, or, in a sweep, record it and let the rest run.

    In a sweep the line names the job: its number and its store (or, when its overrides
    did not compose, those overrides). Under Hydra's basic sweeper and launcher (this
    process runs every job) the job then returns; another launcher learns of the failure
    from :class:`JobFailed` (and Hydra adds a line of its own).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if sweep:
        hydra_cfg = HydraConfig.get()
        job = str(store) if store is not None else f"job #{hydra_cfg.job.num} ({overrides})"
        if line is not None:
            name = str(store) if store is not None else overrides
            line = line.replace(
                "engram-train", f"engram-train: job #{hydra_cfg.job.num} ({name})", 1
            )
    if line is not None and int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr, flush=True)
    if not sweep:
        sys.exit(code)
    _FAILED.append((code, job))
    if (hydra_cfg.sweeper.get("_target_"), hydra_cfg.launcher.get("_target_")) != _BASIC:
        raise JobFailed(f"exit {code}: {job}")


@contextlib.contextmanager
def _sweep_jobs_fail_alone() -> Iterator[None]:
    """While Hydra runs: a sweep's job whose overrides do not compose (``-m
    training.epochs=abc,1``) fails alone, like a job that fails in training.

    Hydra composes every job of a sweep before it launches any, and a composition
    error ends the whole sweep. Here its config loader returns, for such a job, the
    sweep's own config carrying the one-line error in ``hydra.job.env_set``: the job
    runs, reports the error as its failure (exit 2), and the other jobs run. Hydra has
    no hook for this, so its loader's method is replaced while Hydra runs in this
    process, and put back after; launchers that compose in other processes (joblib's
    workers, submitit) keep Hydra's behaviour.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from omegaconf import open_dict, read_write

    compose = ConfigLoaderImpl.load_sweep_config

    def load_sweep_config(
        self: Any, master_config: DictConfig, sweep_overrides: list[str]
    ) -> DictConfig:
        try:
            return compose(self, master_config, sweep_overrides)
        except Exception as e:
            line = _composition_error(e)
            if line is None:
                raise
        failed = copy.deepcopy(master_config)
        with read_write(failed), open_dict(failed):
            failed.hydra.job.env_set[_UNCOMPOSED] = line
            failed.hydra.job.env_set[_UNCOMPOSED_OVERRIDES] = " ".join(
                _swept(master_config.hydra.overrides.task, sweep_overrides)
            )
            failed.hydra.overrides.task = list(sweep_overrides)
        return failed

    ConfigLoaderImpl.load_sweep_config = load_sweep_config
    try:
        yield
    finally:
        ConfigLoaderImpl.load_sweep_config = compose


def _swept(sweep: list[str], job: list[str]) -> list[str]:
    """The overrides of ``job`` that set a key the sweep's overrides sweep over (all of
    them if none can be told)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        keys = {
            o.key_or_group for o in parser.parse_overrides(list(sweep)) if o.is_sweep_override()
        }
        shown = [
            o
            for o, p in zip(job, parser.parse_overrides(list(job)), strict=True)
            if p.key_or_group in keys
        ]
    except Exception:  # (parsed by Hydra once already; a message is not worth a traceback)
        return list(job)
    return shown or list(job)


def _run_hydra_app(run: Any) -> None:
    """``run()``, with an OS fault in Hydra's own job setup (it creates the run
    directory, by default in the store, and writes its config files there before
    ``train``) reported in one line with exit 2 too; any other error as Hydra does."""
    import os

    from engram.faults import describe

    asked = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing and exit(1)
    try:
        run()
        return
    except JobFailed:  # a sweep's launcher re-raises its first failed job's, after all ran
        if _FAILED:
            return
        raise
    except Exception as e:
        error = e
    finally:
        if asked is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = asked
    mistake = _composition_error(error)
    if mistake is not None:
        _error_exit(mistake)
    # a write to an open file names none, and Hydra's config no longer says where it was
    run_dir = "Hydra's run directory (hydra.run.dir, by default beside the store: hydra/NAME/)"
    message = describe(error, run_dir, _RETRY)
    if message is not None:
        _error_exit(message)
    from hydra._internal.utils import run_and_report  # Hydra's own report of the error

    def reraise() -> None:
        raise error

    run_and_report(reraise)  # prints as Hydra would have and exits 1 (re-raises when asked)
    raise error


def _composition_error(error: BaseException) -> str | None:
    """One line for a user's mistake that Hydra reports while composing the config (an
    unknown config group option, a value of the wrong type), else None.

    Hydra's own report is a multi-line message with exit 1, and its missing-option error
    is an ``IOError`` without an errno, which would read as an OS fault.
    """
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, MissingConfigException):
        lines = str(error).split("Config search path")[0].split("\n")
        # the options, less the structured schemas engram registers under each group
        options = [o.strip() for o in lines[1:] if o.startswith("\t")]
        shown = ", ".join(o for o in options if not o.endswith("_schema"))
        missing = lines[0].removeprefix("In 'train': ")
        return f"{missing}; options: {shown}" if shown else missing
    if isinstance(error, ConfigCompositionException):
        cause = error.__cause__
        msg = getattr(cause, "msg", None) if isinstance(cause, OmegaConfBaseException) else None
        return f"{error}: {msg.splitlines()[0]}" if msg else str(error).splitlines()[0]
    return None


def _store_path(cfg: DictConfig) -> str:
    try:
        return str(cfg.store.path)
    except Exception:  # not resolvable (the error being reported may be why)
        return "the store"


def _error_line(message: str) -> str:
    rank = int(os.environ.get("RANK", "0"))
    who = f"engram-train (rank {rank})" if rank else "engram-train"
    return f"{who}: error: {' '.join(message.split())}"


def _error_exit(message: str) -> None:
    print(_error_line(message), file=sys.stderr)
    sys.exit(2)


def discard_if_empty(store: Path) -> None:
    """Remove what a failed run created at ``store`` when it committed nothing there:
    the empty store's files (and TensorBoard's), then the directory itself if nothing
    else is in it. A store with any version is kept. (Hydra's job log, beside the store
    in ``hydra/<name>/``, is kept: it says why the run failed.)"""
    import shutil

    from engram.store import Store
    from engram.store import format as fmt

    try:
        if (store / fmt.LMDB_DIR).is_dir():
            with Store.open(store) as opened:
                if opened.versions() or opened.tags() or opened.damaged():
                    return
        for name in (fmt.LMDB_DIR, fmt.BLOB_DIR, fmt.CHECKPOINT_DIR, *RUN_FILES):
            path = store / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
        (store / fmt.LOCK_FILE).unlink(missing_ok=True)
        store.rmdir()  # only if empty: never what the run did not create
    except (OSError, EngramError):
        pass  # housekeeping: the run's own error is what the user needs


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
