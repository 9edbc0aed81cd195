"""The scikit-learn learners' defaults, measured: naive vs replay average accuracy.

    .venv/bin/python benchmarks/sklearn_defaults.py            # 2 seeds, digits streams
    .venv/bin/python benchmarks/sklearn_defaults.py --quick    # 1 seed, split digits

Each row is one estimator setting through ``engram-train`` (``engram.train.train``),
mean average accuracy over the seeds; docs/sklearn.md ("Defaults") records a run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from hydra import compose, initialize_config_module

from engram.metrics import average_accuracy
from engram.train import train

SETTINGS = [
    ("mlp_classifier", "+model.args.learning_rate_init=0.001"),  # scikit-learn's default
    ("mlp_classifier", "+model.args.learning_rate_init=0.003"),
    ("mlp_classifier", "+model.args.learning_rate_init=0.01"),  # engram's default
    ("sgd_classifier", "+model.args.alpha=0.0001"),  # the default
    ("sgd_classifier", "+model.args.alpha=0.001"),
    ("perceptron", "+model.args.alpha=0.0001"),
]


def config(store: str, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[f"store.path={store}", "run.quiet=true",
                                           "logger.tensorboard=false", *overrides])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, split digits only")
    args = parser.parse_args()
    seeds = (0,) if args.quick else (0, 1)
    streams = ("split_digits",) if args.quick else ("split_digits", "permuted_digits")
    settings = SETTINGS[2:4] if args.quick else SETTINGS
    columns = [f"{b} {s}" for b in streams for s in ("naive", "replay")]
    print(f"{'model':16} {'setting':40} " + " ".join(f"{c:>22}" for c in columns))
    with tempfile.TemporaryDirectory() as tmp:
        for n, (model, setting) in enumerate(settings):
            row = []
            for bench in streams:
                for strategy in ("naive", "replay"):
                    accs = []
                    for seed in seeds:
                        store = f"{tmp}/{n}-{bench}-{strategy}-{seed}"
                        cfg = config(store, f"model={model}", setting, f"benchmark={bench}",
                                     f"strategy={strategy}", f"seed={seed}")  # fmt: skip
                        accs.append(average_accuracy(train(cfg)))
                    row.append(f"{statistics.mean(accs):.3f}")
            print(f"{model:16} {setting:40} " + " ".join(f"{c:>22}" for c in row), flush=True)


if __name__ == "__main__":
    main()
