"""Checks of a composed ``engram-train`` config, before anything trains or a store opens.

The dataclass schemas (:mod:`engram.run.config`) let Hydra refuse a misspelt key or a value
of the wrong type. The rest is checked here, in one pass that reports every problem on
one line (a :class:`ConfigError`):

* a key no schema has, added with ``+`` (Hydra's own hint for a typo), with a "did you
  mean" for the nearest option;
* the range or the set of choices of every option (:data:`RULES`, the sets read from
  the code that uses them), and the rules that tie options together (EWC's online mode
  needs ``decay_factor``; Adam has no momentum);
* a shipped strategy whose plugin sections were nulled or renamed;
* ``store.path``: not a file, not a directory that is not a store, not a path that is
  too long; ``branch=true`` with a default path that names a store yet to exist.

``train`` calls :func:`validate` first; ``hydra.run.dir`` resolves through
:func:`validated_store_path`, so on the command line a bad option stops the run before
Hydra creates ``<store.path>/hydra``. :func:`check_overrides` catches, on the command
line, what cannot even compose: an override into a plugin section the chosen strategy
does not have (OmegaConf fails on it with an AssertionError).
"""

from __future__ import annotations

import difflib
import re
import sys
import typing
from dataclasses import fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from engram.errors import ConfigError
from engram.metrics.objective import OBJECTIVES, is_objective
from engram.run import RUN_FILES
from engram.run import config as schema
from engram.run.sections import SECTIONS, check_sections
from engram.run.sections import absent_section as absent_section
from engram.run.sections import check_overrides as check_overrides
from engram.run.sections import shipped_strategies as shipped_strategies
from engram.sklearn.estimators import MODELS as SKLEARN_MODELS
from engram.sklearn.estimators import is_sklearn
from engram.strategies import registry
from engram.streams.files import MAX_CLASSES
from engram.training.execution import PRECISIONS

#: The optimizers ``engram.train.build_optimizer`` builds.
OPTIMIZERS = ("sgd", "adam")
#: The resolver in ``configs/store/default.yaml`` that appends the job's overrides.
SUFFIX_RESOLVER = "engram.overrides_suffix"

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")
_STRATEGY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_MAX_NAME_BYTES = 255  # one path component, on every common file system


# ---------------------------------------------------------------------------- rules


from engram.rules import FRACTION, SEED, Rule, boolean, choice, integer, integers, number  # noqa: E402


@cache
def rules() -> dict[str, Rule]:
    """Every checked option, by its dotted key (strategy sections: when not null)."""
    from engram.store.store import is_valid_tag_name
    from engram.streams import NAMES

    tag = Rule(
        "a tag name (letters, digits, '.', '_' or '-', starting with a letter or '_'; "
        "not HEAD or a version name like v0003)",
        is_valid_tag_name,
        null=True,
    )
    name = Rule(
        "a name of letters, digits, '.', '_' or '-'",
        lambda v: isinstance(v, str) and _STRATEGY_NAME.fullmatch(v) is not None,
    )
    return {
        "seed": SEED,
        "benchmark.name": choice(NAMES),
        "benchmark.n_experiences": integer(1),
        "benchmark.seed": SEED,
        "benchmark.max_angle": number(),
        # bounded as benchmark=files bounds labels: a larger head is a typo, not a model
        "benchmark.n_classes": integer(1, MAX_CLASSES, null=True),
        "benchmark.test_fraction": number(0, 1, low_open=True, high_open=True),
        "benchmark.max_bytes": integer(1, null=True),
        "model.hidden": integers(1),
        "model.channels": integers(1),
        "optimizer.name": choice(OPTIMIZERS),
        "optimizer.lr": number(0, low_open=True),
        "optimizer.momentum": number(0, 1, high_open=True),
        "optimizer.weight_decay": number(0),
        "strategy.name": name,
        **registry.rules(),
        # a typo guard: 10^6 epochs of a single minibatch take over a day here
        "training.epochs": integer(1, 10**6),
        "training.batch_size": integer(1),
        "training.eval_batch_size": integer(1),
        "training.commit_every_iterations": integer(1, null=True),
        "training.commit_every_seconds": number(0, low_open=True, null=True),
        "training.threads": integer(1, null=True),
        "training.nonfinite": choice(("stop", "skip")),  # DurableTemplate's nonfinite
        "training.max_abs_weight": number(0, low_open=True, null=True),
        "training.device": Rule(
            "auto, cpu, cuda, cuda:N or mps",
            lambda v: isinstance(v, str) and _DEVICE.fullmatch(v) is not None,
        ),
        "training.precision": choice(PRECISIONS),
        "store.lock_timeout": number(0, infinite=True),
        "store.allow_network_fs": boolean(),
        "store.signing_key": Rule(
            "a path to an ed25519 private key file (engram keygen)",
            lambda v: isinstance(v, str) and v != "",
            null=True,
        ),
        "store.remote": Rule("a URL s3://BUCKET/PREFIX (or gs://, az://)", _remote_url, null=True),
        "gate.max_forgetting": FRACTION,
        "gate.min_average_accuracy": FRACTION,
        "gate.promote": tag,
        "run.max_experiences": integer(1, null=True),
        "run.objective": Rule(f"one of {', '.join(OBJECTIVES)}, or a list of them", is_objective),
    }


# ------------------------------------------------------------------------ validate


def validate(cfg: DictConfig) -> None:
    """Check a composed ``engram-train`` config; raises :class:`ConfigError` naming every
    problem, on one line. Reads the file system (``store.path``) but opens nothing."""
    raw = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    raw.pop("hydra", None)  # the resolver for hydra.run.dir passes the whole config
    problems = _unknown_keys(raw, schema.TrainConfig, "")
    values: dict[str, Any] = {}
    for key in _schema_keys(schema.TrainConfig):
        section = key.split(".")[1] if key.startswith("strategy.") else None
        if section in SECTIONS and raw["strategy"].get(section) is None:
            continue  # not this strategy's plugin
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except MissingMandatoryValue:
            problems.append(_missing(key))
            continue
        except OmegaConfBaseException as e:
            problems.append(f"{key} cannot be resolved: {str(e).splitlines()[0]}")
            continue
        values[key] = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    for key, rule in rules().items():
        if key in values and not (values[key] is None and rule.null) and not rule.ok(values[key]):
            problems.append(f"{key} must be {rule.what}{' or null' if rule.null else ''}, "
                            f"not {_show(values[key])}")  # fmt: skip
    if not problems:  # the rules that tie options together assume each one is valid
        problems += _model(values) + _device(values) + _combinations(values)
        problems += check_sections(raw["strategy"])
        problems += _store(values, raw)
    if problems:
        raise ConfigError("; ".join(problems))


def validated_store_path(*, _root_: DictConfig) -> str:
    """``store.path`` once the config validates: the resolver behind ``hydra.run.dir``.

    Hydra resolves (and creates) the run directory beside the store before it calls the
    task, and reports a resolver's exception as a traceback; under a running Hydra app
    this ends the process as ``engram-train`` does for its errors: one line, status 2.
    """
    from hydra.core.hydra_config import HydraConfig

    try:
        validate(_root_)
    except ConfigError as e:
        if not HydraConfig.initialized():
            raise
        print(f"engram-train: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return str(_root_.store.path)


def hydra_run_dir(*, _root_: DictConfig) -> str:
    """Where Hydra writes a single run's outputs (its resolved config and job log):
    ``<store's parent>/hydra/<store's name>``, beside the store, not in it — Hydra
    creates it before the task runs, and a store directory must hold nothing but the
    store until the store exists (a run refused by its data leaves no store behind).
    Validates the config first (:func:`validated_store_path`)."""
    store = Path(validated_store_path(_root_=_root_))
    return str(store.parent / HYDRA_DIR / store.name)


#: Hydra's per-run directories, one per store, under the stores' parent directory.
HYDRA_DIR = "hydra"


def overrides_suffix() -> str:
    """``-<overrides>`` of the running Hydra job (``hydra.job.override_dirname``), else ''.

    The overrides are those that change what is trained (``train.yaml`` excludes the
    others), ``benchmark.path`` included, so a sweep over data directories gives each its
    own store; a ``/`` in a value becomes ``_`` (one directory, not a nest of them).
    Outside a Hydra app (the compose API) there are none.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    dirname = HydraConfig.get().job.override_dirname.replace("/", "_")
    return f"-{dirname}" if dirname else ""


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _missing(key: str) -> str:
    if key == "benchmark.path":
        return "benchmark=files needs benchmark.path=<directory of .npz files>"
    return f"{key} must be set ({key}=...)"


# ------------------------------------------------------------------ unknown keys


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else None (an open dict)."""
    if is_dataclass(tp):
        return tp
    return next((a for a in typing.get_args(tp) if is_dataclass(a)), None)


def _schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of a schema, dotted (open dicts such as model.args are leaves)."""
    keys = []
    for f in fields(cls):
        sub = _dataclass_in(_field_types(cls)[f.name])
        keys += _schema_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"]
    return keys


def _unknown_keys(node: dict[str, Any], cls: type, prefix: str) -> list[str]:
    types = _field_types(cls)
    problems = []
    for key, value in node.items():
        if key not in types:
            problems.append(_unknown(f"{prefix}{key}", list(types)))
            continue
        sub = _dataclass_in(types[key])
        if sub is not None and isinstance(value, dict):
            problems += _unknown_keys(value, sub, f"{prefix}{key}.")
    return problems


def _unknown(key: str, siblings: list[str]) -> str:
    group, _, leaf = key.rpartition(".")
    dot = f"{group}." if group else ""
    everything = _schema_keys(schema.TrainConfig)
    near = [dot + m for m in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.7)]
    near = near or [k for k in everything if k.rpartition(".")[2] == leaf]
    near = near or difflib.get_close_matches(key, everything, n=1, cutoff=0.8)
    hint = f"; did you mean {' or '.join(near[:2])}?" if near else ""
    where = f"the options of {group}" if group else "the top-level options"
    return (
        f"{key} is not an option, so nothing would read it{hint} ({where}: {', '.join(siblings)})"
    )


# --------------------------------------------------------------- combined rules


def _model(values: dict[str, Any]) -> list[str]:
    from engram.models import available_models

    name = values["model.name"]
    if is_sklearn(name):
        return _sklearn(values)
    allowed = [n for n in available_models() if not n.endswith("*")] + list(SKLEARN_MODELS)
    if name in allowed:
        return []
    if isinstance(name, str) and name.startswith("torchvision.") and name != "torchvision.":
        import torchvision.models

        if name.partition(".")[2] in torchvision.models.list_models(module=torchvision.models):
            return []
    return [
        f"model.name must be one of {', '.join(allowed)} or torchvision.<model> "
        f"(or a builder registered with engram.models.register_model), not {_show(name)}"
    ]


def _sklearn(values: dict[str, Any]) -> list[str]:
    """A scikit-learn model: partial_fit with naive or replay, one version per experience."""
    name, problems = values["model.name"], []
    sections = {k.split(".")[1] for k in values if k.startswith("strategy.") and k.count(".") > 1}
    gradients = sorted(sections - {"replay"})
    if gradients:
        problems.append(
            f"strategy={values['strategy.name']} needs gradients ({', '.join(gradients)}), which "
            f"a scikit-learn model (model={name}) does not have; use strategy=naive or "
            "strategy=replay"
        )
    if values["benchmark.task_labels"] or values["benchmark.name"] == "split_digits_task":
        problems.append(
            f"model={name} has one output layer: task-incremental streams "
            "(task labels, split_digits_task) need a multi-head torch model"
        )
    unsupported = {
        "training.commit_every_iterations": None, "training.commit_every_seconds": None,
        "training.async_commit": False, "training.precision": "32",
    }  # fmt: skip
    for key, default in unsupported.items():
        if values[key] != default:
            problems.append(
                f"{key} is for torch models; model={name} commits once per "
                f"experience in full precision (leave it at {_show(default)})"
            )
    if values["training.device"] not in ("auto", "cpu"):
        problems.append(
            f"model={name} trains on the CPU; training.device must be auto or cpu, "
            f"not {_show(values['training.device'])}"
        )
    return problems


def _device(values: dict[str, Any]) -> list[str]:
    """A device this machine has (else the run would fail after creating its store)."""
    import torch

    from engram.training.execution import unavailable

    device = values["training.device"]
    if device == "auto" or is_sklearn(values["model.name"]):  # scikit-learn: _sklearn's
        return []
    missing = unavailable(torch.device(device))
    if missing is None:
        return []
    return [f"training.device={device} asks for a GPU, but {missing}; "
            "use training.device=auto or cpu"]  # fmt: skip


def _combinations(values: dict[str, Any]) -> list[str]:
    problems = []
    if values["optimizer.name"] == "adam" and values["optimizer.momentum"] != 0:
        problems.append(
            f"optimizer.momentum must be 0 with optimizer=adam (Adam has no momentum "
            f"option), not {values['optimizer.momentum']}"
        )
    data = values["benchmark.path"]
    if values["benchmark.name"] == "files" and data is None:
        problems.append(_missing("benchmark.path"))
    elif values["benchmark.name"] == "files" and not Path(data).expanduser().is_dir():
        problems.append(f"benchmark.path {data} is not a directory; benchmark=files reads "
                        "one .npz file per experience from it")  # fmt: skip
    for ewc in ("strategy.ewc", "strategy.avalanche_ewc"):
        mode, decay = values.get(f"{ewc}.mode"), values.get(f"{ewc}.decay_factor")
        if mode == "online" and decay is None:
            problems.append(f"{ewc}.decay_factor must be set with {ewc}.mode=online "
                            f"(e.g. {ewc}.decay_factor=0.9), not null")  # fmt: skip
        if mode == "separate" and decay is not None:
            online = " or use strategy=online_ewc" if ewc == "strategy.ewc" else ""
            problems.append(
                f"{ewc}.decay_factor is used only with {ewc}.mode=online; set it "
                f"to null{online}, not {decay}"
            )
    if "strategy.avalanche_gem.memory_strength" in values and not _has("quadprog"):
        problems.append(
            "strategy.avalanche_gem needs the quadprog solver (Avalanche's GEM solves a "
            "quadratic program with it), which is not installed: pip install 'engram-cl[gem]'"
        )
    return problems


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# -------------------------------------------------------------------- store.path


def _store(values: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    path = values["store.path"]
    if not isinstance(path, str) or not path.strip():
        return [f"store.path must be a directory path, not {_show(path)}"]
    root = Path(path).expanduser()
    # before any stat: the file system refuses a longer name (ENAMETOOLONG) in each one
    long = [c for c in root.parts if len(c.encode()) > _MAX_NAME_BYTES]
    default = SUFFIX_RESOLVER in str(raw["store"].get("path"))
    if long:
        how = " (the default path names the overrides)" if default else ""
        return [f"store.path {path} has a name longer than {_MAX_NAME_BYTES} bytes{how}; "
                "give a shorter store.path"]  # fmt: skip
    for p in (root, *root.parents):
        if p.exists() and not p.is_dir():
            what = "names an existing file" if p == root else f"is inside {p}, a file"
            return [f"store.path {path} {what}; a store is a directory: give another store.path"]
    from engram.store import format as fmt

    problems = []
    if root.is_dir() and not (root / fmt.LMDB_DIR).is_dir():
        ours = {fmt.LMDB_DIR, fmt.BLOB_DIR, fmt.CHECKPOINT_DIR, fmt.LOCK_FILE, *RUN_FILES}
        others = sorted(p.name for p in root.iterdir() if p.name not in ours)
        if others:
            problems.append(
                f"store.path {path} is a directory that is not an engram store (it holds "
                f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); give a new "
                "or empty directory"
            )
    if values["branch"] and default and overrides_suffix() and not root.exists():
        problems.append(
            f"branch=true continues an existing store, but the default store path names "
            f"the overrides, so it is {path}, which does not exist; name the store to "
            "branch: store.path=<its path> branch=true"
        )
    return problems


def _remote_url(value: Any) -> bool:
    """``store.remote`` is a URL the remote takes (:func:`engram.store.remote.client.
    check_url`). One carrying credentials (user info, a query) is refused here, with a
    message that does not echo it: the rule's own message would print the value."""
    from urllib.parse import urlsplit

    from engram.errors import RemoteError
    from engram.store.remote.client import check_url  # light: obstore loads on first use

    if not isinstance(value, str):
        return False
    try:
        check_url(value)
    except RemoteError as e:
        parts = urlsplit(value)
        if "@" in parts.netloc or parts.query or parts.fragment:
            raise ConfigError(f"store.remote: {e}") from None
        return False
    return True


# ------------------------------------------------------------------------ Hydra


def register() -> None:
    """The schemas (:mod:`engram.run.config`) in Hydra's ConfigStore, under the names the
    configs' defaults lists use, and this module's resolvers."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=schema.TrainConfig)
    groups = {"benchmark": schema.BenchmarkConfig, "model": schema.ModelConfig,
              "optimizer": schema.OptimizerConfig, "strategy": schema.StrategyConfig,
              "store": schema.StoreConfig, "logger": schema.LoggerConfig}  # fmt: skip
    for group, node in groups.items():
        cs.store(group=group, name=f"{group}_schema", node=node)
    resolvers = {
        # configs/store/default.yaml: the job's overrides that change what is trained
        SUFFIX_RESOLVER: overrides_suffix,
        # configs/train.yaml, hydra.run.dir: validate before Hydra creates that directory
        "engram.validated_store_path": validated_store_path,
        "engram.hydra_run_dir": hydra_run_dir,
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
