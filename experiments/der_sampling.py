"""DER++'s buffer sampling vs Avalanche's DER on split digits, accuracy over seeds.

Variants of engram's DER++ (the paper's: two independent buffer minibatches, drawn with
replacement) — drawn in passes, one minibatch for both terms (Avalanche's DER), both —
against Avalanche's DER, with vs_avalanche.py's model, optimizer and settings. Prints
each one's mean final average accuracy ± its standard error (docs/benchmarks.md,
"DER++ in one forward").

    .venv/bin/python experiments/der_sampling.py 4 10    # epochs, seeds
    .venv/bin/python experiments/der_sampling.py 20 8
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import torch
import vs_avalanche as V
from avalanche.training import DER

from engram.metrics import average_accuracy
from engram.strategies import DERPlugin
from engram.strategies.memory import ReplayMemory


class OneMinibatch(DERPlugin):
    """DER++ with one buffer minibatch for both terms, as Avalanche's DER."""

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        buffer = self.memory.buffer
        if buffer is None:
            return super().before_forward(strategy, **kwargs)
        draw, first = buffer.sample, []

        def once(n: int) -> Any:
            if not first:
                first.append(draw(n))
            return first[0]

        buffer.sample = once
        try:
            super().before_forward(strategy, **kwargs)
        finally:
            buffer.sample = draw


def plugin(draw: str = "with_replacement", cls: type = DERPlugin) -> DERPlugin:
    p = cls(mem_size=V.MEM, alpha=V.ALPHA, beta=V.BETA, batch_size_mem=V.BATCH,
            policy="class_balanced", admission="experience_end")  # fmt: skip
    p.memory = ReplayMemory(V.MEM, "class_balanced", 0, draw)
    return p


def main() -> None:
    epochs, seeds = int(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    variants = {
        "engram DER++": lambda: plugin(),
        "engram DER++, passes": lambda: plugin("without_replacement"),
        "engram DER++, one minibatch": lambda: plugin(cls=OneMinibatch),
        "engram DER++, one minibatch, passes": lambda: plugin("without_replacement", OneMinibatch),
    }
    accuracy: dict[str, list[float]] = {k: [] for k in [*variants, "Avalanche DER"]}
    with tempfile.TemporaryDirectory() as root:
        for seed in range(seeds):
            for i, (name, make) in enumerate(variants.items()):
                store = Path(root) / f"{i}-{seed}"
                accuracy[name].append(average_accuracy(V.run_engram(store, make(), "der",
                                                                    epochs, seed)))  # fmt: skip
            matrix = V.run_avalanche(DER, epochs, seed, mem_size=V.MEM, alpha=V.ALPHA,
                                     beta=V.BETA, batch_size_mem=V.BATCH)  # fmt: skip
            accuracy["Avalanche DER"].append(average_accuracy(matrix))
    for name, values in accuracy.items():
        error = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
        print(f"{name:38s} {statistics.mean(values):.4f} ± {error:.4f}")


if __name__ == "__main__":
    main()
