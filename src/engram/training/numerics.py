"""Numerics of a training step: mixed precision and the non-finite guard.

``precision``: ``"32"`` (float32 throughout), ``"bf16-mixed"`` (forward and loss under
``torch.autocast`` in bfloat16; weights, gradients, optimizer state and the EWC/SI/MAS
importances stay float32) or ``"16-mixed"`` (float16 autocast with a
``torch.amp.GradScaler``, whose state is part of the committed state so a resumed run
scales exactly as the uninterrupted one). Gradients are unscaled right after the
backward pass, so plugins that read or project them (A-GEM, SI) see true gradients;
data-parallel, after the gradient all-reduce, so every rank's scaler finds the same
overflow and the ranks skip a step together.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch

from engram.training.execution import PRECISIONS


class Precision:
    """Autocast and (for ``16-mixed``) loss scaling for one device."""

    def __init__(self, precision: str, device: torch.device) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.name = precision
        self.device = device
        self.dtype = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[
            precision
        ]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None

    def autocast(self) -> Any:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """The backward pass; with a scaler, of the scaled loss: the gradients stay
        scaled until :meth:`unscale`."""
        if self.scaler is None:
            loss.backward(retain_graph=retain_graph)
        else:
            self.scaler.scale(loss).backward(retain_graph=retain_graph)

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """True gradients; the scaler records whether any is inf/NaN (so data-parallel
        this comes after the all-reduce: every rank then finds the same)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skips the step itself on inf/NaN gradients
        self.scaler.update()

    def skip(self) -> None:
        """End a step that was not taken: the scaler still updates (lowering its scale
        if the gradients overflowed), else the next :meth:`unscale` finds this step's
        still open and raises."""
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else dict(self.scaler.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def finite_step(loss: torch.Tensor, params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether the loss and every gradient are finite: one device sync for all of them."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch._foreach_norm(grads) if grads else []
    values = torch.stack([loss.detach().float().reshape(()), *[n.float() for n in norms]])
    return bool(torch.isfinite(values).all())


def nonfinite_weights(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.state_dict().items()
            if p.is_floating_point() and not bool(torch.isfinite(p).all())]  # fmt: skip
