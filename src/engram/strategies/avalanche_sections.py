"""The runner's sections for Avalanche's own plugins: ``strategy=avalanche.<name>``.

Each Avalanche plugin that :mod:`engram.strategies.avalanche_state` makes durable is a
strategy section here (``strategy.avalanche_gem.memory_strength=0.3``), registered in
:data:`engram.strategies.registry.PLUGINS` with engram's own, so the schema, the
validation and the builder treat both alike. A section's name is its adapter's
``engram_name`` (the key of its state and hyperparameters in the store).

Defaults are Avalanche's: the plugin's own where it has one (``tests/strategies/
test_avalanche_sections.py`` checks each against the installed Avalanche), else the
value ContinualAI's continual-learning-baselines or Avalanche's strategy wrapper uses
(noted per field). Buffers hold 200 samples after five experiences, as engram's.
What a plugin takes besides its settings, the run supplies (``wires``: CWR*'s model,
GSS's input size). ``ReplayPlugin``'s storage policy is named (``storage_policy``) and
built here. Light: no Avalanche import until a run builds a plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engram.rules import POSITIVE_FLOAT32, boolean, choice, hp, integer, number, text
from engram.strategies.entry import Entry

#: ``strategy.avalanche_replay.storage_policy`` -> Avalanche's storage policy class.
STORAGE_POLICIES = {
    "experience_balanced": "ExperienceBalancedBuffer",  # ReplayPlugin's default
    "class_balanced": "ClassBalancedBuffer",
    "reservoir": "ReservoirSamplingBuffer",
}


@dataclass
class EWCSection:
    ewc_lambda: float = hp(1.0, number(0), "no plugin default; baselines: 1 (batch Fisher)")
    mode: str = hp("separate", choice(("separate", "online")))
    decay_factor: float | None = hp(None, number(0, 1, null=True), "online mode")
    keep_importance_data: bool = hp(False, boolean())


@dataclass
class SISection:
    si_lambda: float = hp(1.0, number(0), "no plugin default; baselines: 1 (split MNIST)")
    eps: float = hp(1e-7, POSITIVE_FLOAT32)


@dataclass
class LwFSection:
    alpha: float = hp(1.0, number(0))
    temperature: float = hp(2.0, POSITIVE_FLOAT32)


@dataclass
class ReplaySection:
    mem_size: int = hp(200, integer(1))
    batch_size: int | None = hp(None, integer(1, null=True), "None: half current, half memory")
    batch_size_mem: int | None = hp(None, integer(1, null=True))
    task_balanced_dataloader: bool = hp(False, boolean())
    storage_policy: str = hp("experience_balanced", choice(tuple(STORAGE_POLICIES)))


@dataclass
class GEMSection:
    patterns_per_experience: int = hp(40, integer(1), "no plugin default; 200 after 5")
    memory_strength: float = hp(0.5, number(0), "no plugin default; GEM's wrapper: 0.5")


@dataclass
class AGEMSection:
    patterns_per_experience: int = hp(40, integer(1), "no plugin default; 200 after 5")
    sample_size: int = hp(64, integer(1), "no plugin default; AGEM's wrapper: 64")


@dataclass
class GDumbSection:
    mem_size: int = hp(200, integer(1))


@dataclass
class CWRStarSection:
    cwr_layer_name: str | None = hp(None, text(null=True), "None: the last linear layer")
    freeze_remaining_model: bool = hp(True, boolean())


@dataclass
class LFLSection:
    lambda_e: float = hp(1.0, number(0), "no plugin default; best of 0.1/1/10 (training.md)")


@dataclass
class GSSGreedySection:
    mem_size: int = hp(200, integer(1))
    mem_strength: int = hp(5, integer(1), "gradients compared per new sample")


@dataclass
class RWalkSection:
    ewc_lambda: float = hp(0.1, number(0))
    ewc_alpha: float = hp(0.9, number(0, 1))
    delta_t: int = hp(10, integer(1), "iterations between score updates")


@dataclass
class MASSection:
    lambda_reg: float = hp(1.0, number(0))
    alpha: float = hp(0.5, number(0, 1))


@dataclass
class FromScratchSection:
    reset_optimizer: bool = hp(True, boolean())


def _plugin(
    name: str, config: type, wires: tuple[str, ...] = (), build: str | None = None
) -> Entry:
    """The entry of ``avalanche.training.plugins.<name>``."""
    return Entry(f"avalanche.training.plugins:{name}", config, wires, build)


#: Section -> Avalanche plugin, in the order they are built (after engram's).
SECTIONS: dict[str, Entry] = {
    "avalanche_ewc": _plugin("EWCPlugin", EWCSection),
    "avalanche_si": _plugin("SynapticIntelligencePlugin", SISection),
    "avalanche_mas": _plugin("MASPlugin", MASSection),
    "avalanche_rwalk": _plugin("RWalkPlugin", RWalkSection),
    "avalanche_lwf": _plugin("LwFPlugin", LwFSection),
    "avalanche_lfl": _plugin("LFLPlugin", LFLSection),
    "avalanche_cwr_star": _plugin("CWRStarPlugin", CWRStarSection, wires=("model",)),
    "avalanche_replay": _plugin(
        "ReplayPlugin", ReplaySection, build="engram.strategies.avalanche_sections:replay"
    ),
    "avalanche_gdumb": _plugin("GDumbPlugin", GDumbSection),
    "avalanche_gem": _plugin("GEMPlugin", GEMSection),
    "avalanche_agem": _plugin("AGEMPlugin", AGEMSection),
    "avalanche_gss_greedy": _plugin("GSS_greedyPlugin", GSSGreedySection, wires=("input_size",)),
    "avalanche_from_scratch": _plugin("FromScratchTrainingPlugin", FromScratchSection),
}


def replay(kwargs: dict[str, Any]) -> Any:
    """``ReplayPlugin`` with its storage policy built from its name, sized ``mem_size``."""
    from avalanche.training import storage_policy as policies
    from avalanche.training.plugins import ReplayPlugin

    name = kwargs.pop("storage_policy")
    cls = getattr(policies, STORAGE_POLICIES[name])
    size = kwargs["mem_size"]
    policy = cls(max_size=size) if name == "reservoir" else cls(max_size=size, adaptive_size=True)
    return ReplayPlugin(**kwargs, storage_policy=policy)
