"""A small continual-learning run used by the resume-equivalence tests.

Importable (the in-process reference run) and runnable as a script (the fresh
processes)::

    python tests/training/scenario.py STRATEGY STORE [--max-experiences N]
        [--commit-every N] [--kill-at-iteration N] [--kill-in-commit N] [--multihead]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: run as a script too

import numpy as np  # noqa: E402
import torch  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.models import MultiHeadClassifier, MultiTaskModule  # noqa: E402
from torch import nn  # noqa: E402

from engram.metrics.curves import TrainingCurves  # noqa: E402
from engram.strategies import (  # noqa: E402
    AGEMPlugin,
    DERPlugin,
    ERPlugin,
    EWCPlugin,
    LwFPlugin,
    MASPlugin,
    SIPlugin,
)
from engram.streams.digits import split_digits  # noqa: E402
from engram.training.template import DurableTemplate  # noqa: E402
from helpers import one_thread  # noqa: E402

N_EXPERIENCES = 3
STRATEGIES = {
    "naive": lambda: [],
    "ewc": lambda: [EWCPlugin(ewc_lambda=50.0)],
    "ewc_true_fisher": lambda: [EWCPlugin(ewc_lambda=50.0, estimator="true", seed=3)],
    "online_ewc": lambda: [EWCPlugin(ewc_lambda=50.0, mode="online", decay_factor=0.9)],
    "si": lambda: [SIPlugin(si_lambda=1.0)],
    "mas": lambda: [MASPlugin(lambda_reg=0.01)],  # larger values diverge at this lr
    "lwf": lambda: [LwFPlugin(alpha=1.0, temperature=2.0)],
    "er": lambda: [ERPlugin(mem_size=100, seed=1)],
    "derpp": lambda: [DERPlugin(mem_size=100, alpha=0.1, beta=0.5, seed=2)],
    "derpp_experience_end": lambda: [
        DERPlugin(mem_size=100, alpha=0.1, beta=0.5, seed=2, admission="experience_end")
    ],
    "agem": lambda: [AGEMPlugin(mem_size=100, sample_size=32, seed=3)],
    "ewc_replay": lambda: [EWCPlugin(ewc_lambda=5.0), ERPlugin(mem_size=100, seed=4)],
    "si_replay": lambda: [SIPlugin(si_lambda=1.0), ERPlugin(mem_size=100, policy="class_balanced")],
}


class MultiHeadMLP(MultiTaskModule):
    """Shared body, one head per task (grown by Avalanche's adaptation)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.classifier = MultiHeadClassifier(32, initial_out_features=2)

    def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
        return self.classifier(self.body(x), task_label)


class KillAt(SupervisedPlugin):
    """SIGKILL this process right after training iteration N (a crash, not an exit)."""

    engram_transient = ("iteration",)  # a test's hook, not memory

    def __init__(self, iteration: int) -> None:
        super().__init__()
        self.iteration = iteration

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if strategy.clock.train_iterations == self.iteration:
            os.kill(os.getpid(), signal.SIGKILL)


def build(
    strategy: str, store: Path, *, multihead: bool = False, commit_every: int | None = None,
    extra_plugins: list | None = None, **kwargs,
) -> DurableTemplate:  # fmt: skip
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = (
        MultiHeadMLP()
        if multihead
        else nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    )
    return DurableTemplate(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        store=store,
        # the training curves are state like any plugin's: resumed bit-identically too
        plugins=[*STRATEGIES[strategy](), TrainingCurves(), *(extra_plugins or [])],
        train_mb_size=32,
        train_epochs=2,
        commit_every_iterations=commit_every,
        name=strategy,
        **kwargs,
    )


def run(strategy: str, store: Path, *, multihead: bool = False, max_experiences: int | None = None,
        commit_every: int | None = None, extra_plugins: list | None = None) -> list[list[float]]:  # fmt: skip
    bench = split_digits(5, task_labels=multihead)  # the first N_EXPERIENCES of 5 (2 classes each)
    train, test = bench.train_stream[:N_EXPERIENCES], bench.test_stream[:N_EXPERIENCES]
    with one_thread(), build(strategy, store, multihead=multihead, commit_every=commit_every,
                             extra_plugins=extra_plugins) as template:  # fmt: skip
        return template.fit(train, test, max_experiences=max_experiences)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy", choices=sorted(STRATEGIES))
    parser.add_argument("store", type=Path)
    parser.add_argument("--max-experiences", type=int)
    parser.add_argument("--commit-every", type=int)
    parser.add_argument("--kill-at-iteration", type=int)
    parser.add_argument("--kill-in-commit", type=int, help="SIGKILL inside the Nth commit")
    parser.add_argument("--multihead", action="store_true")
    args = parser.parse_args(argv)
    extra = [KillAt(args.kill_at_iteration)] if args.kill_at_iteration else []
    if args.kill_in_commit:
        import engram.store.commit as commit_module

        original, calls = commit_module.write_checkpoint, [0]

        def dying_write(*a, **k):
            calls[0] += 1
            info = original(*a, **k)
            if calls[0] == args.kill_in_commit:  # checkpoint written, manifest not yet
                os.kill(os.getpid(), signal.SIGKILL)
            return info

        commit_module.write_checkpoint = dying_write  # where the commit protocol calls it
    run(args.strategy, args.store, multihead=args.multihead, max_experiences=args.max_experiences,
        commit_every=args.commit_every, extra_plugins=extra)  # fmt: skip
    if args.kill_in_commit and calls[0] < args.kill_in_commit:  # the wrapper was not called
        sys.exit(f"write_checkpoint wrapper called {calls[0]} times, not {args.kill_in_commit}")
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
