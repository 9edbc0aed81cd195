"""The process group's backend follows the device the run trains on: NCCL on CUDA,
including ``training.device=auto`` (the default) on a machine with a GPU; else gloo.
(``torch.cuda.is_available`` is set per case: the choice, not torch, is under test.)"""

from __future__ import annotations

import pytest
import torch

from engram.distributed import backend_for


@pytest.mark.parametrize(
    ("device", "cuda", "backend"),
    [
        ("auto", True, "nccl"),
        ("cuda", True, "nccl"),
        ("cuda:1", True, "nccl"),
        ("cpu", True, "gloo"),
        ("auto", False, "gloo"),
        ("cpu", False, "gloo"),
    ],
)
def test_the_backend_is_nccl_exactly_when_the_run_trains_on_cuda(
    monkeypatch: pytest.MonkeyPatch, device: str, cuda: bool, backend: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert backend_for(device) == backend
