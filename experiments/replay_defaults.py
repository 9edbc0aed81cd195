"""The replay strategies' defaults, measured: admission (replay, DER++) and ER-ACE's buffer.

    .venv/bin/python experiments/replay_defaults.py            # the grid below, 3 seeds
    .venv/bin/python experiments/replay_defaults.py --quick    # 1 seed, split digits
    .venv/bin/python experiments/replay_defaults.py --streams split_digits \
        --grid avalanche.lfl:strategy.avalanche_lfl.lambda_e=1     # any STRATEGY:OVERRIDE

Each cell: ``engram-train strategy=<s> benchmark=<b> <override> seed=<n>`` through
``engram.train.train``, mean ± std of the final average accuracy over the seeds. The
results behind the defaults in src/engram/strategies/registry.py are recorded in
docs/training.md ("Admission") and in ``ERACEConfig``'s docstring.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

from study import config, mean_std  # the same compose and summary as experiments/study.py

SETTINGS = [
    ("replay", "strategy.replay.admission=stream"),
    ("replay", "strategy.replay.admission=experience_end"),
    ("derpp", "strategy.der.admission=stream"),
    ("derpp", "strategy.der.admission=experience_end"),
    ("er_ace", "strategy.er_ace.policy=reservoir"),
    ("er_ace", "strategy.er_ace.policy=class_balanced"),
]
STREAMS = ["split_digits", "permuted_digits", "split_mnist1d", "permuted_mnist1d"]


def main() -> None:
    from engram.metrics import average_accuracy
    from engram.train import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, split digits")
    parser.add_argument(
        "--grid",
        nargs="+",
        metavar="STRATEGY:OVERRIDE",
        default=None,
        help="other settings (overrides space-separated), e.g. replay:strategy.replay.mem_size=500",
    )
    parser.add_argument("--streams", nargs="+", default=STREAMS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    seeds = (0,) if args.quick else (0, 1, 2)
    streams = args.streams[:1] if args.quick else args.streams
    grid = [tuple(g.split(":", 1)) for g in args.grid] if args.grid else SETTINGS
    with tempfile.TemporaryDirectory() as tmp:
        for n, (strategy, setting) in enumerate(grid):
            for bench in streams:
                accs = []
                for seed in seeds:
                    overrides = [f"strategy={strategy}", f"benchmark={bench}", *setting.split()]
                    cfg = config(f"{tmp}/{n}-{bench}-{seed}", *overrides, f"seed={seed}")
                    accs.append(average_accuracy(train(cfg)))
                print(f"{strategy:8} {setting:42} {bench:17} {mean_std(accs)}", flush=True)


if __name__ == "__main__":
    main()
