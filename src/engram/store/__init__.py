"""engram.store: a versioned, crash-safe store (LMDB state + safetensors checkpoints).

Independent of Avalanche and Hydra: a plain PyTorch loop can persist its state with it.
"""

from engram.store.codec import Later, SampleIds
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
