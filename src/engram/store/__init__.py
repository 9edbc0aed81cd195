"""engram.store: a versioned, crash-safe store (LMDB state + safetensors checkpoints).

Independent of Avalanche and Hydra: a plain PyTorch loop can persist its state with it.
Importing it imports no torch (the inspection commands stay light): torch is imported
when tensors are encoded or decoded, or when :class:`SampleIds` is first named.
"""

from typing import Any

from engram.store.codec import Later
from engram.store.format import FORMAT_VERSION
from engram.store.store import (
    Artifact,
    CompactReport,
    GcReport,
    Problem,
    RefMoves,
    Snapshot,
    Store,
    VerifyReport,
    VersionInfo,
    version_name,
)

__all__ = [
    "FORMAT_VERSION",
    "Artifact",
    "CompactReport",
    "GcReport",
    "Later",
    "Problem",
    "RefMoves",
    "SampleIds",
    "Snapshot",
    "Store",
    "VerifyReport",
    "VersionInfo",
    "version_name",
]


def __getattr__(name: str) -> Any:
    if name == "SampleIds":  # a torch.Tensor subclass: naming it imports torch
        from engram.store.codec import SampleIds

        return SampleIds
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
