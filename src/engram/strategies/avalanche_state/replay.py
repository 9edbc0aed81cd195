"""State adapters of Avalanche's replay plugins (Replay, GDumb, A-GEM, GEM, GSS): their
buffers (in the store's sample table or as tensors) and resumable replay minibatches."""

from __future__ import annotations

from typing import Any

from engram.strategies.avalanche_state.base import AvalancheAdapter
from engram.strategies.avalanche_state.loaders import (
    MemoryStream,
    install_resumable_replay_loader,
)
from engram.strategies.avalanche_state.params import detached, module_in, module_out
from engram.strategies.avalanche_state.samples import (
    BufferSamples,
    check_policy,
    policy_hparams,
    policy_in,
    policy_out,
)
from engram.training.sampler import epoch_seed

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
