"""Avalanche's own plugins, made durable: one state adapter per built-in plugin with memory.

A user with Avalanche code gets persistence by swapping the template::

    strategy = DurableTemplate(model=net, optimizer=opt, store="runs/ewc",
                               plugins=[avalanche.training.plugins.EWCPlugin(ewc_lambda=10)])

:class:`~engram.training.template.DurableTemplate` asks :func:`adapter_for` about each
plugin that is not :class:`~engram.stateful.Stateful` itself: an Avalanche plugin with
memory gets an adapter (``engram_name``, ``hparams()``, ``state_dict()``,
``load_state_dict()``) that reads and writes exactly the attributes that plugin carries
across experiences; one in :data:`REFUSED` (it has memory, no adapter) is refused with a
one-line :class:`~engram.errors.EngramError` when the template is built; any other
plugin (no memory: ``EvaluationPlugin``, ``EarlyStoppingPlugin``...) is left alone.
A subclass of an adapted plugin is adapted as its Avalanche base: attributes it adds
are not persisted.

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
is a function of (seed, experience, epoch) (:class:`ReplayBatchSampler`) or of the seed
and a count (:class:`MemoryStream`), as the template does for its own loader. (So a run
draws other minibatches than plain Avalanche with the same seed, from the same
distribution.) ``GDumbPlugin``'s hook that adds an experience's data to its buffer is
skipped when that experience resumes mid-way (the restored buffer has them).

Resume guarantees (CPU, deterministic ops; ``tests/strategies/test_avalanche_plugins.py``):
for every adapted plugin, a new template with a fresh plugin on the same store, after
an experience or after a crash mid-experience, ends bit-identical to a run that never
stopped. Limits: a buffer is stored as its eval view and rebuilt without transforms,
so with train-only augmentation (random crops...) resumed replay samples are no longer
augmented (a valid continuation, not a bit-identical one); on CUDA,
``GSS_greedyPlugin``'s replay dataset is a copy of the memory made when the experience
began, which a mid-experience resume rebuilds from the memory as committed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import numpy as np

from engram.errors import EngramError
from engram.strategies.avalanche_memory import (
    BufferSamples,
    MemoryStream,
    check_policy,
    detached,
    install_resumable_replay_loader,
    jsonable,
    maybe_params_in,
    maybe_params_out,
    module_in,
    module_out,
    params_in,
    params_out,
    policy_hparams,
    policy_in,
    policy_out,
)
from engram.training.sampler import epoch_seed

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
                "(EvaluationPlugin, EarlyStoppingPlugin, LRSchedulerPlugin...) are fine"
            )
    return None


class AvalancheAdapter:
    """Persists an Avalanche plugin's memory (subclasses name the attributes)."""

    engram_name: ClassVar[str]
    hparam_names: ClassVar[tuple[str, ...]] = ()  # the plugin's settings checked on resume

    def __init__(self, plugin: Any, strategy: Any) -> None:
        self.plugin = plugin
        self.strategy = strategy

    def hparams(self) -> dict[str, Any]:
        return {name: jsonable(getattr(self.plugin, name)) for name in self.hparam_names}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


# ------------------------------------------------------------- regularization


class EWCAdapter(AvalancheAdapter):
    """``EWCPlugin``: ``saved_params`` and ``importances``, per experience (both modes)."""

    engram_name = "avalanche_ewc"
    hparam_names = ("ewc_lambda", "mode", "decay_factor", "keep_importance_data")

    def state_dict(self) -> dict[str, Any]:
        p = self.plugin
        return {
            "saved_params": {t: params_out(d) for t, d in p.saved_params.items()},
            "importances": {t: params_out(d) for t, d in p.importances.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.plugin
        p.saved_params = defaultdict(
            dict, {t: params_in(d) for t, d in state["saved_params"].items()}
        )
        p.importances = defaultdict(
            dict, {t: params_in(d) for t, d in state["importances"].items()}
        )


class SIAdapter(AvalancheAdapter):
    """``SynapticIntelligencePlugin``: ``ewc_data`` (anchors, importance) and ``syn_data``
    (old/new theta, gradient, trajectory, cumulative trajectory); kept on the CPU, as
    the plugin keeps them."""

    engram_name = "avalanche_si"
    hparam_names = ("si_lambda", "eps")

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "excluded_parameters": sorted(self.plugin.excluded_parameters)}

    def state_dict(self) -> dict[str, Any]:
        p = self.plugin
        return {
            "ewc_data": [params_out(d) for d in p.ewc_data],
            "syn_data": {k: params_out(d) for k, d in p.syn_data.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.plugin
        p.ewc_data = tuple(params_in(d, cpu=True) for d in state["ewc_data"])
        p.syn_data = {k: params_in(d, cpu=True) for k, d in state["syn_data"].items()}


class MASAdapter(AvalancheAdapter):
    """``MASPlugin``: the anchors ``params`` and the ``importance``."""

    engram_name = "avalanche_mas"

    def hparams(self) -> dict[str, Any]:
        return {"lambda_reg": self.plugin._lambda, "alpha": self.plugin.alpha}

    def state_dict(self) -> dict[str, Any]:
        p = self.plugin
        return {
            "params": maybe_params_out(p.params),
            "importance": maybe_params_out(p.importance),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plugin.params = maybe_params_in(state["params"])
        self.plugin.importance = maybe_params_in(state["importance"])


class RWalkAdapter(AvalancheAdapter):
    """``RWalkPlugin``: the checkpoint, iteration and experience tensors (scores,
    importances, anchors, penalties)."""

    engram_name = "avalanche_rwalk"
    hparam_names = ("ewc_lambda", "ewc_alpha", "delta_t")
    fields = (
        "checkpoint_params", "checkpoint_loss", "checkpoint_scores", "iter_grad",
        "iter_importance", "iter_params", "exp_scores", "exp_params", "exp_importance",
        "exp_penalties",
    )  # fmt: skip

    def __init__(self, plugin: Any, strategy: Any) -> None:
        super().__init__(plugin, strategy)
        if not plugin.__dict__.get("_engram_zero_score_guard"):
            original = plugin.after_training_exp

            def after_training_exp(strategy: Any, *args: Any, **kwargs: Any) -> None:
                original(strategy, *args, **kwargs)
                _without_nan_scores(plugin)

            plugin.after_training_exp = after_training_exp
            plugin.__dict__["_engram_zero_score_guard"] = True

    def state_dict(self) -> dict[str, Any]:
        return {f: maybe_params_out(getattr(self.plugin, f)) for f in self.fields}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in self.fields:
            setattr(self.plugin, f, maybe_params_in(state[f]))


def _without_nan_scores(plugin: Any) -> None:
    """Avalanche's RWalk (0.6) normalises the scores by their maximum: 0/0 when no score
    was taken — an experience of fewer than ``delta_t`` iterations, such as one epoch of
    split digits — so every penalty is NaN and the next experience's loss too. A zero
    maximum means no score: the penalty is the normalised importance alone."""
    from avalanche.training.utils import ParamData

    if max(s.data.max() for s in plugin.exp_scores.values()) > 0:
        return
    top = max(i.data.max() for i in plugin.exp_importance.values())
    plugin.exp_penalties = {
        k: ParamData(k, device=plugin.exp_importance[k].device,
                     init_tensor=plugin.exp_importance[k].data / top)
        for k in plugin.exp_penalties
    }  # fmt: skip


class LwFAdapter(AvalancheAdapter):
    """``LwFPlugin``: the previous model (weights), ``expcount`` and
    ``prev_classes_by_task``."""

    engram_name = "avalanche_lwf"

    def hparams(self) -> dict[str, Any]:
        lwf = self.plugin.lwf
        return {"alpha": jsonable(lwf.alpha), "temperature": jsonable(lwf.temperature)}

    def state_dict(self) -> dict[str, Any]:
        lwf = self.plugin.lwf
        return {
            "prev_model": module_out(lwf.prev_model),
            "expcount": lwf.expcount,
            # in the sets' own order: the distillation indexes the logits with it
            "prev_classes_by_task": {t: list(c) for t, c in lwf.prev_classes_by_task.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lwf = self.plugin.lwf
        lwf.prev_model = module_in(state["prev_model"], self.strategy.model)
        lwf.expcount = state["expcount"]
        lwf.prev_classes_by_task = defaultdict(
            set, {t: set(c) for t, c in state["prev_classes_by_task"].items()}
        )


class LFLAdapter(AvalancheAdapter):
    """``LFLPlugin``: the previous (frozen) model; its after-experience hook also froze
    the current model's last linear layer, which loading does again."""

    engram_name = "avalanche_lfl"
    hparam_names = ("lambda_e",)

    def __init__(self, plugin: Any, strategy: Any) -> None:
        super().__init__(plugin, strategy)
        from avalanche.models import BaseModel

        model = strategy.model
        if isinstance(model, BaseModel):
            return
        if not callable(getattr(model, "get_features", None)):
            raise EngramError(
                f"Avalanche's LFLPlugin compares features: the model ({type(model).__name__}) "
                "needs a get_features(x) method (engram's mlp and cnn have one)"
            )
        # LFL asks isinstance(model, BaseModel) only to know get_features exists
        BaseModel.register(type(model))

    def state_dict(self) -> dict[str, Any]:
        return {"prev_model": module_out(self.plugin.prev_model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from avalanche.training.utils import get_last_fc_layer

        self.plugin.prev_model = module_in(state["prev_model"], self.strategy.model)
        if self.plugin.prev_model is not None:
            for param in get_last_fc_layer(self.strategy.model)[1].parameters():
                param.requires_grad = False


class CWRStarAdapter(AvalancheAdapter):
    """``CWRStarPlugin``: the consolidated class weights and counts it keeps on the
    model (``saved_weights``, ``past_j``, ``cur_j``) and ``cur_class``."""

    engram_name = "avalanche_cwr_star"
    hparam_names = ("cwr_layer_name", "freeze_remaining_model")

    def state_dict(self) -> dict[str, Any]:
        model = self.plugin.model
        return {
            "saved_weights": {c: np.array(w) for c, w in model.saved_weights.items()},
            "past_j": dict(model.past_j),
            "cur_j": dict(model.cur_j),
            "cur_class": list(self.plugin.cur_class),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        model = self.plugin.model
        model.saved_weights = {c: np.array(w) for c, w in state["saved_weights"].items()}
        model.past_j = defaultdict(int, state["past_j"])
        model.cur_j = defaultdict(int, state["cur_j"])
        self.plugin.cur_class = list(state["cur_class"])


class FromScratchAdapter(AvalancheAdapter):
    """``FromScratchTrainingPlugin``: the initial weights each experience starts from."""

    engram_name = "avalanche_from_scratch"
    hparam_names = ("reset_optimizer",)

    def state_dict(self) -> dict[str, Any]:
        weights = self.plugin.initial_weights
        return {"initial_weights": None if weights is None else detached(dict(weights))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["initial_weights"]
        self.plugin.initial_weights = None if weights is None else dict(weights)


# --------------------------------------------------------------------- replay


class ReplayAdapter(AvalancheAdapter):
    """``ReplayPlugin`` with any storage policy Avalanche ships
    (``ExperienceBalancedBuffer``, ``ClassBalancedBuffer``, ``ReservoirSamplingBuffer``,
    ``ParametricBuffer``): every group's samples (in the store's sample table), reservoir
    weights and sizes, the seen groups; its replay loader is made resumable."""

    engram_name = "avalanche_replay"
    hparam_names = ("mem_size", "batch_size", "batch_size_mem", "task_balanced_dataloader")

    def __init__(self, plugin: Any, strategy: Any) -> None:
        super().__init__(plugin, strategy)
        check_policy(plugin.storage_policy, type(plugin).__name__)
        self.samples = BufferSamples(strategy)
        install_resumable_replay_loader(plugin)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "storage_policy": policy_hparams(self.plugin.storage_policy)}

    def state_dict(self) -> dict[str, Any]:
        with self.samples.writing():
            return {"storage_policy": policy_out(self.plugin.storage_policy, self.samples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        policy_in(self.plugin.storage_policy, state["storage_policy"], self.samples)


class GDumbAdapter(AvalancheAdapter):
    """``GDumbPlugin``: its class-balanced buffer (sample table) and the initial model
    every experience is trained from.

    Its after-dataset-adaptation hook adds the experience's data to the buffer; when an
    experience resumes mid-way the restored buffer already holds them, so the wrapped
    hook then only trains on it (adding them again would draw new reservoir keys)."""

    engram_name = "avalanche_gdumb"
    hparam_names = ("mem_size",)

    def __init__(self, plugin: Any, strategy: Any) -> None:
        super().__init__(plugin, strategy)
        check_policy(plugin.storage_policy, type(plugin).__name__)
        self.samples = BufferSamples(strategy)
        if plugin.__dict__.get("_engram_resumable_update"):
            return
        original = plugin.after_train_dataset_adaptation

        def after_train_dataset_adaptation(strategy: Any, **kwargs: Any) -> None:
            cursor = getattr(strategy, "cursor", None)
            if cursor is not None and cursor.mid_experience:  # resumed: buffer restored
                strategy.adapted_dataset = plugin.storage_policy.buffer
            else:
                original(strategy, **kwargs)

        plugin.after_train_dataset_adaptation = after_train_dataset_adaptation
        plugin.__dict__["_engram_resumable_update"] = True

    def state_dict(self) -> dict[str, Any]:
        with self.samples.writing():
            policy = policy_out(self.plugin.storage_policy, self.samples)
        return {"storage_policy": policy, "init_model": module_out(self.plugin.init_model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        policy_in(self.plugin.storage_policy, state["storage_policy"], self.samples)
        self.plugin.init_model = module_in(state["init_model"], self.strategy.model)


class AGEMAdapter(AvalancheAdapter):
    """``AGEMPlugin``: one buffer per experience (sample table) and the position in its
    stream of memory minibatches.

    Avalanche draws those from an endless ``GroupBalancedInfiniteDataLoader`` iterator,
    shuffled by the global RNG whenever a buffer is used up, with no position to resume
    from. The wrapped ``update_memory`` replaces that iterator by a
    :class:`MemoryStream` (the same minibatches: ``sample_size // len(buffers)`` samples
    of each buffer, each buffer reshuffled when used up) whose order is a function of
    the template's seed and the number of buffers, and which counts what it gave."""

    engram_name = "avalanche_agem"
    hparam_names = ("patterns_per_experience", "sample_size")

    def __init__(self, plugin: Any, strategy: Any) -> None:
        super().__init__(plugin, strategy)
        self.samples = BufferSamples(strategy)
        if plugin.__dict__.get("_engram_resumable_memory"):
            return
        original = plugin.update_memory

        def update_memory(dataset: Any, num_workers: int = 0, **kwargs: Any) -> None:
            original(dataset, num_workers=num_workers, **kwargs)
            adapter = plugin.__dict__["_engram_adapter"]
            plugin.buffer_dliter = adapter.memory_stream(drawn=0)

        plugin.update_memory = update_memory
        plugin.__dict__["_engram_resumable_memory"] = True

    def memory_stream(self, drawn: int) -> MemoryStream:
        p = self.plugin
        seed = epoch_seed(self.strategy.seed, len(p.buffers), 0)
        return MemoryStream(p.buffers, p.sample_size // len(p.buffers), seed, drawn)

    def state_dict(self) -> dict[str, Any]:
        stream = self.plugin.buffer_dliter
        with self.samples.writing():
            buffers = [self.samples.save(b) for b in self.plugin.buffers]
        drawn = stream.drawn if isinstance(stream, MemoryStream) else 0
        return {"buffers": buffers, "drawn": drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from avalanche.benchmarks.utils.data_loader import GroupBalancedInfiniteDataLoader

        p = self.plugin
        p.buffers = [self.samples.load(b) for b in state["buffers"]]
        if not p.buffers:
            return
        p.buffer_dataloader = GroupBalancedInfiniteDataLoader(
            p.buffers, batch_size=p.sample_size // len(p.buffers), num_workers=0,
            pin_memory=False, persistent_workers=False,
        )  # fmt: skip
        p.buffer_dliter = self.memory_stream(drawn=state["drawn"])


class GEMAdapter(AvalancheAdapter):
    """``GEMPlugin``: the per-experience memory tensors (x, y, task labels) and ``G``,
    the reference gradients (tensors in the state tree)."""

    engram_name = "avalanche_gem"
    hparam_names = ("patterns_per_experience", "memory_strength")
    fields = ("memory_x", "memory_y", "memory_tid")

    def state_dict(self) -> dict[str, Any]:
        state = {f: detached(dict(getattr(self.plugin, f))) for f in self.fields}
        return {**state, "G": self.plugin.G.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in self.fields:
            setattr(self.plugin, f, dict(state[f]))
        self.plugin.G = state["G"]


class GSSGreedyAdapter(AvalancheAdapter):
    """``GSS_greedyPlugin``: its memory tensors (x, y, scores) and fill index (tensors in
    the state tree); its replay loader is made resumable."""

    engram_name = "avalanche_gss_greedy"
    hparam_names = ("mem_size", "mem_strength")
    fields = ("ext_mem_list_x", "ext_mem_list_y", "buffer_score")

    def __init__(self, plugin: Any, strategy: Any) -> None:
        super().__init__(plugin, strategy)
        install_resumable_replay_loader(plugin)

    def state_dict(self) -> dict[str, Any]:
        state = {f: getattr(self.plugin, f).detach().clone() for f in self.fields}
        return {**state, "ext_mem_list_current_index": int(self.plugin.ext_mem_list_current_index)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in self.fields:
            current, stored = getattr(self.plugin, f), state[f]
            if current.shape == stored.shape and current.dtype == stored.dtype:
                # in place: the replay dataset built before each experience holds views
                # of the memory's rows (on the CPU), which must keep following it
                current.copy_(stored)
            else:
                setattr(self.plugin, f, stored)
        self.plugin.ext_mem_list_current_index = state["ext_mem_list_current_index"]


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


# ------------------------------------------------- ParamData and kept models
