"""A reproducible study on the embedded benchmarks; writes docs/study.md and docs/study.png.

    .venv/bin/python experiments/study.py                  # 2 benchmarks x 8 strategies x 3 seeds
    .venv/bin/python experiments/study.py --quick          # 2 strategies x 1 seed, smoke

Part 1: naive, EWC, online EWC, SI, LwF, ER, DER++ and EWC+ER on class-incremental split
digits (5 x 2 classes) and domain-incremental permuted digits (5 permutations), each
with the configs in src/engram/configs (no per-strategy tuning beyond them), 3 seeds:
mean and standard deviation of the final average accuracy and forgetting.

Part 2: "restart each task in a new process". Every experience is trained by a fresh
run; with engram, that run restores everything from the store (``run.max_experiences=1``
repeated — bit-identical to one uninterrupted run, see tests/test_train.py); the
alternative keeps only the model file: the next run loads the weights and starts with
fresh strategy state (no Fisher, no buffer, no teacher), a fresh optimizer, and no
accuracy history. Each run here is a fresh set of objects in this process, which is
what a new process would have; the accuracy matrix of the model-only lineage is
assembled from each run's evaluation.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ["naive", "ewc", "online_ewc", "si", "lwf", "replay", "derpp", "ewc_replay"]
RESTART = ["ewc", "lwf", "replay", "derpp"]
BENCHMARKS = ["split_digits", "permuted_digits"]


def config(store: Path, *overrides: str) -> Any:
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose(
            "train",
            overrides=[f"store.path={store}", "run.quiet=true", "logger=none", *overrides],
        )


def uninterrupted(work: Path, bench: str, strategy: str, seed: int) -> list[list[float]]:
    from engram.train import train

    return train(config(work / f"{bench}-{strategy}-{seed}", f"benchmark={bench}",
                        f"strategy={strategy}", f"seed={seed}"))  # fmt: skip


def engram_restarts(work: Path, bench: str, strategy: str, seed: int, n: int) -> list[list[float]]:
    from engram.train import train

    cfg = config(work / f"r-{bench}-{strategy}-{seed}", f"benchmark={bench}",
                 f"strategy={strategy}", f"seed={seed}", "run.max_experiences=1")  # fmt: skip
    matrix: list[list[float]] = []
    for _ in range(n):
        matrix = train(cfg)  # everything is built anew and restored from the store
    return matrix


def model_file_only(work: Path, bench: str, strategy: str, seed: int, n: int) -> list[list[float]]:
    """Each experience by a fresh run that inherits only the previous run's weights."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf

    from engram.models import build_model
    from engram.store import Store
    from engram.streams import build_benchmark
    from engram.train import build_optimizer, build_plugins, model_spec
    from engram.training.template import DurableTemplate

    matrix = []
    previous: Path | None = None
    for k in range(n):
        cfg = config(work / f"m-{bench}-{strategy}-{seed}-{k}", f"benchmark={bench}",
                     f"strategy={strategy}", f"seed={seed}")  # fmt: skip
        torch.manual_seed(seed + k)
        np.random.seed(seed + k)
        stream = build_benchmark(OmegaConf.to_container(cfg.benchmark))
        model = build_model(model_spec(cfg, stream.input_shape, stream.n_classes, False))
        if previous is not None:  # the model file is all that survived
            with Store.open(previous, mode="r") as store:
                model.load_state_dict(store.load(state=False).model)
        with DurableTemplate(
            model=model, optimizer=build_optimizer(cfg, model), store=cfg.store.path,
            plugins=build_plugins(cfg.strategy), train_mb_size=cfg.training.batch_size,
            train_epochs=cfg.training.epochs, eval_mb_size=cfg.training.eval_batch_size,
            seed=seed, name=strategy,
        ) as strategy_run:  # fmt: skip
            rows = strategy_run.fit([stream.train_stream[k]], list(stream.test_stream))
        matrix.append(rows[-1])
        previous = Path(cfg.store.path)
    return matrix


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--restart", nargs="+", default=RESTART)
    parser.add_argument("--benchmarks", nargs="+", default=BENCHMARKS)
    parser.add_argument("--quick", action="store_true", help="naive and replay, one seed")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.strategies, args.restart = [0], ["naive", "replay"], ["replay"]
        args.benchmarks = ["split_digits"]
    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(ROOT / "src"))

    work = Path(tempfile.mkdtemp(prefix="engram-study-"))
    start = time.perf_counter()
    results: dict[str, dict[str, list]] = {}
    restarts: dict[str, dict[str, dict[str, list]]] = {}
    try:
        for bench in args.benchmarks:
            results[bench], restarts[bench] = {}, {}
            for strategy in args.strategies:
                runs = [uninterrupted(work, bench, strategy, s) for s in args.seeds]
                results[bench][strategy] = runs
                print(bench, strategy, [round(r[-1][-1], 3) for r in runs], flush=True)
            n = len(results[bench][args.strategies[0]][0])
            for strategy in args.restart:
                restarts[bench][strategy] = {
                    "engram": [engram_restarts(work, bench, strategy, s, n) for s in args.seeds],
                    "model file only": [
                        model_file_only(work, bench, strategy, s, n) for s in args.seeds
                    ],
                }
                print(bench, strategy, "restarts done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    minutes = (time.perf_counter() - start) / 60
    command = "python experiments/study.py" + (" --quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "study-quick" if args.quick else "study"
    plot(results, args.out / f"{name}.png")
    report = write_report(results, restarts, args.seeds, command, minutes, name)
    doc = args.out / f"{name}.md"
    doc.write_text(report + kept_tail(doc))
    print(report)


KINDS = {
    "split_digits": "class-incremental split digits (5 experiences of 2 classes, one shared head)",
    "permuted_digits": "domain-incremental permuted digits (5 pixel permutations, all 10 classes)",
}


#: Where the hand-written part of the report begins: it and everything after it (the
#: engram-vs-Avalanche section that experiments/study_vs_avalanche.py writes) are kept.
KEPT = "## Reading (hand-written"


def kept_tail(doc: Path) -> str:
    """The part of an existing report this script does not generate ('' for a new one)."""
    text = doc.read_text() if doc.exists() else ""
    at = text.find(KEPT)
    return "\n" + text[at:] if at >= 0 else ""


def write_report(results, restarts, seeds, command, minutes, name) -> str:
    from engram.metrics import average_accuracy, forgetting

    lines = [
        "# Study: strategies on the embedded benchmarks",
        "",
        f"Command: `{command}` ({minutes:.0f} min on this 2-core VM, shared with other work). "
        f"Seeds: {', '.join(map(str, seeds))}. Each strategy with its config in "
        "`src/engram/configs/strategy/` and the default training settings (3 epochs, batch "
        "32, SGD lr 0.05 momentum 0.9, MLP 64-256-10); no per-benchmark tuning.",
        "",
        "## Average accuracy and forgetting after the last experience (mean ± std)",
    ]
    for bench, by_strategy in results.items():
        lines += ["", f"**{KINDS.get(bench, bench)}**", "",
                  "| strategy | average accuracy | forgetting |", "|---|---:|---:|"]  # fmt: skip
        for strategy, runs in by_strategy.items():
            acc = mean_std([average_accuracy(m) for m in runs])
            lines.append(f"| {strategy} | {acc} | {mean_std([forgetting(m) for m in runs])} |")
    lines += [
        "",
        f"![average accuracy after each experience]({name}.png)",
        "",
        "## Restarting each task in a new process: engram vs keeping only the model file",
        "",
        "Every experience is trained by a fresh run. *engram*: the run restores model,",
        "optimizer, strategy state (Fisher and anchors, replay buffer, teacher), RNG and",
        "history from the store (`run.max_experiences=1`, repeated). *model file only*: the",
        "run loads the previous run's weights and nothing else.",
    ]
    same = True
    for bench, by_strategy in restarts.items():
        lines += ["", f"**{KINDS.get(bench, bench)}**", "",
                  "| strategy | engram: avg accuracy | engram: forgetting "
                  "| model file only: avg accuracy | model file only: forgetting |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for strategy, modes in by_strategy.items():
            cells = []
            for mode in ("engram", "model file only"):
                cells.append(mean_std([average_accuracy(m) for m in modes[mode]]))
                cells.append(mean_std([forgetting(m) for m in modes[mode]]))
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
            if strategy in results[bench]:
                same = same and modes["engram"] == results[bench][strategy]
    lines += [
        "",
        "The engram restarts reproduce the uninterrupted runs of the first table exactly "
        f"(accuracy matrices equal: {'yes' if same else 'NO'}).",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, list]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engram.metrics import average_accuracy

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, (bench, by_strategy) in zip(axes[0], results.items(), strict=True):
        for strategy, runs in by_strategy.items():
            n = len(runs[0])
            curves = [[average_accuracy(m[: k + 1]) for k in range(n)] for m in runs]
            mean = [statistics.mean(c[k] for c in curves) for k in range(n)]
            ax.plot(range(1, n + 1), mean, marker="o", label=strategy)
        ax.set_xlabel("experiences trained")
        ax.set_ylabel("average accuracy on experiences so far")
        ax.set_title(f"{bench} (mean over seeds)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
