"""engram-train: a Hydra-configured continual-learning run that persists everything.

    engram-train                                      # naive, split digits, runs/...
    engram-train strategy=ewc run.max_experiences=1   # train one new experience, exit
    engram-train -m strategy=naive,ewc,replay seed=0,1,2

Re-running a command resumes its store (``store=...``, by default one per strategy,
benchmark and seed) or reports that the stream is already trained.
"""

from __future__ import annotations

import random
import sys
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engram.config import register
from engram.errors import EngramError

register()


def build_plugins(strategy: DictConfig) -> list[Any]:
    """One plugin per non-null section of the strategy config, in a fixed order."""
    from engram import strategies as s

    sections = {
        "ewc": s.EWCPlugin,
        "si": s.SIPlugin,
        "mas": s.MASPlugin,
        "lwf": s.LwFPlugin,
        "replay": s.ERPlugin,
        "der": s.DERPlugin,
        "agem": s.AGEMPlugin,
    }
    return [plugin(**strategy[k]) for k, plugin in sections.items() if strategy[k] is not None]


def build_model(cfg: DictConfig, n_inputs: int, n_classes: int) -> Any:
    from torch import nn

    if cfg.model.name != "mlp":
        raise EngramError(f"unknown model {cfg.model.name!r}; available: mlp")
    layers: list[nn.Module] = []
    width = n_inputs
    for hidden in cfg.model.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    if not cfg.model.multihead:
        return nn.Sequential(*layers, nn.Linear(width, n_classes))
    from avalanche.models import MultiHeadClassifier, MultiTaskModule

    class MultiHeadMLP(MultiTaskModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(*layers)
            self.classifier = MultiHeadClassifier(width, initial_out_features=2)

        def forward_single_task(self, x: Any, task_label: int) -> Any:
            return self.classifier(self.body(x), task_label)

    return MultiHeadMLP()


def build_benchmark(cfg: DictConfig) -> Any:
    from engram.benchmarks.digits import split_digits

    if cfg.benchmark.name not in ("split_digits", "split_digits_task"):
        raise EngramError(
            f"unknown benchmark {cfg.benchmark.name!r}; available: split_digits, split_digits_task"
        )
    b = cfg.benchmark
    return split_digits(b.n_experiences, task_labels=b.task_labels, seed=b.seed)


def train(cfg: DictConfig) -> list[list[float]]:
    """Run (or resume) the configured stream; returns the accuracy matrix."""
    import numpy as np
    import torch

    from engram.metrics import average_accuracy, backward_transfer, forgetting
    from engram.metrics.tensorboard import ForgettingWriter
    from engram.training.progress import ProgressBar
    from engram.training.template import DurableTemplate

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    bench = build_benchmark(cfg)
    model = build_model(cfg, n_inputs=64, n_classes=10)
    if cfg.optimizer.name == "sgd":
        optimizer: Any = torch.optim.SGD(
            model.parameters(), lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum,
            weight_decay=cfg.optimizer.weight_decay,
        )  # fmt: skip
    elif cfg.optimizer.name == "adam":
        optimizer = torch.optim.Adam(
            model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay
        )
    else:
        raise EngramError(f"unknown optimizer {cfg.optimizer.name!r}; available: sgd, adam")
    quiet = cfg.run.quiet
    board = ForgettingWriter(Path(cfg.store) / "tb") if cfg.logger.tensorboard else None

    def report(index: int, row: list[float]) -> None:
        if board is not None:
            board.experience(
                strategy.accuracy_matrix, strategy.last_commit_seconds, strategy.last_commit_bytes
            )
        if not quiet:
            print(f"experience {index}: accuracy " + " ".join(f"{a:.2f}" for a in row), flush=True)

    with DurableTemplate(
        model=model,
        optimizer=optimizer,
        store=cfg.store,
        plugins=build_plugins(cfg.strategy) + ([] if quiet else [ProgressBar()]),
        train_mb_size=cfg.training.batch_size,
        train_epochs=cfg.training.epochs,
        eval_mb_size=cfg.training.eval_batch_size,
        seed=cfg.seed,
        commit_every_iterations=cfg.training.commit_every_iterations,
        commit_every_seconds=cfg.training.commit_every_seconds,
        hparams={"benchmark": OmegaConf.to_container(cfg.benchmark),
                 "model": OmegaConf.to_container(cfg.model)},
        branch=cfg.branch,
        name=cfg.strategy.name,
    ) as strategy:  # fmt: skip
        done_before = strategy.restore(list(bench.train_stream) + list(bench.test_stream))
        already = strategy.cursor.experience
        if board is not None:  # from the store: the same after a resume
            written = {
                v.meta["experience"]: v.new_bytes
                for v in strategy.store.versions()
                if v.meta.get("kind") == "experience"
            }
            sizes = [written.get(i, 0) for i in range(len(strategy.accuracy_matrix))]
            board.history(strategy.accuracy_matrix, sizes)
        if done_before and not quiet:
            print(f"resuming {cfg.store} after experience {already - 1}")
        matrix = strategy.fit(
            bench.train_stream, bench.test_stream,
            max_experiences=cfg.run.max_experiences, on_experience=report,
        )  # fmt: skip
        if already >= len(bench.train_stream):
            print(f"{cfg.store}: all {already} experiences are already trained")
        if board is not None:
            board.hparams(_flat_hparams(cfg), matrix)
            board.close()
    if not quiet and matrix:
        print("\naccuracy matrix (row i: after training experience i; column j: tested on j)")
        for i, row in enumerate(matrix):
            print(f"  {i}: " + " ".join(f"{a:.3f}" for a in row))
        print(
            f"average accuracy {average_accuracy(matrix):.3f}  forgetting {forgetting(matrix):.3f}"
            f"  BWT {backward_transfer(matrix):+.3f}"
        )
    return matrix


def _flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """strategy.ewc.ewc_lambda=50.0 style keys, for the HParams dashboard."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif node is not None:
            out[prefix] = node

    for group in ("benchmark", "model", "optimizer", "strategy", "training"):
        walk(OmegaConf.to_container(cfg[group]), group)
    out["seed"] = cfg.seed
    return out


def _hydra_main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path="configs", config_name="train")
    def run(cfg: DictConfig) -> None:
        warnings.filterwarnings("ignore")
        try:
            train(cfg)
        except EngramError as e:
            print(f"engram-train: error: {e}", file=sys.stderr)
            sys.exit(2)

    run()


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
