"""Experience replay (ER) over an LMDB-backed buffer: each step trains on the current
minibatch concatenated with a minibatch drawn from the buffer.

Avalanche's ReplayPlugin keeps index views into the original datasets (pickling one
pickles the whole dataset) and rebuilds its loader every experience; here the buffer's
samples are written once to the store and only its slot table is committed.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from avalanche.core import SupervisedPlugin

from engram import distributed
from engram.memory.replay import (
    Policy,
    ReplayBuffer,
    ReplayBufferError,
    repartition,
    shard_capacity,
)
from engram.strategies.registry import default

Admission = Literal["stream", "experience_end"]


class BufferPlugin(SupervisedPlugin):
    """Owns a :class:`ReplayBuffer` in the strategy's store; persists it; admits samples.

    ``admission``: ``"stream"`` offers every training minibatch to the buffer as it is
    trained on (online replay, as in Chaudhry et al.'s ER and Mammoth), so the buffer
    also replays the current experience; ``"experience_end"`` offers the experience's
    whole dataset once it is trained (as Avalanche's buffers do), so training replays
    only earlier experiences — better protection in class-incremental streams.

    The buffer needs the store, which a plugin first sees in ``before_training``; a
    state loaded before that is kept and applied then.
    """

    engram_name = "replay"

    def __init__(self, mem_size: int, policy: Policy = "reservoir", seed: int = 0,
                 admission: Admission = "stream") -> None:  # fmt: skip
        super().__init__()
        if admission not in ("stream", "experience_end"):
            raise ReplayBufferError(
                f"admission must be 'stream' or 'experience_end', not {admission!r}"
            )
        self.mem_size = mem_size
        self.policy = policy
        self.seed = seed
        self.admission = admission
        self.buffer: ReplayBuffer | None = None
        self._pending: dict[str, Any] | None = None
        self._current: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def hparams(self) -> dict[str, Any]:
        return {"mem_size": self.mem_size, "policy": self.policy, "seed": self.seed,
                "admission": self.admission}  # fmt: skip

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        if self.buffer is None:
            # Data-parallel: mem_size is global; each rank holds a shard of it, admitting
            # from its own data shard with its own random streams.
            w = distributed.world()
            capacity = shard_capacity(self.mem_size, w.rank, w.size)
            self.buffer = ReplayBuffer(strategy.samples, capacity, self.policy, self.seed)
            if w.rank:
                for g, offset in ((self.buffer.admit_rng, 0), (self.buffer.sample_rng, 1)):
                    g.manual_seed(self.seed + 7919 * w.rank + offset)
        if self._pending is not None:
            self.buffer.load_state_dict(self._pending)
            self._pending = None

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        # what this step admits: the experience's own samples, not replayed ones
        self._current = (strategy.mb_x, strategy.mb_y, strategy.mb_task_id)

    def admit(self, strategy: Any, logits: torch.Tensor | None = None) -> None:
        x, y, task = self._current
        self.buffer.add(x, y, task=task, experience=strategy.clock.train_exp_counter, logits=logits)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.admission == "stream":
            self.admit(strategy)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self.admission == "experience_end":
            self.admit_experience(strategy)

    def admit_experience(self, strategy: Any) -> None:
        """Offer the trained experience's dataset (eval transforms, in order) to the buffer."""
        from torch.utils.data import DataLoader

        dataset = strategy.experience.dataset.eval()
        loader = DataLoader(dataset, batch_size=strategy.train_mb_size,
                            sampler=distributed.world().shard(len(dataset)),  # this rank's
                            collate_fn=getattr(dataset, "collate_fn", None))  # fmt: skip
        was_training = strategy.model.training
        strategy.model.eval()
        try:
            with torch.no_grad():
                for x, y, task in loader:
                    self._current = (x.to(strategy.device), y, task)
                    self.admit(strategy, logits=self.logits_for(strategy, x, task))
        finally:
            strategy.model.train(was_training)
            self._current = None

    def logits_for(self, strategy: Any, x: torch.Tensor, task: torch.Tensor) -> Any:
        """What to store with admitted samples at an experience's end (DER: logits)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        if self.buffer is None:
            return dict(self._pending or {})
        return self.buffer.state_dict()

    @staticmethod
    def repartition(states: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
        """The shards of a data-parallel run of another world size as ``size`` shards."""
        if not all(states):  # no buffer yet (nothing trained)
            return [states[0]] * size
        return repartition(states, size)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.buffer is None:
            self._pending = state
        else:
            self.buffer.load_state_dict(state)


class ERPlugin(BufferPlugin):
    """Experience replay: the minibatch is extended with ``batch_size_mem`` buffer samples."""

    def __init__(
        self,
        mem_size: int = default("replay", "mem_size"),
        batch_size_mem: int | None = default("replay", "batch_size_mem"),
        policy: Policy = default("replay", "policy"),
        seed: int = 0,
        admission: Admission = default("replay", "admission"),
    ) -> None:
        super().__init__(mem_size, policy, seed, admission)
        self.batch_size_mem = batch_size_mem

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "batch_size_mem": self.batch_size_mem}

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        super().before_forward(strategy)
        if not len(self.buffer):
            return
        memory = self.buffer.sample(self.batch_size_mem or len(strategy.mb_x))
        x, y, task = self._current
        strategy.mbatch[0] = torch.cat([x, memory["x"].to(x.device, x.dtype)])
        strategy.mbatch[1] = torch.cat([y, memory["y"].to(y.device)])
        strategy.mbatch[-1] = torch.cat([task, memory["task"].to(task.device)])
