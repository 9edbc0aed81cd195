"""The largest |weight| that healthy runs reach: the measurement behind the divergence
bound ``training.max_abs_weight`` (engram.training.guard.MAX_ABS_WEIGHT).

    .venv/bin/python experiments/weight_bound.py             # every shipped strategy and model
    .venv/bin/python experiments/weight_bound.py --quick     # a few of them

Each row: ``engram-train <overrides> training.max_abs_weight=null`` through
``engram.train.train`` on its default benchmark (split digits), then the largest
``|value|`` among HEAD's weights (a scikit-learn model: its coef_/intercept_ and the
like). Recorded in docs/reliability.md.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

from study import config  # the same compose as experiments/study.py

TORCH = ["naive", "ewc", "online_ewc", "si", "mas", "lwf", "replay", "der", "derpp", "agem",
         "ewc_replay", "er_ace", "avalanche.ewc", "avalanche.si", "avalanche.lwf",
         "avalanche.replay", "avalanche.mas", "avalanche.rwalk", "avalanche.agem",
         "avalanche.lfl", "avalanche.cwr_star"]  # fmt: skip
SKLEARN = ["sgd_classifier", "perceptron", "mlp_classifier", "sgd_pipeline"]
RUNS = [[f"strategy={s}"] for s in TORCH]
RUNS += [[f"strategy={s}", "benchmark=permuted_digits"] for s in ("naive", "ewc", "replay")]
RUNS += [[f"model={m}"] for m in SKLEARN] + [["model=sgd_classifier", "strategy=replay"]]
QUICK = [["strategy=naive"], ["strategy=ewc"], ["strategy=derpp"], ["model=sgd_classifier"]]


def largest_weight(store: Path) -> float:
    from engram import load_model
    from engram.store import Store
    from engram.training.guard import SKLEARN_WEIGHTS, estimator_arrays

    with Store.open(store) as s:
        snap = s.load(state=False)
    if snap.model is not None:
        return max(float(w.abs().max()) for w in snap.model.values() if w.is_floating_point())
    arrays = estimator_arrays(load_model(store))
    return max(
        float(abs(a).max()) for k, a in arrays.items() if SKLEARN_WEIGHTS & set(k.split("/"))
    )


def main() -> None:
    from engram.errors import NonFiniteError
    from engram.train import train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few runs")
    args = parser.parse_args()
    worst = 0.0
    with tempfile.TemporaryDirectory() as work:
        for i, overrides in enumerate(QUICK if args.quick else RUNS):
            store = Path(work) / f"s{i}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    train(config(store, *overrides, "training.max_abs_weight=null"))
                except NonFiniteError as e:  # a healthy run's weights are what is measured
                    print(f"{' '.join(overrides):45s} diverged: {str(e)[:90]}", flush=True)
                    continue
            largest = largest_weight(store)
            worst = max(worst, largest)
            print(f"{' '.join(overrides):45s} max |w| {largest:10.3f}", flush=True)
    print(f"largest over all runs: {worst:.3f}")


if __name__ == "__main__":
    main()
