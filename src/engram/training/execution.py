"""The determinism contract: the settings bit-identical resumption depends on.

A resumed run continues *exactly* where the last one stopped only if it computes the
same way: float reductions differ in their last bits with another thread count, another
device, another torch version, non-deterministic kernels or another precision. Every
version records these settings (``meta["execution"]``); on resume the template compares
them with the current ones and, if any differ, continues — the continuation is valid —
but warns once, naming each difference and that the result will not be bit-identical to
an uninterrupted run (:class:`ExecutionChangedWarning`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from engram import distributed

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
_CUBLAS = "CUBLAS_WORKSPACE_CONFIG"


class ExecutionChangedWarning(UserWarning):
    """A resumed run computes differently from the run that wrote HEAD."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` is CUDA when available, else CPU; anything else as torch reads it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    missing = unavailable(resolved)
    if missing is not None:
        from engram.errors import EngramError

        raise EngramError(f"device {device} was asked for, but {missing}; "
                          "use device=cpu or auto")  # fmt: skip
    return resolved


def unavailable(device: torch.device) -> str | None:
    """Why this machine cannot train on ``device`` (None: it can). Checked by config
    validation too, so a run that asks for a missing GPU stops before its store exists."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"{count} CUDA device(s)" if count else "no CUDA device"
            return f"torch sees {have} here (torch {torch.__version__})"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"torch cannot use Apple's MPS here (torch {torch.__version__})"
    return None


def device_count(device: torch.device) -> int:
    """CUDA devices this process sees when it trains on CUDA; 0 on any other device."""
    return torch.cuda.device_count() if device.type == "cuda" else 0


def settings(device: torch.device, precision: str) -> dict[str, Any]:
    """What this process would record for a version computed on ``device``."""
    name = "cpu"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return {
        "torch": torch.__version__,
        "device": device.type,
        "device_name": name,
        # the CUDA RNG is committed as one stream per visible device: another count
        # cannot restore it (absent in stores written before it was recorded: unknown)
        "device_count": device_count(device),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "precision": precision,
        "world_size": distributed.world().size,  # data-parallel ranks (torchrun)
    }


def differences(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """``key: store X vs now Y`` for each recorded setting that differs."""
    if not stored:
        return []
    return [f"{k}: store {stored[k]!r} vs now {current.get(k)!r}"
            for k in stored if stored[k] != current.get(k)]  # fmt: skip


def warn_if_changed(path: Any, head: str, stored: Mapping[str, Any] | None,
                    current: Mapping[str, Any]) -> list[str]:  # fmt: skip
    diffs = differences(stored, current)
    if diffs:
        warnings.warn(
            f"resuming {path} ({head}) with different execution settings: {'; '.join(diffs)}. "
            "The continuation is valid, but not bit-identical to an uninterrupted run",
            ExecutionChangedWarning,
            stacklevel=3,
        )
    return diffs


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` (and cuBLAS's workspace setting) for
    the block; the process's previous settings are restored afterwards."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())  # fmt: skip
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    workspace = os.environ.get(_CUBLAS)
    os.environ.setdefault(_CUBLAS, ":4096:8")  # needed by deterministic cuBLAS kernels
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        if workspace is None:
            os.environ.pop(_CUBLAS, None)
        else:
            os.environ[_CUBLAS] = workspace
