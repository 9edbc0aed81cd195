"""Avalanche's own plugins, made durable: one state adapter per built-in plugin with memory.

A user with Avalanche code gets persistence by swapping the template::

    strategy = DurableTemplate(model=net, optimizer=opt, store="runs/ewc",
                               plugins=[avalanche.training.plugins.EWCPlugin(ewc_lambda=10)])

:class:`~engram.training.template.DurableTemplate` asks :func:`adapter_for` about each
plugin that is not :class:`~engram.stateful.Stateful` itself: an Avalanche plugin with
memory gets an adapter (``engram_name``, ``hparams()``, ``state_dict()``,
``load_state_dict()``) that reads and writes exactly the attributes that plugin carries
across experiences; one in :data:`STATELESS` (no memory: ``EvaluationPlugin``...) is left
alone; any other Avalanche plugin — one in :data:`REFUSED` (it has memory, no adapter),
or one this module does not know — is refused with a one-line
:class:`~engram.errors.EngramError` when the template is built (an allowlist:
:mod:`engram.training.app_state`). A subclass of an adapted plugin is adapted as its
Avalanche base; one that adds an ``__init__`` of its own must declare what it adds.

Nothing is pickled. Tensors, numpy arrays and JSON scalars go into the state tree; an
``avalanche.training.utils.ParamData`` is stored as its name and tensor; a model kept by
a plugin (LwF's and LFL's previous model, GDumb's initial model) as its ``state_dict``
(stored once while unchanged: the store addresses chunks by content) and is rebuilt on
load as a deep copy of the current model with those weights. Replay samples that
Avalanche keeps as datasets (``ReplayPlugin``'s storage policies, GDumb's buffer,
A-GEM's per-experience buffers) are read out through the dataset's eval transforms and
written to the store's LMDB ``samples`` table, once per buffer (x, target, task label:
a record per sample, referenced from the state by :class:`~engram.store.SampleIds`, so
``gc`` keeps them); on load each buffer is rebuilt as a tensor classification dataset
with those samples, in the same order. Buffers Avalanche keeps as tensors (GEM's
memory, GSS's) go into the state tree as tensors.

Avalanche's replay plugins draw their minibatches in ways a resumed run cannot
continue: ``ReplayPlugin`` and ``GSS_greedyPlugin`` install a ``ReplayDataLoader``
before each experience, shuffled by the global RNG and with no way to resume mid-epoch;
``AGEMPlugin`` keeps an endless memory iterator with no position. The adapters wrap
those hooks on the plugin instance: the same datasets and batch sizes, in an order that
is a function of (seed, experience, epoch)
(:class:`~engram.strategies.avalanche_state.loaders.ReplayBatchSampler`) or of the seed
and a count (:class:`~engram.strategies.avalanche_state.loaders.MemoryStream`), as the
template does for its own loader. (So a run draws other minibatches than plain Avalanche
with the same seed, from the same distribution.) ``GDumbPlugin``'s hook that adds an
experience's data to its buffer is skipped when that experience resumes mid-way (the
restored buffer has them).

Resume guarantees (CPU, deterministic ops; ``tests/strategies/test_avalanche_plugins.py``):
for every adapted plugin, a new template with a fresh plugin on the same store, after
an experience or after a crash mid-experience, ends bit-identical to a run that never
stopped. Limits: a buffer is stored as its eval view and rebuilt without transforms,
so with train-only augmentation (random crops...) resumed replay samples are no longer
augmented (a valid continuation, not a bit-identical one); on CUDA,
``GSS_greedyPlugin``'s replay dataset is a copy of the memory made when the experience
began, which a mid-experience resume rebuilds from the memory as committed.

One module per family: :mod:`~engram.strategies.avalanche_state.base` (the
:class:`AvalancheAdapter` base), :mod:`~engram.strategies.avalanche_state.penalties`
(EWC, SI, MAS, RWalk), :mod:`~engram.strategies.avalanche_state.kept_models` (LwF, LFL,
CWR*, FromScratch), :mod:`~engram.strategies.avalanche_state.replay` (Replay, GDumb,
A-GEM, GEM, GSS); what they share: :mod:`~engram.strategies.avalanche_state.params`
(plugin parameters and kept models), :mod:`~engram.strategies.avalanche_state.samples`
(storage policies and their buffers in the sample table) and
:mod:`~engram.strategies.avalanche_state.loaders` (the resumable replay loaders and
memory streams). This module holds :data:`REFUSED`, :data:`ADAPTERS` and
:func:`adapter_for`.
"""

from __future__ import annotations

from typing import Any

from engram.errors import EngramError
from engram.strategies.avalanche_state.base import AvalancheAdapter
from engram.strategies.avalanche_state.kept_models import (
    CWRStarAdapter,
    FromScratchAdapter,
    LFLAdapter,
    LwFAdapter,
)
from engram.strategies.avalanche_state.penalties import (
    EWCAdapter,
    MASAdapter,
    RWalkAdapter,
    SIAdapter,
)
from engram.strategies.avalanche_state.replay import (
    AGEMAdapter,
    GDumbAdapter,
    GEMAdapter,
    GSSGreedyAdapter,
    ReplayAdapter,
)

__all__ = [
    "ADAPTERS",
    "REFUSED",
    "STATELESS",
    "AGEMAdapter",
    "AvalancheAdapter",
    "CWRStarAdapter",
    "EWCAdapter",
    "FromScratchAdapter",
    "GDumbAdapter",
    "GEMAdapter",
    "GSSGreedyAdapter",
    "LFLAdapter",
    "LwFAdapter",
    "MASAdapter",
    "RWalkAdapter",
    "ReplayAdapter",
    "SIAdapter",
    "adapter_for",
    "avalanche_base",
    "check_stateless",
    "is_avalanche",
]

# Avalanche's base classes: a plugin deriving from only these is the user's own
_BASES = frozenset(
    {"BasePlugin", "BaseSGDPlugin", "SupervisedPlugin", "SupervisedMetaLearningPlugin"}
)

#: Avalanche plugins known to hold nothing a restart must keep, with why.
STATELESS: dict[str, str] = {
    "EvaluationPlugin": "the metrics of the evaluation in progress; engram records its own",
    "CurrentDataNCMUpdate": "nothing: it writes class means into the model, which is kept",
    "CurrentDataFeCAMUpdate": "nothing: it writes means and covariances into the model",
    "LRSchedulerPlugin": "nothing of its own: the scheduler's state is kept (SchedulerState)",
    # added by Avalanche's template itself; off here (the template evaluates: eval_every=-1)
    "PeriodicEval": "its flags, recomputed when each experience begins",
}

#: Avalanche plugins that hold state across experiences and have no adapter: refused
#: by :func:`adapter_for` (the template builds none with them), with what they hold.
REFUSED: dict[str, str] = {
    "BiCPlugin": "a bias-correction layer, the previous model and a replay buffer",
    "CoPEPlugin": "class prototypes and a replay buffer",
    "FeatureDistillationPlugin": "the previous model",
    "GenerativeReplayPlugin": "the previous generator and solver",
    "TrainGeneratorAfterExpPlugin": "a generator trained outside the template's model",
    "MIRPlugin": "a replay buffer",
    "RARPlugin": "a replay buffer",
    "MemoryNCMUpdate": "a replay buffer",
    "NCMOracle": "every experience's dataset",
    "MemoryFeCAMUpdate": "a replay buffer",
    "FeCAMOracle": "every experience's dataset",
    "ICaRLLossPlugin": "the previous model and its classes",
    "MaskedCrossEntropy": "the classes seen so far",
    "CheckpointPlugin": "Avalanche's own (pickled) checkpoints, which the store replaces",
    # it picks the best model from Avalanche's periodic evaluation, which the template
    # does not run (it evaluates after each experience itself): it would never stop
    "EarlyStoppingPlugin": "the best model of Avalanche's periodic evaluation, which "
    "DurableTemplate does not run, so it would never stop training",
}


def adapter_for(plugin: Any, strategy: Any) -> AvalancheAdapter | None:
    """The state adapter of an Avalanche ``plugin`` used by ``strategy`` (one per pair,
    kept on the plugin), or None for a plugin with no memory across experiences.

    Raises:
        EngramError: ``plugin`` holds state that no adapter persists (see :data:`REFUSED`).
    """
    for cls in type(plugin).__mro__:
        if not cls.__module__.startswith("avalanche."):
            continue
        if cls.__name__ in ADAPTERS:
            cached = plugin.__dict__.get("_engram_adapter")
            if cached is None or cached.strategy is not strategy:
                cached = ADAPTERS[cls.__name__](plugin, strategy)
                plugin.__dict__["_engram_adapter"] = cached
            return cached
        if cls.__name__ in REFUSED:
            name = type(plugin).__name__
            what = cls.__name__ if name == cls.__name__ else f"{cls.__name__} ({name})"
            raise EngramError(
                f"DurableTemplate cannot keep the state of Avalanche's {what}"
                f" ({REFUSED[cls.__name__]}, kept across experiences): a resumed run would "
                "lose it; remove it or use an engram strategy. Avalanche plugins made "
                f"durable: {', '.join(sorted(ADAPTERS))}; plugins without memory "
                "(EvaluationPlugin, LRSchedulerPlugin...) are fine"
            )
    return None


def avalanche_base(plugin: Any) -> str | None:
    """The name of the first Avalanche plugin class in ``plugin``'s ancestry (itself
    included), not counting Avalanche's base classes; None for a user's own plugin."""
    for cls in type(plugin).__mro__:
        if cls.__module__.startswith("avalanche.") and cls.__name__ not in _BASES:
            return cls.__name__
    return None


def is_avalanche(plugin: Any) -> bool:
    """Whether ``plugin`` is (or derives from) one of Avalanche's plugins."""
    return avalanche_base(plugin) is not None


def check_stateless(plugin: Any) -> None:
    """Raise unless ``plugin``, an Avalanche plugin with no adapter, is in
    :data:`STATELESS` (an allowlist: one engram does not know is refused)."""
    base = avalanche_base(plugin)
    if base in STATELESS:
        return
    name = type(plugin).__name__
    what = base if name == base else f"{base} ({name})"
    raise EngramError(
        f"DurableTemplate does not know whether Avalanche's {what} holds state across "
        "experiences, so it cannot promise a resumed run keeps it: remove it or use an "
        f"engram strategy. Avalanche plugins made durable: {', '.join(sorted(ADAPTERS))}; "
        f"known to hold none: {', '.join(sorted(STATELESS))}"
    )


#: Avalanche plugin class name -> its adapter.
ADAPTERS: dict[str, type[AvalancheAdapter]] = {
    "EWCPlugin": EWCAdapter,
    "SynapticIntelligencePlugin": SIAdapter,
    "LwFPlugin": LwFAdapter,
    "ReplayPlugin": ReplayAdapter,
    "GEMPlugin": GEMAdapter,
    "GDumbPlugin": GDumbAdapter,
    "CWRStarPlugin": CWRStarAdapter,
    "LFLPlugin": LFLAdapter,
    "GSS_greedyPlugin": GSSGreedyAdapter,
    "RWalkPlugin": RWalkAdapter,
    "AGEMPlugin": AGEMAdapter,
    "MASPlugin": MASAdapter,
    "FromScratchTrainingPlugin": FromScratchAdapter,
}
