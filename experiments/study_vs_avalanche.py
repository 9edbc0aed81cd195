"""engram vs Avalanche, each strategy with its own library's defaults, on the same streams.

    .venv/bin/python experiments/study_vs_avalanche.py          # 9 strategies, 4 streams, 3 seeds
    .venv/bin/python experiments/study_vs_avalanche.py --quick  # 3 strategies, 1 stream, 1 seed
    .venv/bin/python experiments/study_vs_avalanche.py --engram-only --strategies ewc \\
        --benchmarks split_digits --override strategy.ewc.ewc_lambda=500   # try a setting

Every strategy that exists in both libraries (naive, EWC, online EWC, SI, LwF, ER/Replay,
DER++/DER, A-GEM, MAS) is run twice per stream and seed, interleaved: engram as
``engram-train strategy=X`` runs it (``engram.train.train`` on the Hydra config, registry
defaults, durable commits), and Avalanche's ``avalanche.training.<Strategy>`` with its
constructor defaults (values with no default: from Avalanche's continual-learning-baselines,
see AVALANCHE below). Matched: the model (engram's MLP input-256-classes, built by
engram's builder from the same seed), the optimizer (SGD lr 0.05, momentum 0.9), 3
epochs, minibatch 32, buffer 200, the stream (the same benchmark object). Avalanche's
accuracy matrix: the whole test stream is evaluated after each experience through
Avalanche's evaluation loop (as benchmarks/vs_avalanche.py does). Average accuracy and
forgetting: engram.metrics on each matrix. Time: seconds per run; the ratio is the sum of
engram's over the sum of Avalanche's in the same interleaved run (order alternates per
seed). Results go to a JSON file (--json; a run given an existing file skips the runs it
holds); --doc replaces the generated section at the end of docs/study.md (the
hand-written reading below it there is not regenerated).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from study import config, mean_std  # the same compose and summary as experiments/study.py

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["naive", "ewc", "online_ewc", "si", "lwf", "replay", "derpp", "agem", "mas"]
BENCHMARKS = ["split_digits", "permuted_digits", "split_mnist1d", "permuted_mnist1d"]
MEM = 200  # engram's default buffer size; Avalanche's Replay and DER default too

# Avalanche: (class name, kwargs for split streams, kwargs for permuted streams). Values
# with no constructor default come from ContinualAI/continual-learning-baselines
# (experiments/permuted_mnist/ewc.py: ewc_lambda=1; split_mnist and permuted_mnist
# synaptic_intelligence.py: si_lambda=1 and 0.1; split_mnist/lwf.py and
# permuted_mnist/lwf.py: alpha=1, temperature=1); online EWC has no baseline there:
# lambda 1 as for EWC and engram's decay 0.9. A-GEM's patterns_per_exp (baseline 250) is
# set to 40 so that the buffer holds 200 after 5 experiences, as engram's.
AVALANCHE: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "naive": ("Naive", {}, {}),
    "ewc": ("EWC", {"ewc_lambda": 1.0}, {"ewc_lambda": 1.0}),
    "online_ewc": (
        "EWC",
        {"ewc_lambda": 1.0, "mode": "online", "decay_factor": 0.9},
        {"ewc_lambda": 1.0, "mode": "online", "decay_factor": 0.9},
    ),
    "si": ("SynapticIntelligence", {"si_lambda": 1.0}, {"si_lambda": 0.1}),
    "lwf": ("LwF", {"alpha": 1.0, "temperature": 1.0}, {"alpha": 1.0, "temperature": 1.0}),
    "replay": ("Replay", {}, {}),
    "derpp": ("DER", {}, {}),  # defaults: mem_size 200, alpha 0.1, beta 0.5
    "agem": ("AGEM", {"patterns_per_exp": MEM // 5}, {"patterns_per_exp": MEM // 5}),
    "mas": ("MAS", {}, {}),  # defaults: lambda_reg 1.0, alpha 0.5
}


def run_engram(work: Path, bench: str, strategy: str, seed: int, overrides: list[str]) -> list:
    from engram.train import train

    store = work / f"e-{bench}-{strategy}-{seed}-{time.monotonic_ns()}"  # no "=" in the path
    return train(config(store, f"benchmark={bench}", f"strategy={strategy}", f"seed={seed}",
                        *overrides))  # fmt: skip


def run_avalanche(work: Path, bench: str, strategy: str, seed: int) -> list:
    """Avalanche's strategy on the stream engram builds, with engram's model and optimizer."""
    import random

    import numpy as np
    import torch
    from avalanche import training
    from avalanche.training.plugins import EvaluationPlugin
    from omegaconf import OmegaConf
    from torch import nn

    from engram.models import build_model
    from engram.streams import build_benchmark
    from engram.train import build_optimizer, model_spec
    from engram.training.template import AccuracyRecorder

    cfg = config(work / "unused", f"benchmark={bench}", f"strategy={strategy}", f"seed={seed}")
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    stream = build_benchmark(OmegaConf.to_container(cfg.benchmark))
    model = build_model(model_spec(cfg, stream.input_shape, stream.n_classes, False))
    name, split_kwargs, permuted_kwargs = AVALANCHE[strategy]
    kwargs = permuted_kwargs if bench.startswith("permuted") else split_kwargs
    recorder = AccuracyRecorder()  # the evaluation engram's template runs, on the same loop
    learner = getattr(training, name)(
        model=model, optimizer=build_optimizer(cfg, model), criterion=nn.CrossEntropyLoss(),
        train_mb_size=cfg.training.batch_size, train_epochs=cfg.training.epochs,
        eval_mb_size=cfg.training.eval_batch_size, evaluator=EvaluationPlugin(loggers=[]),
        plugins=[recorder], device="cpu", **kwargs,
    )  # fmt: skip
    return recorder.accuracy_matrix(learner, stream.train_stream, stream.test_stream)


def timed(fn: Any) -> tuple[list, float]:
    start = time.perf_counter()
    matrix = fn()
    return matrix, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--benchmarks", nargs="+", default=BENCHMARKS)
    parser.add_argument("--quick", action="store_true", help="3 strategies, split digits, 1 seed")
    parser.add_argument("--engram-only", action="store_true", help="skip Avalanche (try settings)")
    parser.add_argument("--override", nargs="*", default=[], help="extra engram overrides")
    parser.add_argument("--json", type=Path, default=None, help="results (default: a temp file)")
    parser.add_argument("--doc", action="store_true", help="write the section of docs/study.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.benchmarks = [0], ["split_digits"]
        args.strategies = ["naive", "ewc", "replay"]
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(1)  # engram's default training.threads, for both
    import avalanche.training  # noqa: F401  (it resets the warning filters on import)

    warnings.filterwarnings("ignore")
    from engram.errors import NonFiniteError
    from engram.metrics import average_accuracy, forgetting

    out = args.json or Path(tempfile.mkdtemp(prefix="engram-vs-av-")) / "results.json"
    results: list[dict[str, Any]] = json.loads(out.read_text()) if out.exists() else []
    done = {(r["bench"], r["strategy"], r["seed"], r["lib"], r["overrides"]) for r in results}
    start = time.perf_counter()
    libs = ["engram"] if args.engram_only else ["engram", "avalanche"]
    with tempfile.TemporaryDirectory(prefix="engram-vs-av-") as tmp:
        work = Path(tmp)
        run_avalanche(work, "split_digits", "naive", 0)  # warm-up: lazy imports, allocator
        for bench in args.benchmarks:
            for strategy in args.strategies:
                for seed in args.seeds:
                    order = libs if seed % 2 == 0 else libs[::-1]
                    for lib in order:
                        ov = " ".join(args.override) if lib == "engram" else ""
                        if (bench, strategy, seed, lib, ov) in done:
                            continue
                        if lib == "engram":
                            fn = lambda: run_engram(work, bench, strategy, seed, args.override)  # noqa: E731,B023
                        else:
                            fn = lambda: run_avalanche(work, bench, strategy, seed)  # noqa: E731,B023
                        try:
                            matrix, seconds = timed(fn)
                        except NonFiniteError as e:  # a setting that diverges: recorded so
                            print(f"{bench} {strategy} seed {seed} {lib} {ov}: {e}")
                            run = {"bench": bench, "strategy": strategy, "seed": seed}
                            results.append({**run, "lib": lib, "overrides": ov, "diverged": True})
                            out.write_text(json.dumps(results))
                            continue
                        results.append({"bench": bench, "strategy": strategy, "seed": seed,
                                        "lib": lib, "overrides": ov, "matrix": matrix,
                                        "seconds": seconds})  # fmt: skip
                        out.write_text(json.dumps(results))
                        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {bench:16s} "
                              f"{strategy:10s} seed {seed} {lib:9s} {ov} acc "
                              f"{average_accuracy(matrix):.3f} forg {forgetting(matrix):.3f} "
                              f"{seconds:.1f}s", flush=True)  # fmt: skip
    print(f"results: {out}")
    command = "python experiments/study_vs_avalanche.py" + " ".join(
        [""] + (argv if argv is not None else sys.argv[1:])
    )
    report = write_report(results, command, (time.perf_counter() - start) / 60)
    print(report)
    if args.doc:
        doc = ROOT / "docs" / "study.md"
        text = doc.read_text()
        text = text.split("\n" + HEADING)[0].rstrip("\n") + "\n\n" + report
        doc.write_text(text)


HEADING = "## engram vs Avalanche, each with its defaults"
KINDS = {
    "split_digits": "split digits (class-incremental)",
    "permuted_digits": "permuted digits (domain-incremental)",
    "split_mnist1d": "split MNIST-1D (class-incremental)",
    "permuted_mnist1d": "permuted MNIST-1D (domain-incremental)",
}


def write_report(results: list[dict[str, Any]], command: str, minutes: float) -> str:
    """The table: one block per stream, engram's defaults (no overrides) vs Avalanche's."""
    import subprocess

    from engram.metrics import average_accuracy, forgetting

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    runs: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        runs.setdefault((r["bench"], r["strategy"], r["lib"], r["overrides"]), []).append(r)
    benches = [b for b in BENCHMARKS if any(k[0] == b for k in runs)]
    lines = [
        HEADING,
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d', time.gmtime())}, commit {head}, "
        f"{minutes:.0f} min on this 2-core VM shared with other work, one thread).",
        "",
    ]
    for bench in benches:
        lines += ["", f"**{KINDS.get(bench, bench)}**", "",
                  "| strategy | engram avg acc | Avalanche avg acc | engram forgetting "
                  "| Avalanche forgetting | time engram/Avalanche |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for strategy in STRATEGIES:
            ours = runs.get((bench, strategy, "engram", ""), [])
            theirs = runs.get((bench, strategy, "avalanche", ""), [])
            if not ours or not theirs:
                continue
            cells = [mean_std([average_accuracy(r["matrix"]) for r in x]) for x in (ours, theirs)]
            cells += [mean_std([forgetting(r["matrix"]) for r in x]) for x in (ours, theirs)]
            ratio = sum(r["seconds"] for r in ours) / sum(r["seconds"] for r in theirs)
            lines.append(f"| {strategy} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    tried = sorted({k for k in runs if k[2] == "engram" and k[3]})
    if tried:
        lines += ["", "Other engram settings tried (`--engram-only --override ...`):", "",
                  "| stream | strategy | override | engram avg acc | seeds |",
                  "|---|---|---|---:|---:|"]  # fmt: skip
        for bench, strategy, _, ov in tried:
            rs = runs[(bench, strategy, "engram", ov)]
            ok = [r for r in rs if not r.get("diverged")]
            acc = mean_std([average_accuracy(r["matrix"]) for r in ok]) if ok else "–"
            if len(ok) < len(rs):
                acc += f" ({len(rs) - len(ok)} diverged)"
            lines.append(f"| {bench} | {strategy} | `{ov}` | {acc} | {len(rs)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
