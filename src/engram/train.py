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

import os
import sys
import warnings
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engram import distributed, runner
from engram.build import build_optimizer, build_plugins, model_spec
from engram.config import register
from engram.errors import EngramError, GateFailed

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
            return runner.run(cfg)
    finally:
        torch.set_num_threads(threads)
        if joined:
            distributed.shutdown()


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
