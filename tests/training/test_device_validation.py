"""A device this machine lacks is a config error: one line, exit 2, before Hydra or the
template creates anything under ``store.path``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENGRAM_TRAIN = str(Path(sys.executable).parent / "engram-train")


def test_training_device_cuda_without_a_gpu_exits_2_before_the_store_exists(
    tmp_path: Path,
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    store = tmp_path / "s"
    proc = subprocess.run([ENGRAM_TRAIN, f"store.path={store}", "training.device=cuda"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        "engram-train: error: training.device=cuda asks for a GPU, but torch sees no CUDA "
        f"device here (torch {torch.__version__}); use training.device=auto or cpu"
    ]
    assert not store.exists()


def test_a_cuda_index_beyond_the_visible_devices_is_refused(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_module

    from engram.errors import ConfigError
    from engram.run.validation import register, validate

    register()  # the schemas the configs extend (engram.train does this on import)

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with initialize_config_module("engram.configs", version_base="1.3"):
        cfg = compose("train", [f"store.path={tmp_path / 's'}", f"training.device=cuda:{n}"])
    with pytest.raises(ConfigError, match=rf"training.device=cuda:{n} asks for a GPU"):
        validate(cfg)
