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

import copy
import itertools
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Sampler, default_collate

from engram.errors import EngramError
from engram.store import SampleIds
from engram.store.codec import TORCH_DTYPES, dtype_name
from engram.training.sampler import ResumableBatchSampler, epoch_seed

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

_HEADER = 16  # a sample record: target, task label (little-endian int64), then x's bytes


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
        return {name: _jsonable(getattr(self.plugin, name)) for name in self.hparam_names}

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
            "saved_params": {t: _params_out(d) for t, d in p.saved_params.items()},
            "importances": {t: _params_out(d) for t, d in p.importances.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.plugin
        p.saved_params = defaultdict(
            dict, {t: _params_in(d) for t, d in state["saved_params"].items()}
        )
        p.importances = defaultdict(
            dict, {t: _params_in(d) for t, d in state["importances"].items()}
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
            "ewc_data": [_params_out(d) for d in p.ewc_data],
            "syn_data": {k: _params_out(d) for k, d in p.syn_data.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = self.plugin
        p.ewc_data = tuple(_params_in(d, cpu=True) for d in state["ewc_data"])
        p.syn_data = {k: _params_in(d, cpu=True) for k, d in state["syn_data"].items()}


class MASAdapter(AvalancheAdapter):
    """``MASPlugin``: the anchors ``params`` and the ``importance``."""

    engram_name = "avalanche_mas"

    def hparams(self) -> dict[str, Any]:
        return {"lambda_reg": self.plugin._lambda, "alpha": self.plugin.alpha}

    def state_dict(self) -> dict[str, Any]:
        p = self.plugin
        return {
            "params": _maybe_params_out(p.params),
            "importance": _maybe_params_out(p.importance),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plugin.params = _maybe_params_in(state["params"])
        self.plugin.importance = _maybe_params_in(state["importance"])


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

    def state_dict(self) -> dict[str, Any]:
        return {f: _maybe_params_out(getattr(self.plugin, f)) for f in self.fields}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in self.fields:
            setattr(self.plugin, f, _maybe_params_in(state[f]))


class LwFAdapter(AvalancheAdapter):
    """``LwFPlugin``: the previous model (weights), ``expcount`` and
    ``prev_classes_by_task``."""

    engram_name = "avalanche_lwf"

    def hparams(self) -> dict[str, Any]:
        lwf = self.plugin.lwf
        return {"alpha": _jsonable(lwf.alpha), "temperature": _jsonable(lwf.temperature)}

    def state_dict(self) -> dict[str, Any]:
        lwf = self.plugin.lwf
        return {
            "prev_model": _module_out(lwf.prev_model),
            "expcount": lwf.expcount,
            # in the sets' own order: the distillation indexes the logits with it
            "prev_classes_by_task": {t: list(c) for t, c in lwf.prev_classes_by_task.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        lwf = self.plugin.lwf
        lwf.prev_model = _module_in(state["prev_model"], self.strategy.model)
        lwf.expcount = state["expcount"]
        lwf.prev_classes_by_task = defaultdict(
            set, {t: set(c) for t, c in state["prev_classes_by_task"].items()}
        )


class LFLAdapter(AvalancheAdapter):
    """``LFLPlugin``: the previous (frozen) model; its after-experience hook also froze
    the current model's last linear layer, which loading does again."""

    engram_name = "avalanche_lfl"
    hparam_names = ("lambda_e",)

    def state_dict(self) -> dict[str, Any]:
        return {"prev_model": _module_out(self.plugin.prev_model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from avalanche.training.utils import get_last_fc_layer

        self.plugin.prev_model = _module_in(state["prev_model"], self.strategy.model)
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
        return {"initial_weights": None if weights is None else _detached(dict(weights))}

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
        _check_policy(plugin.storage_policy, type(plugin).__name__)
        self.samples = _BufferSamples(strategy)
        install_resumable_replay_loader(plugin)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "storage_policy": _policy_hparams(self.plugin.storage_policy)}

    def state_dict(self) -> dict[str, Any]:
        with self.samples.writing():
            return {"storage_policy": _policy_out(self.plugin.storage_policy, self.samples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _policy_in(self.plugin.storage_policy, state["storage_policy"], self.samples)


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
        _check_policy(plugin.storage_policy, type(plugin).__name__)
        self.samples = _BufferSamples(strategy)
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
            policy = _policy_out(self.plugin.storage_policy, self.samples)
        return {"storage_policy": policy, "init_model": _module_out(self.plugin.init_model)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _policy_in(self.plugin.storage_policy, state["storage_policy"], self.samples)
        self.plugin.init_model = _module_in(state["init_model"], self.strategy.model)


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
        self.samples = _BufferSamples(strategy)
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
        state = {f: _detached(dict(getattr(self.plugin, f))) for f in self.fields}
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


def _params_out(params: dict[str, Any]) -> dict[str, Any]:
    """A ``{name: ParamData}`` dict as ``{name: {"name", "data"}}``."""
    return {k: {"name": pd.name, "data": pd.data.detach().clone()} for k, pd in params.items()}


def _params_in(state: dict[str, Any], cpu: bool = False) -> dict[str, Any]:
    from avalanche.training.utils import ParamData

    out = {}
    for k, item in state.items():
        data = item["data"].cpu() if cpu else item["data"]
        out[k] = ParamData(item["name"], init_tensor=data, device=data.device)
    return out


def _maybe_params_out(params: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if params is None else _params_out(params)


def _maybe_params_in(state: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if state is None else _params_in(state)


def _module_out(module: nn.Module | None) -> dict[str, Any] | None:
    """A model a plugin keeps: its weights, each submodule's train/eval mode and the
    parameters it froze."""
    if module is None:
        return None
    return {
        "weights": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "training": {name: m.training for name, m in module.named_modules()},
        "frozen": [name for name, p in module.named_parameters() if not p.requires_grad],
    }


def _module_in(state: dict[str, Any] | None, current: nn.Module) -> nn.Module | None:
    """A kept model rebuilt as a deep copy of ``current`` with the stored weights.

    Modules the current model gained since (a new head) keep the copy's weights.
    """
    if state is None:
        return None
    module = copy.deepcopy(current)
    result = module.load_state_dict(state["weights"], strict=False)  # raises on shapes
    if result.unexpected_keys:
        raise EngramError(
            "a model kept by an Avalanche plugin has weights the current model lacks ("
            + ", ".join(result.unexpected_keys[:5])
            + "); use the architecture that produced the store"
        )
    for name, m in module.named_modules():
        if name in state["training"]:
            m.training = bool(state["training"][name])
    frozen = set(state["frozen"])
    for name, p in module.named_parameters():
        p.requires_grad_(name not in frozen)
    return module


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# --------------------------------------------------------- storage policies

_POLICIES = ("ExperienceBalancedBuffer", "ClassBalancedBuffer", "ReservoirSamplingBuffer",
             "ParametricBuffer")  # fmt: skip


def _check_policy(policy: Any, owner: str) -> None:
    kind = type(policy).__name__
    if kind not in _POLICIES or not type(policy).__module__.startswith("avalanche."):
        raise EngramError(
            f"DurableTemplate cannot keep the state of {owner}'s storage policy {kind}: "
            f"supported are Avalanche's {', '.join(_POLICIES)}"
        )


def _policy_hparams(policy: Any) -> dict[str, Any]:
    out = {"class": type(policy).__name__, "max_size": policy.max_size}
    if type(policy).__name__ != "ReservoirSamplingBuffer":
        out.update(adaptive_size=policy.adaptive_size,
                   total_num_groups=_jsonable(policy.total_num_groups))  # fmt: skip
    if type(policy).__name__ == "ParametricBuffer":
        out.update(groupby=policy.groupby,
                   selection_strategy=type(policy.selection_strategy).__name__)  # fmt: skip
    return out


def _policy_out(policy: Any, samples: _BufferSamples) -> dict[str, Any]:
    kind = type(policy).__name__
    if kind == "ReservoirSamplingBuffer":
        return _group_out(policy, samples)
    state: dict[str, Any] = {
        "max_size": policy.max_size,
        "groups": {key: _group_out(g, samples) for key, g in policy.buffer_groups.items()},
    }
    if kind == "ExperienceBalancedBuffer":
        state["num_exps"] = policy._num_exps
    elif kind == "ClassBalancedBuffer":
        state["seen_classes"] = list(policy.seen_classes)  # in the set's order: it sizes groups
    else:
        state["seen_groups"] = list(policy.seen_groups)
    return state


def _policy_in(policy: Any, state: dict[str, Any], samples: _BufferSamples) -> None:
    """Set ``policy`` (the plugin's own object, settings kept) to ``state``."""
    from avalanche.training.storage_policy import ReservoirSamplingBuffer, _ParametricSingleBuffer

    kind = type(policy).__name__
    if kind == "ReservoirSamplingBuffer":
        _group_in(policy, state, samples)
        return
    policy.max_size = state["max_size"]
    groups = {}
    for key, group_state in state["groups"].items():
        if kind == "ParametricBuffer":
            group = _ParametricSingleBuffer(group_state["max_size"], policy.selection_strategy)
        else:
            group = ReservoirSamplingBuffer(group_state["max_size"])
        _group_in(group, group_state, samples)
        groups[key] = group
    policy.buffer_groups = groups
    if kind == "ExperienceBalancedBuffer":
        policy._num_exps = state["num_exps"]
    elif kind == "ClassBalancedBuffer":
        policy.seen_classes = set(state["seen_classes"])
    else:
        policy.seen_groups = set(state["seen_groups"])


def _group_out(group: Any, samples: _BufferSamples) -> dict[str, Any]:
    state = {"max_size": group.max_size, "buffer": samples.save(group.buffer)}
    if hasattr(group, "_buffer_weights"):  # reservoir sampling: the samples' sort keys
        state["weights"] = group._buffer_weights.detach().clone()
    return state


def _group_in(group: Any, state: dict[str, Any], samples: _BufferSamples) -> None:
    group.max_size = state["max_size"]
    group.buffer = samples.load(state["buffer"])
    if "weights" in state:
        group._buffer_weights = state["weights"].cpu()  # drawn on the CPU by the plugin


# ----------------------------------------------------------- sample records


class _BufferSamples:
    """Dataset-backed buffers as records in the strategy's sample table.

    Each buffer is written once: :meth:`save` returns the state of a buffer it wrote
    (or loaded) before as long as the buffer is the same dataset object (Avalanche
    replaces a buffer's dataset whenever it changes it). Inside :meth:`writing`, the
    buffers not saved again are forgotten.
    """

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self._known: dict[int, tuple[Any, dict[str, Any]]] = {}  # id(dataset) -> it, state
        self._saved: dict[int, tuple[Any, dict[str, Any]]] | None = None

    def writing(self) -> _BufferSamples:
        return self

    def __enter__(self) -> None:
        self._saved = {}

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self._known = self._saved
        self._saved = None

    def save(self, dataset: Any) -> dict[str, Any]:
        known = self._known.get(id(dataset))
        if known is None or known[0] is not dataset:
            known = (dataset, self._write(dataset))
        if self._saved is not None:
            self._saved[id(dataset)] = known
        return known[1]

    def load(self, state: dict[str, Any]) -> Any:
        x, y, t = read_samples(self.strategy.samples, state)
        dataset = _tensor_dataset(x, y, t)
        self._known[id(dataset)] = (dataset, state)
        return dataset

    def _write(self, dataset: Any) -> dict[str, Any]:
        x, y, t = _materialize(dataset)
        if not len(y):
            return {"ids": SampleIds.of([]), "x_dtype": None, "x_shape": None}
        header = np.empty((len(y), 2), dtype="<i8")
        header[:, 0], header[:, 1] = y.numpy(), t.numpy()
        rows = np.concatenate([header.view(np.uint8), _raw_rows(x)], axis=1)
        ids = self.strategy.samples.append([row.tobytes() for row in rows])
        return {"ids": SampleIds.of(ids), "x_dtype": dtype_name(x.dtype),
                "x_shape": list(x.shape[1:])}  # fmt: skip


def read_samples(table: Any, state: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """The ``(x, y, task)`` tensors of a buffer written to ``table`` (a store's
    ``samples``), in the buffer's order."""
    ids = state["ids"]
    if not len(ids):
        return torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    dtype, shape = TORCH_DTYPES[state["x_dtype"]], [int(d) for d in state["x_shape"]]
    size = _HEADER + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    rows = table.read(ids.as_subclass(torch.Tensor), size)
    header = torch.from_numpy(rows[:, :_HEADER].copy()).view(torch.int64)
    x = torch.from_numpy(rows[:, _HEADER:].copy()).view(dtype).reshape(len(ids), *shape)
    return x, header[:, 0].clone(), header[:, 1].clone()


def _materialize(dataset: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A buffer's samples read through its eval transforms (no random augmentation,
    no draw from the global RNG): stacked x, targets and task labels."""
    data = dataset.eval() if hasattr(dataset, "eval") else dataset
    xs, ys, ts = [], [], []
    for i in range(len(data)):
        item = data[i]
        x, y, t = item[0], item[1], item[-1]
        if not isinstance(x, torch.Tensor):
            raise EngramError(
                f"cannot store a replay sample whose input is a {type(x).__name__}: engram "
                "stores tensors; give the stream's datasets a transform that makes tensors"
            )
        xs.append(x)
        ys.append(int(y))
        ts.append(int(t))
    if not xs:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    return (
        torch.stack(xs).cpu(),
        torch.tensor(ys, dtype=torch.int64),
        torch.tensor(ts, dtype=torch.int64),
    )


def _tensor_dataset(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> Any:
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset,
    )
    from avalanche.benchmarks.utils.utils import concat_datasets

    if not len(y):
        return concat_datasets([])  # what an empty Avalanche buffer holds
    # One part per run of equal task labels, each with a constant task label, as an
    # experience's dataset has: Avalanche cannot concatenate a dataset whose task labels
    # are a plain sequence with one whose are constant (FlatData.concat fails).
    changes = (torch.nonzero(t[1:] != t[:-1]).reshape(-1) + 1).tolist()
    bounds = [0, *changes, len(t)]
    parts = [
        _make_taskaware_tensor_classification_dataset(
            x[a:b], y[a:b], task_labels=int(t[a]), targets=y[a:b].tolist()
        )
        for a, b in itertools.pairwise(bounds)
    ]
    return concat_datasets(parts)


def _raw_rows(x: torch.Tensor) -> np.ndarray:
    row = x[0].numel() * x.element_size()
    return x.contiguous().view(torch.uint8).reshape(len(x), row).numpy()


# ------------------------------------------------------ the resumable loader


def install_resumable_replay_loader(plugin: Any) -> None:
    """Wrap ``plugin.before_training_exp`` (on the instance, once) so that the
    ``ReplayDataLoader`` it installs is replaced by :func:`resumable_replay_loader`."""
    if plugin.__dict__.get("_engram_resumable_loader"):
        return
    original = plugin.before_training_exp

    def before_training_exp(strategy: Any, **kwargs: Any) -> None:
        from avalanche.benchmarks.utils.data_loader import ReplayDataLoader

        original(strategy, **kwargs)
        durable = hasattr(strategy, "cursor")  # a DurableTemplate (not a plain Avalanche one)
        if durable and isinstance(strategy.dataloader, ReplayDataLoader):
            strategy.dataloader = resumable_replay_loader(strategy, strategy.dataloader)

    plugin.before_training_exp = before_training_exp
    plugin.__dict__["_engram_resumable_loader"] = True


def resumable_replay_loader(strategy: Any, loader: Any) -> DataLoader:
    """A loader with the datasets and batch sizes of Avalanche's ``ReplayDataLoader``
    ``loader`` (the experience's data first, then the memory's parts), ordered by a
    :class:`ReplayBatchSampler` of the template's seed and cursor."""
    data, *memory = loader.datasets
    if data is not strategy.adapted_dataset:
        raise EngramError(
            "cannot make this ReplayDataLoader resumable: its first dataset is not the "
            "experience's training data"
        )
    kwargs = loader.loader_kwargs
    drop_last = bool(kwargs.get("drop_last", False))
    world = strategy.world
    data_sampler = ResumableBatchSampler(len(data), loader.batch_sizes[0], strategy.seed,
                                         strategy.cursor.experience, drop_last,
                                         world.rank, world.size)  # fmt: skip
    sampler = ReplayBatchSampler(
        data_sampler, [len(m) for m in memory], list(loader.batch_sizes[1:]),
        shuffle=bool(kwargs.get("shuffle", True)),
        oversample=bool(loader.oversample_small_datasets),
    )  # fmt: skip
    return DataLoader(
        ConcatDataset([data, *memory]),
        batch_sampler=sampler,
        num_workers=int(kwargs.get("num_workers", 0) or 0),
        collate_fn=kwargs.get("collate_fn") or getattr(data, "collate_fn", None),
        generator=torch.Generator(),  # seeded per epoch by the template
    )


class ReplayBatchSampler(Sampler[list[int]]):
    """Avalanche's replay minibatches, resumable: each minibatch of the experience's data
    (a :class:`~engram.training.sampler.ResumableBatchSampler`) followed by one
    minibatch of each memory part, as ``ReplayDataLoader`` composes them (memory parts
    reshuffled and restarted when used up if ``oversample``). Every order is a function
    of (seed, experience, epoch): :meth:`set_epoch` picks it and how many minibatches
    to skip, without touching the global RNG.

    Indices point into ``ConcatDataset([data, *memory parts])``.
    """

    def __init__(
        self,
        data: ResumableBatchSampler,
        memory_sizes: list[int],
        memory_batch_sizes: list[int],
        *,
        shuffle: bool = True,
        oversample: bool = True,
    ) -> None:
        self.data = data
        self.memory_sizes = memory_sizes
        self.memory_batch_sizes = memory_batch_sizes
        self.shuffle = shuffle
        self.oversample = oversample
        self.offsets = (
            list(np.cumsum([data.n, *memory_sizes[:-1]]).tolist()) if memory_sizes else []
        )
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.data.set_epoch(epoch, start)
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[list[int]]:
        base = epoch_seed(self.data.seed, self.data.experience, self.epoch)
        parts = [
            self._memory_batches(n, b, (base + 0x9E3779B9 * (i + 1)) % (1 << 63) or 1)
            for i, (n, b) in enumerate(zip(self.memory_sizes, self.memory_batch_sizes, strict=True))
        ]
        for _ in range(self.start):  # the memory minibatches of the skipped minibatches
            for part in parts:
                next(part, None)
        for batch in self.data:
            out = list(batch)
            for offset, part in zip(self.offsets, parts, strict=True):
                picked = next(part, None)
                if picked is not None:
                    if self.data.world_size > 1:
                        picked = self.data._shard(picked)
                    out += [offset + i for i in picked]
            yield out

    def _memory_batches(self, n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
        return _batches(n, batch_size, seed, shuffle=self.shuffle, cycle=self.oversample,
                        drop_last=self.data.drop_last)  # fmt: skip


class MemoryStream:
    """An endless stream of memory minibatches, as Avalanche's
    ``GroupBalancedInfiniteDataLoader`` gives them (``batch_size`` samples of each
    buffer, collated; a buffer used up is reshuffled), ordered by ``seed`` alone;
    ``drawn`` counts the minibatches given (a stream made with ``drawn=k`` goes on
    after the k-th)."""

    def __init__(self, buffers: list[Any], batch_size: int, seed: int, drawn: int = 0) -> None:
        self.buffers = buffers
        self.collate = getattr(buffers[0], "collate_fn", None) or default_collate
        self._parts = [
            _batches(len(b), batch_size, (seed + 0x9E3779B9 * (i + 1)) % (1 << 63) or 1)
            for i, b in enumerate(buffers)
        ]
        self.drawn = 0
        for _ in range(drawn):
            self._next_indices()

    def _next_indices(self) -> list[list[int]]:
        self.drawn += 1
        return [next(part, []) for part in self._parts]

    def __iter__(self) -> MemoryStream:
        return self

    def __next__(self) -> Any:
        picked = self._next_indices()
        return self.collate(
            [b[i] for b, idx in zip(self.buffers, picked, strict=True) for i in idx]
        )


def _batches(
    n: int, batch_size: int, seed: int, *, shuffle: bool = True, cycle: bool = True,
    drop_last: bool = False,
) -> Iterator[list[int]]:  # fmt: skip
    """Minibatches of ``range(n)`` (the last of a pass smaller unless ``drop_last``),
    reshuffled each pass by a generator of ``seed``; passes repeat if ``cycle``."""
    if n == 0 or (drop_last and n < batch_size):
        return
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
        for i in range(0, n, batch_size):
            chunk = order[i : i + batch_size]
            if drop_last and len(chunk) < batch_size:
                break
            yield chunk
        if not cycle:
            return
