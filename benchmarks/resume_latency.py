"""Resume latency: from process start to the first training iteration of a resumed run.

A store holds a run stopped after its first experience, with a ~100 MiB state (MLP
weights + Adam's two moments). A fresh Python process then resumes it, and the time from
its start to its first training iteration is broken down: interpreter start, imports,
data, model, store open, template construction, state restore (load + apply), and the
rest of ``fit`` up to the first minibatch. Also: ``import engram`` alone.

    python benchmarks/resume_latency.py            # ~100 MiB state, 5 resumes
    python benchmarks/resume_latency.py --quick    # ~3 MiB, 1 resume
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

T0 = time.time()  # as early as this process can tell (after the interpreter started)

CHILD = "--child"


def _child(store: str, hidden: int, create: bool) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    marks = {"interpreter": T0}
    import torch
    from avalanche.core import SupervisedPlugin

    from engram.store import Store
    from engram.streams.digits import split_digits
    from engram.training.template import DurableTemplate

    marks["imports"] = time.time()
    torch.set_num_threads(1)
    bench = split_digits(5)
    train, test = list(bench.train_stream), list(bench.test_stream)
    marks["data"] = time.time()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, 10))  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    marks["model"] = time.time()
    store_handle = Store.open(store, mode="c")
    marks["store open"] = time.time()

    class FirstIteration(SupervisedPlugin):
        def before_training_iteration(self, strategy, **kwargs) -> None:
            if not create:
                marks["first iteration"] = time.time()
                print(json.dumps(marks), flush=True)
                os._exit(0)

    template = DurableTemplate(
        model=model, optimizer=optimizer, store=store_handle, plugins=[FirstIteration()],
        train_epochs=1, name="latency",
    )  # fmt: skip
    marks["template"] = time.time()
    if create:
        template.fit(train, test, max_experiences=1)
        template.close()
        store_handle.close()
        return
    template.restore(train + test)
    marks["state restore"] = time.time()
    template.fit(train, test)
    raise SystemExit("never reached the first iteration")


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import command, emit, machine, median, parser, scratch, table

    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 1)")
    args = p.parse_args()
    extra = f" --rounds {args.rounds}" if args.rounds else ""
    rounds = args.rounds or (1 if args.quick else 5)
    hidden = 512 if args.quick else 2900  # 3 x 8.6 M float32 = ~100 MiB

    def python(*argv: str) -> tuple[float, str]:
        start = time.time()
        out = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"child failed: {out.stderr[-2000:]}")
        return start, out.stdout

    phases = ["interpreter", "imports", "data", "model", "store open", "template",
              "state restore", "first iteration"]  # fmt: skip
    spans: dict[str, list[float]] = {k: [] for k in phases}
    totals: list[float] = []
    import_engram, bare = [], []
    with scratch("engram-resume-") as root:
        store = str(root / "store")
        python(__file__, CHILD, "create", store, str(hidden))
        from engram.store import Store

        with Store.open(store) as s:
            state_bytes = s.head.nbytes
        for _ in range(rounds):
            start, out = python(__file__, CHILD, "resume", store, str(hidden))
            marks = json.loads(out.strip().splitlines()[-1])
            previous = start
            for name in phases:
                spans[name].append(marks[name] - previous)
                previous = marks[name]
            totals.append(marks["first iteration"] - start)
            t, _ = python("-c", "import engram")
            import_engram.append(time.time() - t)
            t, _ = python("-c", "pass")
            bare.append(time.time() - t)
    total = median(totals)
    rows = [[name, f"{median(spans[name]):.3f}", f"{100 * median(spans[name]) / total:.1f}%"]
            for name in phases]  # fmt: skip
    rows.append(["**total: process start to first iteration**", f"{total:.3f}", "100%"])
    restore = median(spans["state restore"])
    emit(
        args,
        f"""
## Resume latency

```bash
{command(args, extra)}
```

A run stopped after experience 0 of split digits, resumed in a fresh process: state of
{state_bytes / 2**20:.0f} MiB (MLP 64-{hidden}-{hidden}-10 weights and Adam's two
moments), page cache warm, median of {rounds} resumes. Each phase is the time since the
previous one; "interpreter" is from `subprocess` start to the script's first line.
Machine: {machine()}.

{table(["phase", "seconds", "share"], rows)}

- **Restore share for this state: {100 * restore / total:.1f}%** ({restore:.3f} s: read
  HEAD's manifest, load the state chunks and the safetensors checkpoint, check the
  hyperparameters and architecture, load model, optimizer, plugin, RNG and clock state).
- Imports dominate: `import avalanche` alone takes seconds (it imports torchvision, whose
  ops import `torch._dynamo`; torchmetrics, which imports `scipy.signal`; and `wandb` if
  installed) and engram's template subclasses Avalanche's, so a resumed *training* process
  cannot avoid it. "template" is mostly Avalanche's template construction.
- `import engram` stays light: {median(import_engram):.3f} s vs {median(bare):.3f} s for a bare
  `python -c pass` (torch, lmdb and Avalanche load on first use; tests/test_project.py
  checks it).
""",
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        _child(sys.argv[3], int(sys.argv[4]), create=sys.argv[2] == "create")
    else:
        main()
