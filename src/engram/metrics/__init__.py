"""Continual-learning metrics computed from the persisted accuracy matrix."""

from engram.metrics.forgetting import (
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
    summary,
)

__all__ = ["average_accuracy", "backward_transfer", "forgetting", "forward_transfer", "summary"]
