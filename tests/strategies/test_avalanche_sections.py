"""``strategy=avalanche.<name>``: Avalanche's own plugins through the runner.

The sections must be the installed Avalanche's plugins (names and defaults), one per
adapter, each with a YAML; the runner must build them with what they need from the
run (CWR*'s model, GSS's input size) and resume them exactly."""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
import yaml
from avalanche.training import plugins as P
from avalanche.training import storage_policy
from hydra import compose, initialize_config_module
from torch import nn

from engram.errors import EngramError
from engram.models import build_model
from engram.run.validation import ConfigError, validate
from engram.store import Store
from engram.strategies import avalanche_sections, registry
from engram.strategies.avalanche_state import ADAPTERS
from engram.train import train
from engram.training.template import DurableTemplate

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "engram" / "configs" / "strategy"
SECTIONS = sorted(avalanche_sections.SECTIONS)
#: Constructor arguments no section exposes (Avalanche's defaults are kept).
UNEXPOSED = {"excluded_parameters", "device", "verbose"}


def avalanche_defaults(section: str) -> dict[str, object]:
    cls = registry.plugin_class(section)
    return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
            if name != "self"}  # fmt: skip


def test_one_section_per_adapter_named_as_its_state() -> None:
    by_class = {s.plugin.split(":")[1]: name for name, s in avalanche_sections.SECTIONS.items()}
    assert set(by_class) == set(ADAPTERS)
    for cls, section in by_class.items():
        assert ADAPTERS[cls].engram_name == section
        assert registry.PLUGINS[section].avalanche


@pytest.mark.parametrize("section", SECTIONS)
def test_settings_are_the_plugins_own_with_its_defaults(section: str) -> None:
    entry = registry.PLUGINS[section]
    theirs = avalanche_defaults(section)
    ours = {f.name: f for f in fields(entry.config)}
    assert set(ours) | set(entry.wires) | (UNEXPOSED & set(theirs)) == set(theirs)
    for name, f in ours.items():
        if theirs[name] is inspect.Parameter.empty:  # no default in Avalanche: say whence
            assert f.metadata["doc"].startswith("no plugin default"), (section, name)
        elif name != "storage_policy":  # None: ExperienceBalancedBuffer, named here
            assert f.default == theirs[name], (section, name)
        rule = f.metadata["rule"]
        assert f.default is not MISSING, (section, name)
        assert (f.default is None and rule.null) or rule.ok(f.default), (section, name)


@pytest.mark.parametrize("section", SECTIONS)
def test_each_section_has_a_strategy_yaml(section: str) -> None:
    name = section.replace("avalanche_", "avalanche.", 1)
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert config["name"] == name
    assert {k for k in config if k not in ("defaults", "name")} == {section}


@pytest.mark.parametrize("section", SECTIONS)
def test_the_built_plugin_is_made_durable_with_the_configured_settings(
    tmp_path: Path, section: str
) -> None:
    model = build_model({"name": "mlp", "args": {"input_shape": [4], "n_classes": 3}})
    settings = {f.name: f.default for f in fields(registry.PLUGINS[section].config)}
    context = {"model": model, "input_size": [4]}
    (plugin,) = registry.build_plugins({section: settings}, context)
    cls = avalanche_sections.SECTIONS[section].plugin.split(":")[1]
    assert type(plugin) is getattr(P, cls)
    template = DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               store=tmp_path / "s", plugins=[plugin])  # fmt: skip
    with template:
        recorded = template.named_plugins()[section].hparams()
        if section == "avalanche_replay":  # the policy named by the section, sized mem_size
            expected = {**settings, "storage_policy": {"class": "ExperienceBalancedBuffer",
                        "max_size": 200, "adaptive_size": True, "total_num_groups": None}}  # fmt: skip
            expected.pop("mem_size")
        else:  # as Avalanche itself would record these settings
            wired = {w: context[w] for w in registry.PLUGINS[section].wires}
            expected = ADAPTERS[cls](getattr(P, cls)(**settings, **wired), template).hparams()
    assert recorded.items() >= {k: v for k, v in expected.items() if k in recorded}.items()
    assert set(recorded) <= set(settings) | {"storage_policy"} | UNEXPOSED


def test_lfl_with_a_model_without_features_is_one_line(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    (plugin,) = registry.build_plugins({"avalanche_lfl": {"lambda_e": 1.0}})
    with pytest.raises(EngramError, match=r"the model \(Sequential\) needs a get_features"):
        DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        store=tmp_path / "s", plugins=[plugin])  # fmt: skip


def test_a_plugin_that_needs_the_model_says_so_without_it() -> None:
    with pytest.raises(EngramError, match="strategy.avalanche_cwr_star needs the run's model"):
        registry.build_plugins({"avalanche_cwr_star": {}})


@pytest.mark.parametrize("name", sorted(avalanche_sections.STORAGE_POLICIES))
def test_replay_storage_policies_by_name(name: str) -> None:
    (plugin,) = registry.build_plugins(
        {"avalanche_replay": {"mem_size": 30, "storage_policy": name}}
    )
    policy = plugin.storage_policy
    assert type(policy) is getattr(storage_policy, avalanche_sections.STORAGE_POLICIES[name])
    assert policy.max_size == 30


# ----------------------------------------------------------------- through the runner


def config(store: Path, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[f"store.path={store}", "training.epochs=1",
                                           "benchmark.n_experiences=2", "run.quiet=true",
                                           "logger=none", *overrides])  # fmt: skip


def head(path: Path) -> tuple[list, dict[str, torch.Tensor], dict]:
    with Store.open(path) as store:
        snap = store.load()
        return snap.state["metrics"]["accuracy_matrix"], dict(snap.model), snap.state["plugins"]


@pytest.mark.parametrize("strategy, extra", [
    ("avalanche.replay", ["strategy.avalanche_replay.storage_policy=class_balanced"]),
    ("avalanche.cwr_star", []),  # the model, from the run
    ("avalanche.gss_greedy", []),  # the input size, from the run
])  # fmt: skip
def test_a_run_in_two_processes_ends_as_one_run(tmp_path: Path, strategy: str, extra) -> None:
    whole = train(config(tmp_path / "whole", f"strategy={strategy}", *extra))
    train(config(tmp_path / "split", f"strategy={strategy}", "run.max_experiences=1", *extra))
    split = train(config(tmp_path / "split", f"strategy={strategy}", *extra))
    assert split == whole and len(whole) == 2
    (m1, w1, s1), (m2, w2, s2) = head(tmp_path / "whole"), head(tmp_path / "split")
    assert m1 == m2 and w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    section = strategy.replace("avalanche.", "avalanche_")
    assert section in s1 and s1.keys() == s2.keys()


def test_a_changed_setting_on_resume_is_refused_naming_it(tmp_path: Path) -> None:
    train(config(tmp_path / "s", "strategy=avalanche.lfl", "run.max_experiences=1"))
    with pytest.raises(EngramError, match="avalanche_lfl.lambda_e"):
        train(config(tmp_path / "s", "strategy=avalanche.lfl",
                     "strategy.avalanche_lfl.lambda_e=0.5"))  # fmt: skip


# ------------------------------------------------------------------------ validation


def test_gem_without_its_solver_is_one_line(tmp_path: Path, monkeypatch) -> None:
    from engram.run import validation

    monkeypatch.setattr(validation, "_has", lambda module: module != "quadprog")
    with pytest.raises(ConfigError, match=r"needs the quadprog solver.*engram-cl\[gem\]"):
        validate(config(tmp_path / "s", "strategy=avalanche.gem"))


@pytest.mark.parametrize("overrides, message", [
    (["strategy=avalanche.ewc", "strategy.avalanche_ewc.mode=online"],
     "strategy.avalanche_ewc.decay_factor must be set with strategy.avalanche_ewc.mode=online"),
    (["strategy=avalanche.gem", "strategy.avalanche_gem.memory_strength=-1"],
     "strategy.avalanche_gem.memory_strength must be a number >= 0, not -1"),
    (["strategy=avalanche.replay", "strategy.avalanche_replay.storage_policy=fifo"],
     "strategy.avalanche_replay.storage_policy must be one of experience_balanced, "
     "class_balanced, reservoir, not 'fifo'"),
    (["strategy=avalanche.si", "model=sgd_classifier"], "needs gradients (avalanche_si)"),
])  # fmt: skip
def test_bad_settings_are_one_line(tmp_path: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(config(tmp_path / "s", *overrides))


def test_rwalk_with_no_score_taken_trains_on(tmp_path: Path) -> None:
    """An experience shorter than delta_t iterations: Avalanche's penalties would be 0/0."""
    matrix = train(config(tmp_path / "s", "strategy=avalanche.rwalk",
                          "strategy.avalanche_rwalk.delta_t=100000"))  # fmt: skip
    assert len(matrix) == 2 and all(0 <= a <= 1 for row in matrix for a in row)
    with Store.open(tmp_path / "s") as store:
        penalties = store.load().state["plugins"]["avalanche_rwalk"]["exp_penalties"]
    assert all(torch.isfinite(p["data"]).all() for p in penalties.values())
