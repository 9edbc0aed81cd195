"""engram-demo: a plain PyTorch continual-learning loop whose memory survives restarts.

Trains an MLP on scikit-learn's bundled digits split into five experiences of two
classes each (class-incremental, naive fine-tuning: it *will* forget; the strategies
that do not arrive with the durable template). After each experience it commits the
model, optimizer, RNG streams, clock and accuracy matrix to an engram store. Run it
again and it resumes after the last committed experience, bit-identical to a run
that never stopped; ``--max-experiences 1`` trains one experience per invocation.
At the end it reloads HEAD into a fresh model and checks it predicts identically.

    engram-demo --store runs/demo
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engram.errors import EngramError
from engram.store import Store
from engram.training import execution

N_EXPERIENCES = 5


def split_digits(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Five experiences of two digit classes each (engram's embedded split, no Avalanche)."""
    from engram.streams.digits import digits_tensors

    x_train, y_train, x_test, y_test = digits_tensors(seed)
    experiences = []
    for e in range(N_EXPERIENCES):
        train, test = (y_train // 2) == e, (y_test // 2) == e  # classes 2e and 2e + 1
        experiences.append({"x": x_train[train], "y": y_train[train],
                            "x_test": x_test[test], "y_test": y_test[test]})  # fmt: skip
    return experiences


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def train_experience(
    model: nn.Module, optimizer: torch.optim.Optimizer, data: dict, epochs: int, batch: int
) -> None:
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        order = torch.randperm(len(data["y"]))
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            optimizer.zero_grad()
            loss_fn(model(data["x"][idx]), data["y"][idx]).backward()
            optimizer.step()


def run(store_path: Path, max_experiences: int | None, epochs: int, seed: int, quiet: bool) -> int:
    from tqdm import tqdm

    experiences = split_digits()
    torch.manual_seed(seed)  # before the model: its initial weights come from this stream
    np.random.seed(seed)
    random.seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    accuracy_matrix: list[list[float]] = []

    with Store.open(store_path, mode="c") as store:
        head = store.head
        now = execution.settings(torch.device("cpu"), "32")
        if head is not None:
            # The same determinism contract as engram-train: different thread counts (or
            # torch versions) continue validly but not bit-identically; say so.
            for change in execution.differences(head.meta.get("execution"), now):
                print(f"engram-demo: warning: {change}; the result will not be bit-identical "
                      "to an uninterrupted run", file=sys.stderr)  # fmt: skip
            snap = store.load()
            model.load_state_dict(snap.model)
            optimizer.load_state_dict(snap.state["optimizer"])
            set_rng_state(snap.state["rng"])
            accuracy_matrix = snap.state["accuracy_matrix"]
            print(f"resuming from {head.name} (experiences done: {len(accuracy_matrix)})")
        todo = list(range(len(accuracy_matrix), N_EXPERIENCES))
        if not todo:
            print(f"all {N_EXPERIENCES} experiences are already trained in {store_path}")
        todo = todo[:max_experiences] if max_experiences else todo
        for e in tqdm(todo, desc="experiences", disable=quiet):
            train_experience(model, optimizer, experiences[e], epochs, batch=32)
            row = [accuracy(model, d["x_test"], d["y_test"]) for d in experiences]
            accuracy_matrix.append(row)
            store.commit(
                {
                    "optimizer": optimizer.state_dict(),
                    "rng": rng_state(),
                    "clock": {"experience": e + 1},
                    "accuracy_matrix": accuracy_matrix,
                },
                model=model,
                message=f"after experience {e}",
                meta={"experience": e, "strategy": "naive", "execution": now},
            )

        print_summary(store, accuracy_matrix)
        if store.head is not None:
            fresh = make_model()
            fresh.load_state_dict(store.load(state=False).model)
            x_all = torch.cat([d["x_test"] for d in experiences])
            same = torch.equal(fresh(x_all), model(x_all))
            print(f"reloaded {store.head.name} into a fresh model: predictions identical: {same}")
            return 0 if same else 1
    return 0


def print_summary(store: Store, matrix: list[list[float]]) -> None:
    print("\nversions:")
    for v in store.versions():
        print(f"  {v.name}  parent={v.parent}  {v.message:<22} {v.new_bytes / 1024:8.1f} KiB new")
    if not matrix:
        return
    print("\naccuracy matrix (row: after training experience i, column: tested on j):")
    for i, row in enumerate(matrix):
        print(f"  exp {i}: " + " ".join(f"{a:5.2f}" for a in row))
    from engram.metrics import average_accuracy, forgetting

    print(f"average accuracy over seen experiences: {average_accuracy(matrix):.3f}")
    print(f"average forgetting: {forgetting(matrix):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engram-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("runs/demo"), help="store directory")
    parser.add_argument("--max-experiences", type=int, default=None, help="train at most N now")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        return run(args.store, args.max_experiences, args.epochs, args.seed, args.quiet)
    except EngramError as e:
        print(f"engram-demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
