"""``benchmarks/gpu_check.sh --cpu-dry-run``: runs here, prints one summary line per check
(the GPU-only ones skipped), exits 0. Two minutes on 2 cores: ``-m slow``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ["pytest-gpu", "bf16-mixed", "16-mixed", "kill-rerun", "torchrun-nccl",
          "torchrun-gloo", "gpu-to-cpu-resume", "persistence-overhead", "vs-avalanche"]  # fmt: skip
GPU_ONLY = {"pytest-gpu", "torchrun-nccl", "gpu-to-cpu-resume"}


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="bash, torchrun with gloo on Linux")
def test_the_cpu_dry_run_runs_every_cpu_check_and_skips_the_gpu_ones() -> None:
    venv = str(Path(sys.executable).parents[1])  # the interpreter running the tests
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run"], cwd=ROOT,
                          env={**os.environ, "ENGRAM_VENV": venv},
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = [re.match(r"gpu_check: ([\w-]+): (ok|skipped|FAILED)\b", x) for x in
             proc.stdout.splitlines()]  # fmt: skip
    assert all(lines), proc.stdout
    assert [m[1] for m in lines] == CHECKS
    assert {m[1] for m in lines if m[2] == "skipped"} == GPU_ONLY
    assert re.search(r"kill-rerun: ok cpu: killed at v\d+ \(mid-experience\), rerun "
                     r"bit-identical", proc.stdout)  # fmt: skip
