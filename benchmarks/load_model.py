"""Loading for inference: `engram.load_model` vs `torch.load` of a pickled model.

Both are timed from a fresh process to its first prediction (interpreter start, imports,
load, one forward pass), side by side in one run, interleaved round by round (the order
alternates), and reported as a ratio. Run::

    python benchmarks/load_model.py                 # 13.7M-parameter MLP, 7 rounds
    python benchmarks/load_model.py --quick         # a small MLP, 3 rounds
    python benchmarks/load_model.py --markdown out.md   # also write the docs section there

The page cache is warmed before the first round: this measures the software path, not
the disk. `torch.load` of a whole pickled module needs ``weights_only=False``, i.e. it
executes code from the file; `load_model` reads only JSON and safetensors.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each child prints "<seconds from its first line to the prediction> <of which after
# `import torch`>" and exits; what each path imports beyond torch counts as loading.
CHILD_ENGRAM = """
import time; t0 = time.perf_counter()
import torch; t1 = time.perf_counter()
import engram
model = engram.load_model({store!r})
y = model(torch.zeros(1, *{shape}))
t2 = time.perf_counter(); print(t2 - t0, t2 - t1, flush=True)
"""
CHILD_TORCH = """
import time; t0 = time.perf_counter()
import torch; t1 = time.perf_counter()
model = torch.load({pickle!r}, weights_only=False).eval()
y = model(torch.zeros(1, *{shape}))
t2 = time.perf_counter(); print(t2 - t0, t2 - t1, flush=True)
"""


HEADER = (
    "| load path | spawn to first prediction (s) | vs torch.load | in process (s) "
    "| after `import torch` (s) | vs torch.load |\n|---|---:|---:|---:|---:|---:|"
)


def time_child(code: str) -> tuple[float, float, float]:
    """Seconds: spawn to the printed prediction, inside the child, after `import torch`."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    wall = time.perf_counter() - start
    proc.wait()
    if proc.returncode != 0 or not line:
        raise SystemExit(f"benchmark child failed (exit {proc.returncode})")
    inside, after_torch = map(float, line.split())
    return wall, inside, after_torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model, 3 rounds")
    p.add_argument("--markdown", type=Path, help="write the Markdown section here")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 7, quick 3)")
    args = p.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    hidden = [128] if args.quick else [1024, 1024]
    spec = {"name": "mlp", "args": {"input_shape": [3, 64, 64], "n_classes": 100, "hidden": hidden}}

    import torch

    from engram.models import build_model
    from engram.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="engram-load-model-"))
    try:
        model = build_model(spec).eval()
        n_params = sum(p.numel() for p in model.parameters())
        with Store.open(tmp / "store", mode="c") as store:
            store.commit({}, model=model, meta={"model_spec": spec})
        torch.save(model, tmp / "model.pt")  # the whole module, pickled
        shape = tuple(spec["args"]["input_shape"])
        children = {
            "engram.load_model": CHILD_ENGRAM.format(store=str(tmp / "store"), shape=shape),
            "torch.load (pickled module)": CHILD_TORCH.format(
                pickle=str(tmp / "model.pt"), shape=shape
            ),
        }
        for code in children.values():  # warm the page cache and the import caches
            time_child(code)
        walls: dict[str, list[float]] = {name: [] for name in children}
        insides: dict[str, list[float]] = {name: [] for name in children}
        loads: dict[str, list[float]] = {name: [] for name in children}
        for r in range(rounds):
            order = list(children) if r % 2 == 0 else list(reversed(children))
            for name in order:
                wall, inside, load = time_child(children[name])
                walls[name].append(wall)
                insides[name].append(inside)
                loads[name].append(load)
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    wall = {k: statistics.median(v) for k, v in walls.items()}
    inside = {k: statistics.median(v) for k, v in insides.items()}
    load = {k: statistics.median(v) for k, v in loads.items()}
    ref = "torch.load (pickled module)"
    rows = [
        f"| {name} | {wall[name]:.3f} | {wall[name] / wall[ref]:.2f}x | {inside[name]:.3f} | "
        f"{load[name]:.3f} | {load[name] / load[ref]:.2f}x |"
        for name in children
    ]
    quick = " --quick" if args.quick else ""
    extra = f" --rounds {args.rounds}" if args.rounds else ""
    text = f"""
## Loading for inference (issue 6)

Command ({time.strftime("%Y-%m-%d")}, page cache warm):

```bash
.venv/bin/python benchmarks/load_model.py{quick}{extra}
```

Model: `mlp` (input 3x64x64, hidden {hidden}, 100 classes), {n_params / 1e6:.1f}M parameters,
{nbytes / 2**20:.1f} MiB of float32 weights. Each figure is the median of {rounds} interleaved
rounds of a fresh `python` process loading the model and making its first prediction;
"after `import torch`" is what remains once the import both paths share is done (the
imports engram itself needs — LMDB, the store — count as loading).

Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}

{HEADER}
{chr(10).join(rows)}

`engram.load_model(store, version)` opens the store read-only (no lock: it works while a
trainer commits), resolves the version (HEAD, a tag, an id, `HEAD~1`), checks the
checkpoint's XXH3 checksum, rebuilds the architecture from the recorded spec through the
builder allowlist on the meta device (no random initialisation) and assigns the
safetensors weights. `torch.load` of a pickled module needs `weights_only=False`, which
executes code from the file; the store never does.
"""
    text = textwrap.dedent(text).strip() + "\n"
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
