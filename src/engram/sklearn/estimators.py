"""The scikit-learn estimators engram trains: names, defaults, and ``partial_fit``.

A scikit-learn model is recorded as a spec like the torch ones (:mod:`engram.models`)::

    {"name": "sgd_classifier", "args": {"input_shape": [64], "n_classes": 10,
                                        "params": {"loss": "log_loss", ...}}}

and rebuilt only through :data:`ESTIMATORS` (an allowlist: a stored spec never makes
engram import anything else). ``sgd_pipeline`` is a :class:`~sklearn.pipeline.Pipeline`
of ``partial_fit`` steps (StandardScaler → SGDClassifier); scikit-learn's Pipeline has
no ``partial_fit`` of its own, so :func:`partial_fit` feeds it step by step.

Light on purpose: Hydra validates ``model=`` before anything heavy loads, so nothing
here imports scikit-learn until an estimator is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engram.errors import EngramError


@dataclass(frozen=True)
class Estimator:
    """One supported estimator: its class and engram's defaults for it."""

    cls: str  # "module:Class"
    defaults: dict[str, Any] = field(default_factory=dict)
    seeded: bool = True  # takes random_state (set from the run's seed)
    steps: tuple[tuple[str, str], ...] = ()  # a Pipeline: (step name, estimator name)

    def build(self, params: Mapping[str, Any]) -> Any:
        if self.steps:
            from sklearn.pipeline import Pipeline

            unknown = set(params) - {name for name, _ in self.steps}
            if unknown:
                raise EngramError(
                    f"pipeline parameters are per step ({', '.join(n for n, _ in self.steps)}),"
                    f" not {', '.join(sorted(unknown))}"
                )
            return Pipeline(
                [(step, ESTIMATORS[est].build(params.get(step, {}))) for step, est in self.steps]
            )
        module, _, name = self.cls.partition(":")
        cls = getattr(importlib.import_module(module), name)
        try:
            return cls(**{**self.defaults, **params})
        except TypeError as e:  # an unknown parameter
            raise EngramError(f"{name}: {e}") from None


_SGD = "sklearn.linear_model:SGDClassifier"
#: Config name (``model=<name>``) → estimator. Defaults: see docs/sklearn.md.
ESTIMATORS: dict[str, Estimator] = {
    # log_loss: predict_proba for callers; the rest are scikit-learn's defaults
    "sgd_classifier": Estimator(_SGD, {"loss": "log_loss"}),
    "perceptron": Estimator("sklearn.linear_model:Perceptron"),
    "gaussian_nb": Estimator("sklearn.naive_bayes:GaussianNB", seeded=False),
    "multinomial_nb": Estimator("sklearn.naive_bayes:MultinomialNB", seeded=False),
    "bernoulli_nb": Estimator("sklearn.naive_bayes:BernoulliNB", seeded=False),
    # learning_rate_init 0.01, not 0.001: partial_fit takes one Adam step per call, and
    # at 0.001 replay reaches 0.34 average accuracy on split digits, at 0.01 0.73
    # (benchmarks/sklearn_defaults.py; docs/sklearn.md, "Defaults")
    "mlp_classifier": Estimator(
        "sklearn.neural_network:MLPClassifier",
        {"hidden_layer_sizes": [256], "learning_rate_init": 0.01},
    ),
    "standard_scaler": Estimator("sklearn.preprocessing:StandardScaler", seeded=False),
    "sgd_pipeline": Estimator(
        "sklearn.pipeline:Pipeline", steps=(("scale", "standard_scaler"), ("clf", "sgd_classifier"))
    ),
}
#: What ``model=`` may name (a scaler alone is no classifier).
MODELS = tuple(n for n in ESTIMATORS if n != "standard_scaler")


def is_sklearn(name: object) -> bool:
    return name in MODELS


def spec_params(name: str, args: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The estimator's parameters for a spec: the config's ``model.args`` over engram's
    defaults, and ``random_state`` from the run's seed where the estimator takes one."""
    entry = ESTIMATORS[name]
    params = {k: _plain(v) for k, v in args.items()}
    if entry.steps:
        out = {}
        for step, est in entry.steps:
            given = params.get(step) or {}
            if not isinstance(given, Mapping):
                raise EngramError(f"model.args.{step} must be a mapping of parameters")
            out[step] = spec_params(est, given, seed)
        unknown = set(params) - set(out)
        if unknown:
            raise EngramError(
                f"model={name} takes parameters per step (model.args.scale.*, "
                f"model.args.clf.*), not model.args.{sorted(unknown)[0]}"
            )
        return out
    if entry.seeded and "random_state" not in params:
        params["random_state"] = seed
    return {**entry.defaults, **params}


def build_estimator(spec: Mapping[str, Any]) -> Any:
    """A fresh (unfitted) estimator from its spec; EngramError for anything not allowed."""
    name = spec.get("name") if isinstance(spec, Mapping) else None
    if not is_sklearn(name):
        raise EngramError(
            f"not a scikit-learn model spec: {name!r}; available: {', '.join(MODELS)}"
        )
    params = (spec.get("args") or {}).get("params") or {}
    entry = ESTIMATORS[name]
    if entry.steps:
        return entry.build(params)
    return entry.build({k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})


def partial_fit(estimator: Any, x: Any, y: Any, classes: Any) -> None:
    """One incremental step; a Pipeline's steps in turn (each transformer learns from
    the batch, then transforms it for the next step)."""
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        for _, step in estimator.steps[:-1]:
            step.partial_fit(x)
            x = step.transform(x)
        estimator.steps[-1][1].partial_fit(x, y, classes=classes)
    else:
        estimator.partial_fit(x, y, classes=classes)


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain JSON-able values (specs are stored as JSON)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value)
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    return value
