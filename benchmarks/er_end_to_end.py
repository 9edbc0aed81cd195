"""End-to-end experience replay on split digits: engram's LMDB buffer vs an in-memory
tensor buffer vs Avalanche's Replay, side by side in one run.

Same stream (5 experiences), model (MLP 64-256-10), optimizer (SGD 0.05, momentum 0.9),
epochs, minibatch and buffer size. The two engram runs commit to a store after every
experience; Avalanche persists nothing. Reported: wall time (median of rounds) and final
average accuracy over the 5 experiences.

    python benchmarks/er_end_to_end.py --rounds 3
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from common import command, emit, machine, parser
from torch import nn

warnings.filterwarnings("ignore")

from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training import Replay  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from engram.strategies import ERPlugin  # noqa: E402
from engram.streams.digits import split_digits  # noqa: E402
from engram.training.template import DurableTemplate  # noqa: E402

MEM, EPOCHS, BATCH = 200, 4, 32


class InMemoryER(SupervisedPlugin):
    """The same reservoir replay as ERPlugin, with samples in a RAM tensor."""

    # RAM only on purpose (what the durable buffer costs is the measurement): declared,
    # or the template refuses a plugin whose state it would not keep
    engram_transient = ("mem_size", "seen", "x", "y", "admit_rng", "sample_rng", "current")

    def __init__(self, mem_size: int, seed: int = 0) -> None:
        super().__init__()
        self.mem_size, self.seen, self.x, self.y = mem_size, 0, None, None
        self.admit_rng = torch.Generator().manual_seed(seed)
        self.sample_rng = torch.Generator().manual_seed(seed + 1)

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        self.current = (strategy.mb_x, strategy.mb_y)
        if self.x is not None:
            n = len(self.x)
            pick = torch.randint(n, (len(strategy.mb_x),), generator=self.sample_rng)
            strategy.mbatch[0] = torch.cat([strategy.mb_x, self.x[pick]])
            strategy.mbatch[1] = torch.cat([strategy.mb_y, self.y[pick]])
            strategy.mbatch[-1] = torch.cat(
                [strategy.mbatch[-1], strategy.mbatch[-1][: len(pick)] * 0]
            )

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        x, y = self.current
        draws = torch.rand(len(x), dtype=torch.float64, generator=self.admit_rng).tolist()
        for i, u in enumerate(draws):
            self.seen += 1
            if self.x is None:
                self.x, self.y = x[:0].clone(), y[:0].clone()
            if len(self.x) < self.mem_size:
                self.x, self.y = (
                    torch.cat([self.x, x[i : i + 1]]),
                    torch.cat([self.y, y[i : i + 1]]),
                )
            elif (j := int(u * self.seen)) < self.mem_size:
                self.x[j], self.y[j] = x[i], y[i]


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


@torch.no_grad()
def accuracy(model: nn.Module, stream: Any) -> list[float]:
    model.eval()
    out = []
    for exp in stream:
        xs, ys = zip(*[(s[0], s[1]) for s in exp.dataset], strict=True)
        x, y = torch.stack(xs), torch.tensor(ys)
        out.append((model(x).argmax(1) == y).float().mean().item())
    model.train()
    return out


def run_engram(store: Path, plugin: Any) -> float:
    bench = split_digits(5)
    model, opt = model_and_optimizer()
    with DurableTemplate(model=model, optimizer=opt, store=store, plugins=[plugin],
                         train_mb_size=BATCH, train_epochs=EPOCHS, name="er") as t:  # fmt: skip
        matrix = t.fit(bench.train_stream, bench.test_stream)
    return sum(matrix[-1]) / len(matrix[-1])


def run_avalanche() -> float:
    bench = split_digits(5)
    model, opt = model_and_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = Replay(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), mem_size=MEM,
                          train_mb_size=BATCH, train_epochs=EPOCHS,
                          evaluator=EvaluationPlugin(loggers=[]))  # fmt: skip
    for exp in bench.train_stream:
        strategy.train(exp)
        row = accuracy(model, bench.test_stream)
    return sum(row) / len(row)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 1)")
    args = p.parse_args()
    extra = f" --rounds {args.rounds}" if args.rounds else ""
    args.rounds = args.rounds or (1 if args.quick else 5)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="engram-er-"))
    times: dict[str, list[float]] = {}
    accs: dict[str, float] = {}
    runs = {
        "engram ER, LMDB buffer (durable)": lambda r: run_engram(root / f"lmdb{r}", ERPlugin(MEM)),
        "engram ER, in-memory buffer (durable)": lambda r: run_engram(
            root / f"mem{r}", InMemoryER(MEM)
        ),
        "Avalanche Replay (not persisted)": lambda r: run_avalanche(),
    }
    try:
        for r in range(args.rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                accs[name] = fn(r)
                times.setdefault(name, []).append(time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ref = statistics.median(times["engram ER, in-memory buffer (durable)"])
    rows = []
    for name, values in times.items():
        med = statistics.median(values)
        rows.append(f"| {name} | {med:.2f} | {med / ref:.2f}x | {accs[name]:.3f} |")
    lmdb = statistics.median(times["engram ER, LMDB buffer (durable)"]) / ref
    ours, theirs = (
        accs["engram ER, LMDB buffer (durable)"],
        accs["Avalanche Replay (not persisted)"],
    )
    table = "\n".join(rows)
    emit(
        args,
        f"""
### End-to-end ER: LMDB buffer vs in-memory buffer

```bash
{command(args, extra)}
```

Split digits, 5 experiences, {EPOCHS} epochs, minibatch {BATCH}, buffer {MEM}, MLP 64-256-10,
SGD(0.05, momentum 0.9), one thread; median of {args.rounds} interleaved rounds.
Machine: {machine()}.

| run | seconds (median) | vs in-memory buffer | final average accuracy |
|---|---:|---:|---:|
{table}

- engram's LMDB buffer costs {lmdb:.2f}x the time of the same ER with an in-memory tensor
  buffer (target ≤ 1.3x), both committing every experience durably; accuracy is the same
  (same reservoir and sampling streams). Before samples were written behind, one synced
  LMDB transaction per minibatch made it 2.0x.
- Avalanche's `Replay` (same model, optimizer, epochs, minibatch, buffer size; no
  persistence) reaches {theirs:.3f} vs our {ours:.3f}. Its buffer is filled
  experience-balanced at the end of each experience (ours admits by reservoir during
  training) and its loader draws current and buffer samples through a different batch
  composition: a policy difference, not a storage one (the in-memory run with our policy
  matches ours exactly). The strategy-by-strategy comparison is in "engram vs Avalanche".
""",
    )


if __name__ == "__main__":
    main()
