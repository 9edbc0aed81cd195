"""Persistence overhead and the training stall of synchronous vs asynchronous commits.

1. The same run (split digits, 5 experiences, MLP, SGD with momentum, naive — engram-train's
   default strategy) with persistence disabled (the template's commit is a no-op), with a
   durable commit per experience, and with a mid-experience checkpoint every N iterations
   on top, synchronous or asynchronous (``DurableTemplate(async_commit=True)``).
2. The training thread's stall — the time it spends in ``commit()`` — for a mid-experience
   checkpoint of the same state, committed synchronously vs asynchronously (staged copy,
   persisted by a background thread), interleaved round by round.

    python benchmarks/persistence.py            # ~50 MiB stall state, 3 rounds
    python benchmarks/persistence.py --quick
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch
from common import command, emit, interleave, machine, median, parser, scratch, table
from torch import nn

warnings.filterwarnings("ignore")

from engram.streams.digits import split_digits  # noqa: E402
from engram.training.template import DurableTemplate  # noqa: E402

BATCH = 32
ITERATIONS = [0]  # training iterations of one run


class NoPersistence(DurableTemplate):
    """The reference: the same template with every commit a no-op."""

    def commit(self, message: str = "", **kwargs: Any) -> None:
        pass


class Timed(DurableTemplate):
    """Records how long the training thread spends in each mid-experience commit."""

    stalls: list[float]

    def commit(self, message: str = "", **kwargs: Any) -> None:
        mid = self.cursor.mid_experience
        start = time.perf_counter()
        super().commit(message, **kwargs)
        if mid:
            self.stalls.append(time.perf_counter() - start)


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))  # fmt: skip


def run(cls: type, store: Path, hidden: int, epochs: int, stalls: list, **kwargs: Any) -> None:
    bench = split_digits(5)
    torch.manual_seed(0)
    model = mlp(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with cls(model=model, optimizer=opt, store=store, train_mb_size=BATCH,
             train_epochs=epochs, eval_mb_size=256, **kwargs) as t:  # fmt: skip
        t.stalls = stalls
        t.fit(bench.train_stream, bench.test_stream)
        ITERATIONS[0] = t.clock.train_iterations


def stall_template(store: Path, hidden: int, async_commit: bool) -> DurableTemplate:
    torch.manual_seed(0)
    model = mlp(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model(torch.randn(8, 64)).sum().backward()
    opt.step()  # momentum buffers exist
    t = DurableTemplate(model=model, optimizer=opt, store=store, async_commit=async_commit)
    t.cursor.iteration = 1  # a mid-experience checkpoint
    return t


LONG_EPOCHS, LONG_EVERY = 30, 200  # the realistic cadence of the second table


def overhead(root: Path, hidden: int, epochs: int, every: int, rounds: int):
    """Median seconds per variant, and the training-thread stalls of mid checkpoints."""
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    n = iter(range(10**6))

    def variant(cls: type, key: str | None = None, **kwargs: Any) -> Any:
        def fn(_: int) -> None:
            bucket = stalls[key] if key else []
            run(cls, root / f"s{next(n)}", hidden, epochs, bucket, **kwargs)

        return fn

    runs = {
        "persistence disabled (reference)": variant(NoPersistence),
        "durable commit per experience": variant(Timed),
        f"+ checkpoint every {every} iterations, synchronous": variant(
            Timed, "sync", commit_every_iterations=every
        ),
        f"+ checkpoint every {every} iterations, asynchronous": variant(
            Timed, "async", commit_every_iterations=every, async_commit=True
        ),
    }
    interleave(runs, 1)  # warm-up
    for bucket in stalls.values():
        bucket.clear()
    return {k: median(v) for k, v in interleave(runs, rounds).items()}, stalls


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 1)")
    p.add_argument("--every", type=int, default=None, help="checkpoint every N iterations")
    args = p.parse_args()
    extra = "".join(f" --{k} {v}" for k in ("rounds", "every") if (v := getattr(args, k)))
    rounds = args.rounds or (1 if args.quick else 3)
    epochs = 1 if args.quick else 4
    hidden = 256 if args.quick else 512
    every = args.every or (10 if args.quick else 20)
    stall_hidden = 512 if args.quick else 2560
    torch.set_num_threads(1)
    with scratch("engram-persistence-") as root:
        times, stalls = overhead(root / "short", hidden, epochs, every, rounds)
        iterations = ITERATIONS[0]
        long_times = None
        if not args.quick:  # the same run, long enough that commits are not most of it
            long_times, long_stalls = overhead(root / "long", hidden, LONG_EPOCHS, LONG_EVERY, 3)
            long_iterations = ITERATIONS[0]

        # (2) the stall for one larger state, sync vs async, interleaved
        templates = {
            "synchronous": stall_template(root / "stall-sync", stall_hidden, False),
            "asynchronous": stall_template(root / "stall-async", stall_hidden, True),
        }
        state_bytes = 3 * sum(p.numel() * 4 for p in templates["synchronous"].model.parameters())
        stall_rounds = 3 if args.quick else 7
        commit_times: dict[str, list[float]] = {k: [] for k in templates}
        total_async: list[float] = []
        for _ in range(stall_rounds):
            for name, t in templates.items():
                with torch.no_grad():
                    for param in t.model.parameters():
                        param.add_(1e-3)  # every chunk changes, as in training
                start = time.perf_counter()
                t.commit("mid")
                commit_times[name].append(time.perf_counter() - start)
                if t.checkpointer.committer is not None:
                    t.checkpointer.wait()
                    total_async.append(time.perf_counter() - start)
        for t in templates.values():
            t.close()
    ref = times["persistence disabled (reference)"]
    rows = [[name, f"{sec:.2f}", f"{sec / ref:.3f}x"] for name, sec in times.items()]
    long_section = ""
    if long_times is not None:
        long_ref = long_times["persistence disabled (reference)"]
        long_rows = [[k, f"{v:.2f}", f"{v / long_ref:.3f}x"] for k, v in long_times.items()]
        long_mid = median(long_stalls["async"]) if long_stalls["async"] else float("nan")
        long_section = f"""
### The same run, longer

{LONG_EPOCHS} epochs ({long_iterations} training iterations, about {long_ref:.1f} s without
persistence), a checkpoint every {LONG_EVERY} iterations (one per
~{1000 * long_ref / long_iterations * LONG_EVERY:.0f} ms of training), 3 interleaved rounds
after a warm-up; otherwise as above (asynchronous stall per checkpoint:
{1000 * long_mid:.1f} ms).

{table(["run", "seconds", "vs persistence disabled"], long_rows)}

- The cost per commit is fixed, so once an experience trains for more than a second or
  so, per-experience commits and checkpoints every few hundred iterations are within the
  1.05x target; the sub-second run above is the worst case.
- Asynchronous checkpoints cut the time the training thread spends in `commit()` (the
  stall) to a quarter here, yet the runs take no less time in all: for a state this small
  the commit is mostly fixed syncs, and the background thread's Python work competes with
  this Python-bound training loop for the GIL and the 2 vCPUs. They pay off when a commit
  is large (next table).
"""
    mid_sync = median(stalls["sync"]) if stalls["sync"] else float("nan")
    mid_async = median(stalls["async"]) if stalls["async"] else float("nan")
    sync_s, async_s = median(commit_times["synchronous"]), median(commit_times["asynchronous"])
    n_params = sum(p.numel() for p in mlp(hidden).parameters())
    cadence = 1000 * ref / iterations * every  # ms of (unpersisted) run per checkpoint
    emit(
        args,
        f"""
## Persistence overhead and asynchronous commits

```bash
{command(args, extra)}
```

### Overhead of durability

Split digits (5 experiences), MLP 64-{hidden}-{hidden}-10 ({n_params:,} parameters),
SGD(0.05, momentum 0.9), naive, {epochs} epoch(s), minibatch {BATCH}, one thread; median
of {rounds} interleaved rounds; {iterations} training iterations in all, so a
checkpoint every {every} iterations is one per ~{cadence:.0f} ms of the run (a very
aggressive cadence, to make the cost visible). "Persistence disabled" is the same
template with a no-op commit. Machine: {machine()}.

{table(["run", "seconds", "vs persistence disabled"], rows)}

Time in `commit()` per mid-experience checkpoint (median): synchronous
{1000 * mid_sync:.1f} ms, asynchronous {1000 * mid_async:.1f} ms.

- Target ≤ 1.05x. A commit of this small state costs a fixed ~5 syncs (pack file,
  checkpoint file, their directories, the LMDB transaction that publishes the version
  and, with a replay buffer, its pending samples too): a few ms in all on this VM's
  virtual disk, whatever the state size, so the ratio is set by how many commits a
  second of training carries. Asynchronous checkpoints take them off the training
  thread; the experience-end commits stay synchronous (the next experience, `fit`'s
  return and the runner's regression gate rely on that version being durable).
{long_section}
### Training stall of a mid-experience checkpoint

The same state — MLP 64-{stall_hidden}-{stall_hidden}-10: weights, SGD momentum and the
checkpoint, {state_bytes / 2**20:.0f} MiB written per commit, every chunk changed —
committed from a mid-experience cursor, median of {stall_rounds} interleaved rounds.

{
            table(
                ["commit", "training-thread stall (s)", "vs synchronous"],
                [
                    ["synchronous", f"{sync_s:.3f}", "1.00x"],
                    [
                        "asynchronous (staging copy; persisted in the background)",
                        f"{async_s:.3f}",
                        f"{async_s / sync_s:.2f}x",
                    ],
                    [
                        "asynchronous, until durable (for reference)",
                        f"{median(total_async):.3f}",
                        f"{median(total_async) / sync_s:.2f}x",
                    ],
                ],
            )
        }

- Target: stall ≤ 20% of a synchronous commit. The asynchronous stall is copying the
  tensors (weights, optimizer and plugin state: training mutates them in place) and
  flushing pending replay samples; hashing, pack and checkpoint writes, fsyncs and the
  publishing transaction run in the background thread. At most one commit is in flight:
  a checkpoint due while the previous one still runs waits for it (that wait is stall).
""",
    )


if __name__ == "__main__":
    main()
