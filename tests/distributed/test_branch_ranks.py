"""A data-parallel run that branches with new optimizer settings applies them on every
rank: rank 0 alone reads HEAD's meta (where the old settings are), so without sending
what changed, the other ranks would go on with the stored ones and their weights would
drift apart from rank 0's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
JOB = ["strategy=ewc", "benchmark.n_experiences=2", "training.epochs=1", "logger=none",
       "run.quiet=true", "training.threads=1", "optimizer.lr=0.05"]  # fmt: skip


def test_a_branch_with_a_new_lr_applies_it_on_every_rank(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = subprocess.run([str(BIN / "engram-train"), f"store.path={store}", *JOB,
                            "run.max_experiences=1"], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stderr[-4000:]
    out = tmp_path / "optimizer"
    argv = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2",
            str(HERE / "record_optimizer.py"), str(out), f"store.path={store}",
            *JOB[:-1], "optimizer.lr=0.01", "optimizer.momentum=0.5", "branch=true"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        groups = json.loads((tmp_path / f"optimizer.rank{rank}.json").read_text())
        assert [(g["lr"], g["momentum"]) for g in groups] == [(0.01, 0.5)] * len(groups), rank
