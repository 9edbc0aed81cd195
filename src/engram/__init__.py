"""engram: continual learning with durable memory.

``import engram`` is light: heavy modules (torch, lmdb, avalanche) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from engram.handle import ModelHandle
    from engram.inference import load_model
    from engram.store import Store

__all__ = ["ModelHandle", "Store", "__version__", "load_model"]


def __getattr__(name: str) -> Any:
    if name == "Store":
        from engram.store import Store

        return Store
    if name == "load_model":
        from engram.inference import load_model

        return load_model
    if name == "ModelHandle":
        from engram.handle import ModelHandle

        return ModelHandle
    raise AttributeError(f"module 'engram' has no attribute {name!r}")
