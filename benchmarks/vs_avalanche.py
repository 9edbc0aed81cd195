"""engram vs Avalanche end to end: EWC, ER vs Replay, DER++ vs DER, side by side.

Same stream (split digits, 5 class-incremental experiences, embedded data), model (MLP
64-256-10), optimizer (SGD 0.05, momentum 0.9), epochs, minibatch, buffer size and
regularisation strengths, interleaved round by round, one thread. engram commits every
experience durably to a store (fsynced); Avalanche persists nothing. Both evaluate on the
whole test stream after every experience through Avalanche's evaluation loop (engram also
once before training: the FWT baseline it persists).

    python benchmarks/vs_avalanche.py            # 4 epochs, 10 rounds (20 epochs: 3)
    python benchmarks/vs_avalanche.py --quick    # 1 epoch, 1 round
"""

from __future__ import annotations

import warnings
from pathlib import Path
from statistics import stdev
from typing import Any

import torch
from common import command, emit, interleave, machine, median, parser, scratch, table
from torch import nn

warnings.filterwarnings("ignore")

from avalanche.training import DER, EWC, Replay  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402

from engram.metrics import average_accuracy, forgetting  # noqa: E402
from engram.strategies import DERPlugin, ERPlugin, EWCPlugin  # noqa: E402
from engram.streams.digits import split_digits  # noqa: E402
from engram.training.template import AccuracyRecorder, DurableTemplate  # noqa: E402

MEM, BATCH, EWC_LAMBDA, ALPHA, BETA = 200, 32, 100.0, 0.1, 0.5
LONG_EPOCHS, LONG_ROUNDS = 20, 3


def model_and_optimizer(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def run_engram(store: Path, plugin: Any, name: str, epochs: int, seed: int) -> list[list[float]]:
    bench = split_digits(5)
    model, opt = model_and_optimizer(seed)
    with DurableTemplate(model=model, optimizer=opt, store=store, plugins=[plugin],
                         train_mb_size=BATCH, train_epochs=epochs, eval_mb_size=256,
                         name=name, seed=seed) as t:  # fmt: skip
        return t.fit(bench.train_stream, bench.test_stream)


def run_avalanche(cls: Any, epochs: int, seed: int, **kwargs: Any) -> list[list[float]]:
    bench = split_digits(5)
    model, opt = model_and_optimizer(seed)
    recorder = AccuracyRecorder()  # the evaluation engram's template runs, on the same loop
    strategy = cls(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(),
                   train_mb_size=BATCH, train_epochs=epochs, eval_mb_size=256,
                   evaluator=EvaluationPlugin(loggers=[]), plugins=[recorder],
                   **kwargs)  # fmt: skip
    return recorder.accuracy_matrix(strategy, bench.train_stream, bench.test_stream)


PAIRS = [
    ("EWC", "engram EWC", "Avalanche EWC"),
    ("ER", "engram ER", "Avalanche Replay"),
    ("DER++", "engram DER++", "Avalanche DER"),
]


def engram_er() -> ERPlugin:
    # passes through the buffer in random order, as Avalanche's replay loader draws
    return ERPlugin(mem_size=MEM, policy="experience_balanced", admission="experience_end",
                    draw="without_replacement")  # fmt: skip


def compare(epochs: int, rounds: int) -> tuple[list[list[str]], list[str]]:
    """Each pair side by side for ``epochs``; table rows and one-line summaries."""
    # round r runs with seed r (model init, data order): accuracies are means over seeds
    matrices: dict[str, dict[int, list[list[float]]]] = {}
    with scratch("engram-vs-avalanche-") as root:

        def engram(name: str, plugin: Any) -> Any:
            def fn(r: int) -> None:
                runs_of = matrices.setdefault(f"engram {name}", {})
                runs_of[r] = run_engram(
                    root / f"{name}-{r}-{len(runs_of)}-{id(runs_of)}",
                    plugin(),
                    name.lower(),
                    epochs,
                    r,
                )

            return fn

        def avalanche(label: str, cls: Any, **kwargs: Any) -> Any:
            def fn(r: int) -> None:
                matrices.setdefault(label, {})[r] = run_avalanche(cls, epochs, r, **kwargs)

            return fn

        runs = {
            "engram EWC": engram("EWC", lambda: EWCPlugin(ewc_lambda=EWC_LAMBDA)),
            "Avalanche EWC": avalanche("Avalanche EWC", EWC, ewc_lambda=EWC_LAMBDA),
            # buffer policies as Avalanche's: Replay's experience-balanced buffer, DER's
            # class-balanced one
            "engram ER": engram("ER", engram_er),
            "Avalanche Replay": avalanche("Avalanche Replay", Replay, mem_size=MEM),
            "engram DER++": engram(
                "DER++",
                lambda: DERPlugin(
                    mem_size=MEM,
                    alpha=ALPHA,
                    beta=BETA,
                    batch_size_mem=BATCH,
                    policy="class_balanced",
                    admission="experience_end",
                ),
            ),
            "Avalanche DER": avalanche(
                "Avalanche DER", DER, mem_size=MEM, alpha=ALPHA, beta=BETA, batch_size_mem=BATCH
            ),
        }
        interleave(runs, 1)  # warm-up: lazy imports, allocator, page cache
        times = {k: median(v) for k, v in interleave(runs, rounds).items()}

    def mean_of(metric: Any, name: str) -> float:
        values = [metric(m) for m in matrices[name].values()]
        return sum(values) / len(values)

    def with_error(metric: Any, name: str) -> str:
        """The mean over seeds ± its standard error (seed to seed spread / sqrt(n))."""
        values = [metric(m) for m in matrices[name].values()]
        if len(values) < 2:
            return f"{mean_of(metric, name):.3f}"
        return f"{mean_of(metric, name):.3f} ± {stdev(values) / len(values) ** 0.5:.3f}"

    rows = []
    notes = []
    for what, ours, theirs in PAIRS:
        for name in (ours, theirs):
            ratio = times[name] / times[theirs]
            rows.append([name, f"{times[name]:.2f}", f"{ratio:.2f}x",
                         with_error(average_accuracy, name),
                         with_error(forgetting, name)])  # fmt: skip
        notes.append(
            f"{what}: {times[ours] / times[theirs]:.2f}x the time, average accuracy "
            f"{mean_of(average_accuracy, ours):.3f} vs {mean_of(average_accuracy, theirs):.3f}"
        )
    return rows, notes


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=None, help="default 10 (--quick: 1)")
    p.add_argument("--epochs", type=int, default=None, help="default 4 (--quick: 1)")
    args = p.parse_args()
    extra = "".join(f" --{k} {v}" for k in ("rounds", "epochs") if (v := getattr(args, k)))
    rounds = args.rounds or (1 if args.quick else 10)
    epochs = args.epochs or (1 if args.quick else 4)
    torch.set_num_threads(1)
    rows, notes = compare(epochs, rounds)
    long = ""
    if not args.quick:  # the same pairs trained longer: fixed costs matter less
        long_rows, long_notes = compare(LONG_EPOCHS, min(rounds, LONG_ROUNDS))
        long = f"""
### The same pairs, trained for {LONG_EPOCHS} epochs per experience

About 1.5 s a run; {min(rounds, LONG_ROUNDS)} rounds; otherwise as above.

{table(["run", "seconds", "vs Avalanche's", "final average accuracy", "forgetting"], long_rows)}

In short: {"; ".join(long_notes)}.
"""
    emit(
        args,
        f"""
## engram vs Avalanche, end to end

```bash
{command(args, extra)}
```

Split digits (5 class-incremental experiences), MLP 64-256-10, SGD(0.05, momentum 0.9),
{epochs} epoch(s), minibatch {BATCH}, buffer {MEM} (ER, DER), EWC λ={EWC_LAMBDA:g},
DER α={ALPHA}, β={BETA}, one thread; time: median of {rounds} interleaved rounds
(after a warm-up round); round r uses seed r (model initialisation and data order), and
accuracy and forgetting (engram.metrics over each run's accuracy matrix) are means over
those seeds ± their standard error (a difference within about twice it is seed noise).
engram commits every experience durably; Avalanche does not persist.
Buffers: both ER and Replay experience-balanced, both DER++ and DER class-balanced, all
filled at the end of each experience (engram's `admission="experience_end"`); engram's
ER draws passes through its buffer in random order, as Avalanche's loader does
(`draw="without_replacement"`).
Machine: {machine()}.

{table(["run", "seconds", "vs Avalanche's", "final average accuracy", "forgetting"], rows)}

In short: {"; ".join(notes)}.
{long}
Why the pairs differ (target: engram ≤ 1.0x Avalanche's time with equal or better
accuracy):

- **Time**: engram pays fixed costs Avalanche does not: a durable commit per experience
  (~8 ms each, fsyncs; see "Persistence overhead") and one evaluation of the untrained
  model (the FWT baseline). On the sub-second runs of the first table they are most of
  the gap, and trained for {LONG_EPOCHS} epochs (second table) they matter less.
  Run-to-run noise on this shared VM is about ±0.1x even as medians.

- **EWC**: engram's Fisher is per-sample (E[g²]; for `nn.Linear` layers in closed form,
  one batched forward and backward, see "Fisher diagonal"), Avalanche's squares the
  minibatch-mean gradient (E[g]²): a different quantity, about a minibatch-size times
  smaller, so the same λ regularises differently — the accuracies are not of the same
  estimator (in this class-incremental stream both keep little beyond the last
  experience: ~0.17 of ~0.2 for the last alone).
- **ER vs Replay**: both keep an experience-balanced buffer of the same size, filled at
  the end of each experience, so both replay only earlier experiences; engram's buffer
  lives in the store's LMDB (durable at each commit), a buffer minibatch is
  concatenated to each training minibatch, and both draw passes through the buffer in
  random order. engram's default draw, independent picks with replacement, keeps less
  here: 0.900 vs 0.916 ± 0.004 (the table of commit c5ba6d7, 3 seeds).
- **DER++ vs DER**: both keep logits with class-balanced samples and add α·MSE(logits) +
  β·CE on buffer minibatches; engram draws two buffer minibatches (DER++ as in the
  paper), Avalanche one for both terms. Both run one forward a step over the training
  and buffer rows together (engram: for models without batch statistics; with batch
  norm each buffer minibatch gets its own forward). Drawing DER++'s buffer minibatches
  in passes changed nothing measurable: 0.904 ± 0.005 vs 0.909 ± 0.003 (10 seeds).
""",
    )


if __name__ == "__main__":
    main()
