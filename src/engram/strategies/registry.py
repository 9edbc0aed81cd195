"""Every engram strategy plugin, its hyperparameters, their defaults and their rules.

The one place a plugin's hyperparameters are declared: the ``engram-train`` schema
(:mod:`engram.run.config`), the validation of every option (:mod:`engram.run.validation`),
the runner's builder (:func:`build_plugins`) and each plugin's own ``__init__``
defaults are derived from :data:`PLUGINS`; ``tests/strategies/test_registry.py``
fails if a plugin file, its entry and the strategy YAMLs disagree. A new strategy of
engram's is one plugin file, one entry here, one ``configs/strategy/*.yaml``.

**A strategy of your own** is one file plus one YAML, with no edit here: the file holds
its hyperparameters' dataclass (fields declared with :func:`~engram.rules.hp`), the
plugin, and an :class:`~engram.strategies.entry.Entry` naming both; your package
declares that entry under the ``engram.strategies`` entry-point group (the section
name is the entry point's), and ``configs/strategy/<name>.yaml`` (in ``./configs`` of
the directory you run in, or your package's) sets the section. :func:`discovered` adds
it to :data:`PLUGINS` at import, so the schema, the validation, the builder and the
lineage checks treat it as one of engram's (docs/training.md, "Your own strategy"). A
discovered module is imported when the registry is, so it should import only what it
needs to declare its entry at module level (Avalanche is fine: only runs that have it
installed pay for it).

Light on purpose (no torch, no Avalanche): Hydra composes the config before anything
heavy is imported. Plugin classes are imported when a run builds them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from engram.errors import EngramError
from engram.rules import POSITIVE_FLOAT32, Rule, choice, hp, integer, number
from engram.strategies import avalanche_sections
from engram.strategies.entry import Entry

# The choices of the plugins' Literal types (the test checks they are the same).
EWC_MODES = ("separate", "online")
FISHER_ESTIMATORS = ("empirical", "true")
POLICIES = ("reservoir", "class_balanced", "experience_balanced")
ADMISSIONS = ("stream", "experience_end")
DRAWS = ("with_replacement", "without_replacement")


@dataclass
class EWCConfig:
    ewc_lambda: float = hp(50.0, number(0), "penalty weight (per-sample Fisher)")
    mode: str = hp("separate", choice(EWC_MODES))
    decay_factor: float | None = hp(None, number(0, 1, null=True), "online mode: Fisher decay")
    estimator: str = hp("empirical", choice(FISHER_ESTIMATORS))
    fisher_mb_size: int = hp(64, integer(1))


@dataclass
class SIConfig:
    si_lambda: float = hp(1.0, number(0))
    eps: float = hp(0.1, POSITIVE_FLOAT32)


@dataclass
class MASConfig:
    lambda_reg: float = hp(0.01, number(0), "larger values diverge at lr 0.1 on digits")
    alpha: float = hp(0.5, number(0, 1), "importance decay between experiences")
    batch_size: int = hp(64, integer(1), "minibatch of the importance estimate")


@dataclass
class LwFConfig:
    alpha: float = hp(1.0, number(0))
    temperature: float = hp(2.0, POSITIVE_FLOAT32)


@dataclass
class ReplayConfig:
    mem_size: int = hp(200, integer(1))
    batch_size_mem: int | None = hp(None, integer(1, null=True), "None: the training batch size")
    policy: str = hp("reservoir", choice(POLICIES))
    admission: str = hp("experience_end", choice(ADMISSIONS), "stream: also the current one")
    draw: str = hp("with_replacement", choice(DRAWS), "without: passes, as Avalanche's loader")


@dataclass
class DERConfig:
    mem_size: int = hp(200, integer(1))
    alpha: float = hp(0.1, number(0), "weight of the logit-matching term")
    beta: float = hp(0.0, number(0), "weight of the label term (DER++ when > 0)")
    batch_size_mem: int | None = hp(None, integer(1, null=True), "None: the training batch size")
    policy: str = hp("reservoir", choice(POLICIES))
    admission: str = hp("experience_end", choice(ADMISSIONS), "stream: logits as trained")


@dataclass
class ERACEConfig:
    """ER-ACE (Caccia et al. 2022): replay's hyperparameters and defaults, but admission
    "stream": ER-ACE replays the current experience's classes too (Avalanche's ER_ACE
    buffers each experience before training on it); split digits, 3 seeds: 0.814 vs
    0.757 with "experience_end" (permuted: 0.844 vs 0.869). Avalanche's ER_ACE:
    mem_size=200, batch_size_mem=10, a class-balanced buffer (engram/strategies/er_ace.py).
    The buffer is class-balanced by default, as Avalanche's: with reservoir sampling the
    newest classes get few slots and are learned late (split digits 0.814, last
    experience 0.25); class-balanced: 0.859 ± 0.020 split, 0.848 ± 0.014 permuted."""

    mem_size: int = hp(200, integer(1))
    batch_size_mem: int | None = hp(None, integer(1, null=True), "None: the training batch size")
    policy: str = hp("class_balanced", choice(POLICIES), "reservoir: learns new classes late")
    admission: str = hp("stream", choice(ADMISSIONS), "experience_end: only earlier ones")


@dataclass
class AGEMConfig:
    mem_size: int = hp(200, integer(1))
    sample_size: int = hp(64, integer(1), "buffer samples per reference gradient")
    policy: str = hp("experience_balanced", choice(POLICIES))


#: Config section -> plugin, in the order plugins are built (and composed).
PLUGINS: dict[str, Entry] = {
    "ewc": Entry("engram.strategies.ewc:EWCPlugin", EWCConfig),
    "si": Entry("engram.strategies.si:SIPlugin", SIConfig),
    "mas": Entry("engram.strategies.mas:MASPlugin", MASConfig),
    "lwf": Entry("engram.strategies.lwf:LwFPlugin", LwFConfig),
    "replay": Entry("engram.strategies.replay:ERPlugin", ReplayConfig),
    "der": Entry("engram.strategies.der:DERPlugin", DERConfig),
    "er_ace": Entry("engram.strategies.er_ace:ERACEPlugin", ERACEConfig),
    "agem": Entry("engram.strategies.agem:AGEMPlugin", AGEMConfig),
    # Avalanche's own plugins, durable through engram.strategies.avalanche_state
    # (strategy=avalanche.<name>; their defaults are Avalanche's, see avalanche_sections)
    **avalanche_sections.SECTIONS,
}


def discovered(group: str = "engram.strategies") -> dict[str, Entry]:
    """The strategies installed packages declare under the entry-point ``group``:
    section name -> :class:`~engram.strategies.entry.Entry`, in name order.

    Raises:
        EngramError: an entry point does not load, is not an ``Entry``, or takes a
            section name engram's strategies already use.
    """
    from importlib.metadata import entry_points

    found: dict[str, Entry] = {}
    for point in sorted(entry_points(group=group), key=lambda p: p.name):
        where = f"strategy {point.name!r} ({point.value}, entry point {group})"
        if point.name in PLUGINS:
            raise EngramError(f"{where} takes the name of engram's own strategy section; "
                              "give it another name")  # fmt: skip
        try:
            entry = point.load()
        except Exception as e:  # a user's package: its error, in one line
            raise EngramError(f"{where} does not load: {type(e).__name__}: {e}") from None
        if not isinstance(entry, Entry):
            raise EngramError(f"{where} is a {type(entry).__name__}, not an "
                              "engram.strategies.entry.Entry")  # fmt: skip
        found[point.name] = entry
    return found


PLUGINS.update(discovered())


def default(section: str, name: str) -> Any:
    """The default of hyperparameter ``name`` of ``section`` (for plugin signatures)."""
    for f in fields(PLUGINS[section].config):
        if f.name == name:
            assert f.default is not MISSING
            return f.default
    raise KeyError(f"{section} has no hyperparameter {name!r}")


def rules() -> dict[str, Rule]:
    """``strategy.<section>.<name>`` -> its rule, for every registered hyperparameter."""
    return {
        f"strategy.{section}.{f.name}": f.metadata["rule"]
        for section, entry in PLUGINS.items()
        for f in fields(entry.config)
    }


def plugin_class(section: str) -> type:
    module, _, name = PLUGINS[section].plugin.partition(":")
    return getattr(importlib.import_module(module), name)


def build_plugins(
    strategy: Mapping[str, Any], context: Mapping[str, Any] | None = None
) -> list[Any]:
    """One plugin per non-null section of a strategy config, in registry order.

    ``context`` holds what some Avalanche plugins take besides their settings and the
    run supplies (``model``: CWR*'s; ``input_size``: GSS's, the data's input shape).
    """
    context = context or {}
    plugins = []
    for section, entry in PLUGINS.items():
        if strategy.get(section) is None:
            continue
        kwargs = dict(strategy[section])
        missing = [w for w in entry.wires if w not in context]
        if missing:
            wanted = ", ".join(f"{w!r}: ..." for w in missing)
            raise EngramError(
                f"strategy.{section} needs the run's {', '.join(missing)}: pass "
                f"build_plugins(strategy, context={{{wanted}}})"
            )
        kwargs.update({w: context[w] for w in entry.wires})
        if entry.build is not None:
            module, _, name = entry.build.partition(":")
            plugins.append(getattr(importlib.import_module(module), name)(kwargs))
        else:
            plugins.append(plugin_class(section)(**kwargs))
    return plugins
