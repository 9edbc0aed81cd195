"""A custom continual-learning strategy whose state engram persists: the whole recipe.

Run it twice; the second run resumes from the store instead of starting over:

    python experiments/custom_strategy.py --store runs/custom

The strategy, ``GradientNoiseReg``, keeps a running mean of each parameter's squared
gradient over everything it has seen and, from the second experience on, penalizes
moving parameters with a large running mean — a toy importance-weighted regularizer.
Its memory (``running_sq``, ``anchors``, ``steps``) must survive a restart, so the
plugin names those attributes in ``persistent_fields``; nothing else is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from avalanche.core import SupervisedPlugin
from torch import nn

from engram.memory.importance import quadratic_penalty
from engram.stateful import PersistentFields


class GradientNoiseReg(PersistentFields, SupervisedPlugin):
    engram_name = "gradient_noise_reg"  # its key in the store (default: the class name)
    persistent_fields = ("running_sq", "anchors", "steps")  # committed with every version

    def __init__(self, strength: float = 1.0) -> None:
        super().__init__()
        self.strength = strength
        self.running_sq: dict[str, torch.Tensor] = {}
        self.anchors: dict[str, torch.Tensor] = {}
        self.steps = 0

    def hparams(self) -> dict[str, Any]:  # optional: checked against the store on resume
        return {"strength": self.strength}

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.anchors:
            penalty = quadratic_penalty(strategy.model, self.anchors, self.running_sq)
            strategy.loss += self.strength * penalty

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        self.steps += 1
        for name, p in strategy.model.named_parameters():
            if p.grad is not None:
                old = self.running_sq.get(name, torch.zeros_like(p))
                self.running_sq[name] = old + (p.grad.detach() ** 2 - old) / self.steps

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.anchors = {k: p.detach().clone() for k, p in strategy.model.named_parameters()}


def main(argv: list[str] | None = None) -> list[list[float]]:
    from engram.streams.digits import split_digits
    from engram.training.template import DurableTemplate

    parser = argparse.ArgumentParser(description="a custom strategy with persistent state")
    parser.add_argument("--store", type=Path, default=Path("runs/custom"))
    parser.add_argument("--experiences", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-experiences", type=int, default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    bench = split_digits(5)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with DurableTemplate(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        store=args.store,
        plugins=[GradientNoiseReg(strength=10.0)],
        train_epochs=args.epochs,
        name="gradient_noise_reg",
    ) as strategy:
        matrix = strategy.fit(
            bench.train_stream[: args.experiences],
            bench.test_stream[: args.experiences],
            max_experiences=args.max_experiences,
        )
    for i, row in enumerate(matrix):
        print(f"after experience {i}: " + " ".join(f"{a:.2f}" for a in row))
    return matrix


if __name__ == "__main__":
    main()
