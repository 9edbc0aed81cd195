"""The replay memory that the replay-based plugins (ER, DER, A-GEM) each hold.

Not a plugin: a plugin owns one as ``self.memory`` and calls it from its hooks —
:meth:`ReplayMemory.prepare` in ``before_training``, :meth:`~ReplayMemory.observe` in
``before_forward``, :meth:`~ReplayMemory.admit` or :meth:`~ReplayMemory.admit_experience`
as its admission says — and forwards ``state_dict``, ``load_state_dict`` and
``repartition`` to it. The memory holds a :class:`~engram.memory.replay.ReplayBuffer` in
the strategy's store.

Admission: ``"stream"`` offers every training minibatch to the buffer as it is
trained on (online replay, as in Chaudhry et al.'s ER and Mammoth), so the buffer also
replays the current experience; ``"experience_end"`` offers the experience's whole
dataset once it is trained (as Avalanche's buffers do), so training replays only
earlier experiences — better protection in class-incremental streams.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from avalanche.core import SupervisedPlugin

from engram import distributed
from engram.memory.replay import (
    Draw,
    Policy,
    ReplayBuffer,
    ReplayBufferError,
)
from engram.memory.shards import repartition, shard_capacity

Admission = Literal["stream", "experience_end"]

#: ``logits_for(strategy, x, task)``: what to store with samples admitted at an
#: experience's end (DER: the trained model's logits).
LogitsFor = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor | None]


def check_admission(admission: str) -> Admission:
    """``admission`` if it is one of :data:`Admission`; raises ReplayBufferError otherwise."""
    if admission not in ("stream", "experience_end"):
        raise ReplayBufferError(
            f"admission must be 'stream' or 'experience_end', not {admission!r}"
        )
    return admission  # type: ignore[return-value]


class ReplayMemory:
    """A :class:`ReplayBuffer` in the strategy's store, created on first training.

    The buffer needs the store, which a plugin first sees in ``before_training``; a
    state loaded before that is kept and applied then. ``buffer`` is None until then.
    """

    def __init__(
        self, mem_size: int, policy: Policy, seed: int, draw: Draw = "with_replacement"
    ) -> None:
        self.mem_size = mem_size
        self.policy = policy
        self.seed = seed
        self.draw = draw
        self.buffer: ReplayBuffer | None = None
        self._pending: dict[str, Any] | None = None
        # what admit() offers: the step's own samples, not the replayed ones
        self._current: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def prepare(self, strategy: Any) -> None:
        """Create the buffer (first call) and apply a state loaded before it existed."""
        if self.buffer is None:
            # Data-parallel: mem_size is global; each rank holds a shard of it, admitting
            # from its own data shard with its own random streams.
            w = distributed.world()
            capacity = shard_capacity(self.mem_size, w.rank, w.size)
            self.buffer = ReplayBuffer(strategy.samples, capacity, self.policy, self.seed,
                                       self.draw)  # fmt: skip
            if w.rank:
                for g, offset in ((self.buffer.admit_rng, 0), (self.buffer.sample_rng, 1)):
                    g.manual_seed(self.seed + 7919 * w.rank + offset)
        if self._pending is not None:
            self.buffer.load_state_dict(self._pending)
            self._pending = None

    def observe(self, strategy: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Note the minibatch about to be trained on (before replay extends it): what
        :meth:`admit` offers. Returns it as ``(x, y, task)``."""
        self._current = (strategy.mb_x, strategy.mb_y, strategy.mb_task_id)
        return self._current

    def admit(self, strategy: Any, logits: torch.Tensor | None = None) -> None:
        """Offer the observed minibatch (and its ``logits``, DER) to the buffer."""
        x, y, task = self._current
        self.buffer.add(x, y, task=task, experience=strategy.clock.train_exp_counter, logits=logits)

    def admit_experience(self, strategy: Any, logits_for: LogitsFor | None = None) -> None:
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
                    logits = logits_for(strategy, x, task) if logits_for is not None else None
                    self.admit(strategy, logits=logits)
        finally:
            strategy.model.train(was_training)
            self._current = None

    def state_dict(self) -> dict[str, Any]:
        """The buffer's state dict itself (the layout stores hold: keep it so)."""
        if self.buffer is None:
            return dict(self._pending or {})
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.buffer is None:
            self._pending = state
        else:
            self.buffer.load_state_dict(state)

    @staticmethod
    def repartition(states: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
        """The shards of a data-parallel run of another world size as ``size`` shards."""
        if not all(states):  # no buffer yet (nothing trained)
            return [states[0]] * size
        return repartition(states, size)


class MemoryPlugin(SupervisedPlugin):
    """A plugin holding a :class:`ReplayMemory` as ``self.memory`` (ER, DER, A-GEM): the
    buffer is created in ``before_training``, the state is the memory's, and a resume at
    another world size deals its shards anew. Subclasses set ``self.memory``."""

    memory: ReplayMemory
    repartition = staticmethod(ReplayMemory.repartition)

    @property
    def buffer(self) -> ReplayBuffer | None:
        """The memory's buffer (None until the first training)."""
        return self.memory.buffer

    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self.memory.prepare(strategy)

    def state_dict(self) -> dict[str, Any]:
        return self.memory.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state)
