"""The strategy registry is the one place plugins' hyperparameters live: the plugins'
signatures, the schema, the validation rules and the YAMLs must all agree with it."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from engram import strategies
from engram.stateful import DurablePlugin
from engram.strategies import registry

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "engram" / "configs" / "strategy"
# engram's own plugins (Avalanche's: tests/strategies/test_avalanche_sections.py)
SECTIONS = sorted(s for s, entry in registry.PLUGINS.items() if not entry.avalanche)


@pytest.mark.parametrize("section", SECTIONS)
def test_plugin_signature_is_the_registry_entry(section: str) -> None:
    plugin = registry.plugin_class(section)
    params = {
        name: p.default
        for name, p in inspect.signature(plugin.__init__).parameters.items()
        if name not in ("self", "seed")
    }
    declared = {f.name: f.default for f in fields(registry.PLUGINS[section].config)}
    assert params == declared  # same names, same defaults: no second place for them


@pytest.mark.parametrize("section", SECTIONS)
def test_choices_are_the_plugins_literal_types(section: str) -> None:
    plugin = registry.plugin_class(section)
    hints = typing.get_type_hints(plugin.__init__)
    for f in fields(registry.PLUGINS[section].config):
        choices = typing.get_args(hints[f.name])
        if choices and all(isinstance(c, str) for c in choices):
            rule = f.metadata["rule"]
            assert all(rule.ok(c) for c in choices), (section, f.name)
            assert rule.what == f"one of {', '.join(choices)}", (section, f.name)


def test_every_exported_plugin_is_registered_and_durable() -> None:
    registered = {registry.PLUGINS[s].plugin.split(":")[1] for s in SECTIONS}
    assert set(strategies.__all__) == registered
    names = set()
    for section in SECTIONS:
        instance = registry.build_plugins({section: {}})[0]
        assert isinstance(instance, DurablePlugin), section
        names.add(instance.engram_name)
    assert len(names) == len(SECTIONS)  # each plugin's state has its own key


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_strategy_yamls_hold_registry_sections_and_only_deltas(path: Path) -> None:
    config = yaml.safe_load(path.read_text())
    sections = {k for k in config if k not in ("defaults", "name")}
    assert sections <= set(registry.PLUGINS), path.name
    for section in sections:
        defaults = {f.name: f.default for f in fields(registry.PLUGINS[section].config)}
        for key, value in (config[section] or {}).items():
            assert key in defaults, (path.name, section, key)
            assert value != defaults[key], f"{path.name}: {section}.{key} repeats its default"


def test_every_hyperparameter_has_a_rule_that_accepts_its_default() -> None:
    for key, rule in registry.rules().items():
        section, name = key.split(".")[1:]
        value = registry.default(section, name)
        assert (value is None and rule.null) or rule.ok(value), key


def test_the_registry_and_the_config_schema_import_no_avalanche() -> None:
    code = "import sys, engram.run.config, engram.strategies.registry; print('avalanche' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
