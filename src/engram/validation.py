"""Checks of a composed ``engram-train`` config, before anything trains or a store opens.

The dataclass schemas (:mod:`engram.config`) let Hydra refuse a misspelt key or a value
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
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from engram import config as schema
from engram.errors import EngramError
from engram.sklearn.estimators import MODELS as SKLEARN_MODELS
from engram.sklearn.estimators import is_sklearn
from engram.strategies import registry
from engram.training.execution import PRECISIONS

#: Strategy sections, each one plugin (the registry's order).
SECTIONS = tuple(registry.PLUGINS)
#: The optimizers ``engram.train.build_optimizer`` builds.
OPTIMIZERS = ("sgd", "adam")
#: The resolver in ``configs/store/default.yaml`` that appends the job's overrides.
SUFFIX_RESOLVER = "engram.overrides_suffix"

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")
_STRATEGY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_MAX_NAME_BYTES = 255  # one path component, on every common file system


class ConfigError(EngramError):
    """An option is unknown, out of range, or does not fit the rest of the config."""


# ---------------------------------------------------------------------------- rules


from engram.rules import FRACTION, SEED, Rule, choice, integer, integers, number  # noqa: E402


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
        "benchmark.n_classes": integer(1, null=True),
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
        "training.epochs": integer(1),
        "training.batch_size": integer(1),
        "training.eval_batch_size": integer(1),
        "training.commit_every_iterations": integer(1, null=True),
        "training.commit_every_seconds": number(0, low_open=True, null=True),
        "training.threads": integer(1, null=True),
        "training.nonfinite": choice(("stop", "skip")),  # DurableTemplate's nonfinite
        "training.device": Rule(
            "auto, cpu, cuda, cuda:N or mps",
            lambda v: isinstance(v, str) and _DEVICE.fullmatch(v) is not None,
        ),
        "training.precision": choice(PRECISIONS),
        "store.lock_timeout": number(0, infinite=True),
        "gate.max_forgetting": FRACTION,
        "gate.min_average_accuracy": FRACTION,
        "gate.promote": tag,
        "run.max_experiences": integer(1, null=True),
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
        problems += _model(values) + _combinations(values) + _sections(raw["strategy"])
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


def overrides_suffix() -> str:
    """``-<overrides>`` of the running Hydra job (``hydra.job.override_dirname``), else ''.

    The overrides are those that change what is trained (``train.yaml`` excludes the
    others); outside a Hydra app (the compose API) there are none.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return ""
    dirname = HydraConfig.get().job.override_dirname
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
            "quadratic program with it), which is not installed: pip install 'engram[gem]'"
        )
    return problems


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@cache
def shipped_strategies() -> dict[str, tuple[str, ...]]:
    """Each shipped strategy config's plugin sections, from ``configs/strategy/*.yaml``."""
    from importlib.resources import files

    found = {}
    for entry in (files("engram.configs") / "strategy").iterdir():
        if entry.name.endswith(".yaml"):
            conf = OmegaConf.create(entry.read_text())
            found[entry.name[: -len(".yaml")]] = tuple(
                s for s in SECTIONS if s in conf and conf[s] is not None
            )
    return dict(sorted(found.items()))


def _sections(strategy: dict[str, Any]) -> list[str]:
    """A shipped strategy keeps its sections (strategy.ewc=null makes ewc train as naive)."""
    name = strategy["name"]
    shipped = shipped_strategies().get(name)
    if shipped is None:
        return []  # the user's own strategy config: its sections are what it says
    have = tuple(s for s in SECTIONS if strategy.get(s) is not None)
    problems = [
        f"strategy.{s} is null, so strategy {name} would train without its {s} plugin; "
        "choose a strategy without it (e.g. strategy=naive) instead"
        for s in shipped
        if s not in have
    ]
    problems += [
        absent_section(name, shipped, s, f"strategy.{s}") for s in have if s not in shipped
    ]
    return problems


def absent_section(name: str, sections: Sequence[str], section: str, key: str) -> str:
    """The message for setting ``key``, in ``section``, which strategy ``name`` lacks."""
    leaf = key.split(".")[2] if key.count(".") >= 2 else None
    own = [f"strategy.{s}.{leaf}" for s in sections
           if leaf in {f.name for f in fields(_section_schema(s))}]  # fmt: skip
    message = f"strategy {name} has no {section} section, so {key} cannot be set"
    if own:
        message += f" (did you mean {own[0]}?)"
    wanted = {*sections, section}
    fits = [n for n, s in shipped_strategies().items() if set(s) == wanted]
    with_it = [n for n, s in shipped_strategies().items() if section in s]
    if fits:
        message += f"; for {' + '.join(s for s in SECTIONS if s in wanted)} use strategy={fits[0]}"
    else:
        message += (
            f"; strategies with a {section} section: {', '.join(with_it)}; to combine "
            "plugins, add a strategy config with each section (docs/runner.md)"
        )
    return message


def _section_schema(section: str) -> type:
    return _dataclass_in(_field_types(schema.StrategyConfig)[section])


# -------------------------------------------------------------------- store.path


def _store(values: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    path = values["store.path"]
    if not isinstance(path, str) or not path.strip():
        return [f"store.path must be a directory path, not {_show(path)}"]
    root = Path(path).expanduser()
    for p in (root, *root.parents):
        if p.exists() and not p.is_dir():
            what = "names an existing file" if p == root else f"is inside {p}, a file"
            return [f"store.path {path} {what}; a store is a directory: give another store.path"]
    long = [c for c in root.parts if len(c.encode()) > _MAX_NAME_BYTES]
    default = SUFFIX_RESOLVER in str(raw["store"].get("path"))
    if long:
        how = " (the default path names the overrides)" if default else ""
        return [f"store.path {path} has a name longer than {_MAX_NAME_BYTES} bytes{how}; "
                "give a shorter store.path"]  # fmt: skip
    if default and "/" in overrides_suffix():
        return [f"the default store path {path} would nest directories (an override's "
                "value holds '/'); give store.path"]  # fmt: skip
    from engram.store import format as fmt

    problems = []
    if root.is_dir() and not (root / fmt.LMDB_DIR).is_dir():
        ours = {fmt.LMDB_DIR, fmt.BLOB_DIR, fmt.CHECKPOINT_DIR, fmt.LOCK_FILE, *fmt.RUN_DIRS}
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


# ------------------------------------------------------------ the command line


def check_overrides(argv: Sequence[str]) -> None:
    """Refuse command-line overrides into a plugin section the chosen strategy lacks.

    ``strategy=der strategy.replay.mem_size=10``: OmegaConf cannot set a key below a
    null section (it fails with an AssertionError, before any engram code runs), so
    ``engram-train`` checks its command line first. Anything this cannot decide (a
    malformed override, a config of the user's own) is left to Hydra.
    """
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        args, _ = get_args_parser().parse_known_args(list(argv))
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # Hydra reports its own parse errors
        return
    into = [
        o for o in parsed
        if not o.is_delete() and o.key_or_group.split(".")[0] == "strategy"
        and len(o.key_or_group.split(".")) >= 2 and o.key_or_group.split(".")[1] in SECTIONS
    ]  # fmt: skip
    if not into:
        return
    choices: dict[str, list[str]] = {}
    for o in parsed:
        if o.key_or_group in ("strategy", "experiment") and not o.is_delete():
            sweep = o.is_sweep_override()
            choices[o.key_or_group] = (
                list(o.sweep_string_iterator()) if sweep else [o.get_value_element_as_str()]
            )
    for strategy in choices.get("strategy", [None]):
        for experiment in choices.get("experiment", [None]):
            picked = [f"strategy={strategy}"] if strategy else []
            picked += [f"experiment={experiment}"] if experiment else []
            composed = _compose_strategy(tuple(picked))
            if composed is None:
                continue
            name, sections = composed
            for o in into:
                section = o.key_or_group.split(".")[1]
                if section not in sections:
                    raise ConfigError(absent_section(name, sections, section, o.key_or_group))


def _compose_strategy(overrides: tuple[str, ...]) -> tuple[str, tuple[str, ...]] | None:
    """(name, sections) of the strategy these group choices compose to (None: unknown)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return None
    try:
        with initialize_config_module(version_base="1.3", config_module="engram.configs"):
            cfg = compose("train", overrides=list(overrides))
    except Exception:  # a choice Hydra will report itself
        return None
    return cfg.strategy.name, tuple(s for s in SECTIONS if cfg.strategy[s] is not None)
