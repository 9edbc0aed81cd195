"""ER-ACE: experience replay with the asymmetric cross-entropy (Caccia et al. 2022, "New
Insights on Reducing Abrupt Representation Change in Online Continual Learning", ICLR).

Each step trains on the incoming minibatch and a minibatch drawn from the buffer (one
forward pass over both, as :class:`~engram.strategies.replay.ERPlugin`), but their losses
differ: the incoming samples' cross-entropy is taken over only the classes present in
the incoming minibatch (the other logits are masked out, so learning new classes does
not push down the logits of old ones), the replayed samples' over all classes; the loss
is their mean, ``(CE_incoming_masked + CE_replayed) / 2`` (:func:`ace_loss`). With an
empty buffer it is the masked cross-entropy alone.

Against Avalanche (``avalanche.training.ACECriterion``, ``avalanche.training.ER_ACE``):

- the loss is Avalanche's ``ACECriterion`` (only the present classes unmasked; the
  authors' code also leaves not-yet-seen classes unmasked and does not mask in the first
  task), computed with ``F.cross_entropy`` over the present classes' logits, which equals
  its softmax-then-log but cannot underflow to NaN;
- Avalanche's ``ER_ACE`` uses the plain criterion while it does not replay (the first
  experience, or a buffer smaller than ``batch_size_mem``); here the incoming loss is
  always masked, and a non-empty buffer is always replayed;
- the buffer minibatch (``batch_size_mem``, default the training batch size; Avalanche:
  10) is drawn uniformly with replacement from the buffer's own persisted RNG, not by a
  shuffled loader over it;
- admission is engram's (:mod:`engram.strategies.memory`): ``"stream"`` (default here,
  unlike replay and DER) offers each trained minibatch, ``"experience_end"`` the whole
  trained experience; Avalanche's ``ER_ACE`` puts the whole experience into a
  class-balanced buffer (``policy="class_balanced"`` here) *before* training on it, so it
  also replays the current experience (as ``"stream"`` does), from the second experience
  on. With only earlier classes replayed, nothing pushes their logits down on the new
  classes' samples (the incoming loss masks them), a likely reason why class-incremental
  accuracy drops (docstring of ``ERACEConfig`` in :mod:`engram.strategies.registry`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from engram.memory.replay import Policy
from engram.strategies.memory import Admission
from engram.strategies.registry import default
from engram.strategies.replay import ERPlugin


def ace_loss(
    out_in: torch.Tensor,
    y_in: torch.Tensor,
    out_mem: torch.Tensor | None = None,
    y_mem: torch.Tensor | None = None,
) -> torch.Tensor:
    """The asymmetric cross-entropy: the incoming samples' cross-entropy over the classes
    present in ``y_in`` only, averaged with the replayed samples' over all classes (the
    masked one alone without ``out_mem``). Float32 under mixed precision."""
    present = torch.unique(y_in)  # sorted: a target's index in it is its masked class
    loss = F.cross_entropy(out_in[:, present].float(), torch.searchsorted(present, y_in))
    if out_mem is None:
        return loss
    return (loss + F.cross_entropy(out_mem.float(), y_mem)) / 2


class ERACEPlugin(ERPlugin):
    """ER-ACE: experience replay (:class:`~engram.strategies.replay.ERPlugin`: the
    minibatch is extended with ``batch_size_mem`` buffer samples, the same memory, state
    and admission) with the template's loss replaced by :func:`ace_loss` over the two
    parts.

    ``admission``: see :mod:`engram.strategies.memory`. Other plugins' loss terms compose
    (in any order): only the template's criterion term is replaced.
    """

    engram_name = "er_ace"

    def __init__(
        self,
        mem_size: int = default("er_ace", "mem_size"),
        batch_size_mem: int | None = default("er_ace", "batch_size_mem"),
        policy: Policy = default("er_ace", "policy"),
        seed: int = 0,
        admission: Admission = default("er_ace", "admission"),
    ) -> None:
        super().__init__(mem_size, batch_size_mem, policy, seed, admission)
        self._incoming = 0  # the step's samples: this many incoming, then the replayed
        self._empty_loss: tuple[torch.Tensor, int] | None = None

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        self._incoming = len(strategy.mb_x)
        super().before_forward(strategy, **kwargs)

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        # The loss is still the template's empty one; it adds its criterion to it next,
        # in place. before_backward can then tell whether anything else was added since.
        self._empty_loss = (strategy.loss, strategy.loss._version)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        out, y, n = strategy.mb_output, strategy.mb_y, self._incoming
        replayed = (out[n:], y[n:]) if len(out) > n else ()  # (): nothing replayed
        ace = ace_loss(out[:n], y[:n], *replayed)
        empty, version = self._empty_loss or (None, -1)
        self._empty_loss = None
        loss = strategy.loss
        if loss is empty and loss._version == version + 1:
            strategy.loss = ace.reshape(loss.shape)  # it holds the criterion alone: replace
        else:  # an earlier plugin's hook added its term: keep that, take the criterion out
            strategy.loss = loss - strategy.criterion() + ace
