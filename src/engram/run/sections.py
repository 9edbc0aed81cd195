"""Which plugin sections a strategy has, and the checks that follow from it.

A strategy is the set of its non-null plugin sections (:mod:`engram.strategies.registry`).
Here: each shipped strategy's sections (from ``configs/strategy/*.yaml``), the check that
a shipped strategy keeps its own (``strategy.ewc=null`` would train as naive), the one
message for setting a key of a section the strategy lacks, and :func:`check_overrides`,
which catches such a key on the command line before Hydra composes (OmegaConf fails on it
with an AssertionError). :mod:`engram.run.validation` runs these with the other checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from functools import cache
from typing import Any

from omegaconf import OmegaConf

from engram.errors import ConfigError
from engram.strategies import registry

#: Strategy sections, each one plugin (the registry's order).
SECTIONS = tuple(registry.PLUGINS)


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


def check_sections(strategy: dict[str, Any]) -> list[str]:
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
    return registry.PLUGINS[section].config


# ------------------------------------------------------------ the command line


def _refuse_repeated(parsed: Sequence[Any]) -> None:
    """An option given twice (``seed=1 seed=2``): Hydra keeps the last, silently."""
    seen: dict[str, str] = {}
    for o in parsed:
        key = o.key_or_group
        if key in seen:
            raise ConfigError(
                f"{key} is given twice ({seen[key]}, {o.input_line}): give it once "
                "(a sweep takes a list: -m KEY=A,B)"
            )
        seen[key] = o.input_line


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
    _refuse_repeated(parsed)
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
