"""Inspection latency: `engram ls/show/verify/diff` vs `python -c pass` and `import torch`.

Each figure is a fresh process from spawn to exit (interpreter start, imports, the
command), timed side by side in one run, interleaved round by round (the order
alternates), median of the rounds. The inspection commands import neither torch nor
Avalanche (issue 26 item 3), so `engram ls` of a small store should cost little more than
an empty interpreter, not as much as `import torch`. Run::

    python benchmarks/cli_latency.py                 # 9 rounds
    python benchmarks/cli_latency.py --quick         # 2 rounds
    python benchmarks/cli_latency.py --markdown out.md   # also write the docs section there

The store: three versions of a small MLP with EWC importances, an optimizer state and a
replay slot table, as `tests/test_cli.py` builds it. The page cache is warm (one
untimed run of each command first): this measures imports and work, not the disk.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from common import command, emit, git_commit, machine, parser, scratch, table

LS_BUDGET = 0.3  # seconds of wall for `engram ls` of a small store (issue 26 item 3)
ROUNDS, QUICK_ROUNDS = 9, 2

# A child that runs one command in process and prints which heavy modules it imported.
IMPORTS = """
import contextlib, io, sys
from engram.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    code = main({argv!r})
print(code, sorted(m for m in ("torch", "avalanche") if m in sys.modules))
"""


def build(path: Path) -> None:
    """Three versions of a small EWC + replay run (torch here, in the parent only)."""
    import torch

    from engram.models import build_model
    from engram.store import SampleIds, Store

    torch.manual_seed(0)
    spec = {"name": "mlp", "args": {"input_shape": [8], "n_classes": 3, "hidden": [16]}}
    model = build_model(spec)
    fisher: dict = {}
    with Store.open(path, mode="c") as store:
        for e in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            fisher[str(e)] = {k: torch.rand_like(v) for k, v in model.state_dict().items()}
            ids = store.samples.append([bytes([e]) * 32 for _ in range(4)])
            plugins = {"ewc": {"importances": dict(fisher)}, "replay": {"slots": SampleIds.of(ids)}}
            state = {
                "optimizer": {"state": {0: {"momentum_buffer": torch.randn(16, 8)}}},
                "plugins": plugins,
                "metrics": {"accuracy_matrix": [[0.9] * (e + 1)]},
            }
            meta = {"experience": e, "model_spec": spec, "metrics": {"average_accuracy": 0.9}}
            store.commit(state, model=model, message=f"after experience {e}", meta=meta)


def wall(argv: list[str]) -> float:
    """Seconds from spawn to exit of ``argv`` (its output discarded; it must succeed)."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def imported(argv: list[str]) -> str:
    """The heavy modules ``engram <argv>`` imports (one run, in a fresh interpreter)."""
    code = IMPORTS.format(argv=argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.startswith("0 "):
        raise SystemExit(f"engram {argv} failed:\n{out.stdout}\n{out.stderr[-3000:]}")
    names = out.stdout.split(" ", 1)[1].strip()
    return "none" if names == "[]" else names.strip("[]").replace("'", "")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int,
                   help=f"interleaved rounds (default {ROUNDS}, quick {QUICK_ROUNDS})")  # fmt: skip
    args = p.parse_args()
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    script = Path(sys.executable).with_name("engram")  # the console script users run
    engram = [str(script)] if script.exists() else [sys.executable, "-m", "engram.cli"]
    with scratch("engram-cli-latency-") as root:
        store = str(root / "store")
        build(Path(store))
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            "engram ls STORE": [*engram, "ls", store],
            "engram show STORE": [*engram, "show", store],
            "engram verify STORE --all": [*engram, "verify", store, "--all"],
            "engram diff STORE HEAD~1 HEAD": [*engram, "diff", store, "HEAD~1", "HEAD"],
        }
        heavy = {
            name: imported(argv[len(engram) :]) if name.startswith("engram") else "-"
            for name, argv in commands.items()
        }
        for argv in commands.values():  # warm the page cache and the import caches
            wall(argv)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for r in range(rounds):
            for name in list(commands) if r % 2 == 0 else list(reversed(commands)):
                times[name].append(wall(commands[name]))
    median = {name: statistics.median(t) for name, t in times.items()}
    empty, torch_ = median["python -c pass"], median['python -c "import torch"']
    rows = []
    for name in commands:
        over, ratio = f"{median[name] - empty:+.3f}", f"{median[name] / torch_:.2f}x"
        rows.append([f"`{name}`", f"{median[name]:.3f}", over, ratio, heavy[name]])
    ls = median["engram ls STORE"]
    verdict = "within" if ls <= LS_BUDGET else "over"
    extra = f" --rounds {args.rounds}" if args.rounds else ""
    text = f"""
## Inspection latency

Command ({time.strftime("%Y-%m-%d")}, commit {git_commit()}, page cache warm):

```bash
{command(args, extra)}
```

Machine: {machine()}

Each figure is the median of {rounds} interleaved rounds of a fresh process, spawn to
exit; the store is three versions of a small MLP with EWC importances, an optimizer
state and a replay slot table. "imports" is what the command, run once in process,
left in `sys.modules` of torch and Avalanche.

{table(["command", "wall (s)", "over `python -c pass` (s)", "vs `import torch`", "imports"],
       rows, "lrrrl")}

`engram ls` took {ls:.3f} s, {verdict} its {LS_BUDGET} s budget: the inspection commands
(`ls`, `show`, `verify`, `du`, `tag`, `rollback`, `diff`, `export --format safetensors`)
read manifests, LMDB records and checkpoint files' headers and bytes through numpy and
safetensors (`diff` compares two versions' arrays, bfloat16 and float8 widened by
engram), and import torch only to run a model (`export --format onnx`).
"""  # fmt: skip
    emit(args, textwrap.dedent(text))


if __name__ == "__main__":
    main()
