"""Builders from a composed ``engram-train`` config (Hydra's DictConfig) to plain objects.

With :mod:`engram.run.runner`, the modules that read the config: the training room
(:mod:`engram.training`) and the scikit-learn learner take only what these return.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from engram.errors import EngramError
from engram.sklearn.estimators import is_sklearn, spec_params
from engram.strategies.registry import build_plugins

__all__ = [
    "benchmark_hparams",
    "build_optimizer",
    "build_plugins",
    "flat_hparams",
    "gate",
    "learner",
    "model_spec",
    "signature",
    "sklearn_learner",
    "template",
]

# Where the data lives, not what it is: a resumed run may change these.
_DATA_LOCATION = ("data_dir", "download", "path", "max_bytes")


def model_spec(cfg: DictConfig, input_shape: tuple[int, ...], n_classes: int,
               task_labels: bool) -> dict[str, Any]:  # fmt: skip
    """The model's spec (see engram.models): what the config asks for, sized by the data."""
    m = cfg.model
    if is_sklearn(m.name):  # an estimator: its parameters, sized by nothing but the data
        params = spec_params(m.name, OmegaConf.to_container(m.args) or {}, cfg.seed)
        args = {"input_shape": [math.prod(input_shape)], "n_classes": n_classes, "params": params}
        return {"name": m.name, "args": args}
    multihead = task_labels if m.multihead is None else bool(m.multihead)
    args: dict[str, Any] = {}
    if m.name == "mlp":
        args = {"hidden": list(m.hidden), "multihead": multihead}
    elif m.name == "cnn":
        args = {"channels": list(m.channels), "hidden": list(m.hidden), "multihead": multihead}
    if m.name in ("mlp", "cnn"):
        args = {"input_shape": list(input_shape), "n_classes": n_classes, **args}
    args.update(OmegaConf.to_container(m.args) or {})
    return {"name": m.name, "args": args}


def build_optimizer(cfg: DictConfig, model: Any) -> Any:
    import torch

    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay
        )
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    raise EngramError(f"unknown optimizer {o.name!r}; available: sgd, adam")


def gate(cfg: DictConfig) -> Any:
    """The configured regression gate, or None when nothing is checked or promoted."""
    from engram.training.gate import RegressionGate

    settings = OmegaConf.to_container(cfg.gate)
    return RegressionGate(**settings) if any(v is not None for v in settings.values()) else None


def benchmark_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The benchmark settings a resumed run must share (not where the data lives)."""
    b = OmegaConf.to_container(cfg.benchmark)
    return {k: v for k, v in b.items() if k not in _DATA_LOCATION}


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """strategy.ewc.ewc_lambda=50.0 style keys, for the HParams dashboard."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif node is not None:
            out[prefix] = node

    for group in ("benchmark", "model", "optimizer", "strategy", "training", "gate"):
        walk(OmegaConf.to_container(cfg[group]), group)
    out["seed"] = cfg.seed
    return out


# ------------------------------------------------------------------ the learner


def signature(spec: dict[str, Any], bench: Any) -> dict[str, Any]:
    """What the model takes and answers (engram.signature), recorded in every version."""
    from engram.signature import signature as make

    shape = spec["args"]["input_shape"] if is_sklearn(spec["name"]) else bench.input_shape
    return make(shape, range(bench.n_classes), task_labels=bench.task_labels)


def template(cfg: DictConfig, spec: dict[str, Any], store: Any, bench: Any,
              signature: dict[str, Any], quiet: bool, **resumed: Any) -> Any:  # fmt: skip
    """The torch model's durable Avalanche template for this run."""
    from engram.metrics.curves import TrainingCurves
    from engram.models import build_model
    from engram.training.progress import ProgressBar
    from engram.training.template import DurableTemplate

    model = build_model(spec)
    meta = {"signature": signature}
    if bench.experience_ids:
        meta["experience_ids"] = bench.experience_ids
    return DurableTemplate(
        model=model,
        optimizer=build_optimizer(cfg, model),
        store=store if store is not None else cfg.store.path,
        plugins=build_plugins(cfg.strategy, {"model": model, "input_size": list(bench.input_shape)})
        + [TrainingCurves()]
        + ([] if quiet else [ProgressBar()]),
        train_mb_size=cfg.training.batch_size,
        train_epochs=cfg.training.epochs,
        eval_mb_size=cfg.training.eval_batch_size,
        seed=cfg.seed,
        commit_every_iterations=cfg.training.commit_every_iterations,
        commit_every_seconds=cfg.training.commit_every_seconds,
        async_commit=cfg.training.async_commit,
        keep_mid_experience=cfg.store.keep_mid_experience,
        hparams={"benchmark": benchmark_hparams(cfg), "model": spec},
        branch=cfg.branch,
        name=cfg.strategy.name,
        model_spec=spec,
        meta=meta,
        gate=gate(cfg),
        nonfinite=cfg.training.nonfinite,
        max_abs_weight=cfg.training.max_abs_weight,
        device=cfg.training.device,
        precision=cfg.training.precision,
        **resumed,
    )


def sklearn_learner(cfg: DictConfig, spec: dict[str, Any], store: Any, bench: Any,
                     signature: dict[str, Any], quiet: bool, **resumed: Any) -> Any:  # fmt: skip
    """The scikit-learn estimator's learner for this run (engram.sklearn)."""
    from engram.sklearn.learner import SklearnLearner

    replay = cfg.strategy.get("replay")
    return SklearnLearner(
        spec,
        store,
        signature=signature,
        name=cfg.strategy.name,
        replay=OmegaConf.to_container(replay) if replay is not None else None,
        batch_size=cfg.training.batch_size,
        epochs=cfg.training.epochs,
        seed=cfg.seed,
        hparams={"benchmark": benchmark_hparams(cfg), "model": spec},
        meta={"experience_ids": bench.experience_ids} if bench.experience_ids else None,
        gate=gate(cfg),
        branch=cfg.branch,
        max_abs_weight=cfg.training.max_abs_weight,
        **resumed,
    )


def learner(cfg: DictConfig, spec: dict[str, Any], store: Any, bench: Any,
            signature: dict[str, Any], quiet: bool, resumed: Any) -> Any:  # fmt: skip
    """The run's learner: a durable template, or a scikit-learn model's learner;
    ``resumed``: HEAD as the runner read it (engram.training.resumed)."""
    make = sklearn_learner if is_sklearn(spec["name"]) else template
    return make(cfg, spec, store, bench, signature, quiet, resumed=resumed)
