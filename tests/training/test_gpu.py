"""On a GPU (marked ``gpu``: skipped without CUDA): a SIGKILLed deterministic run resumes
bit-identically, and a store written on the GPU resumes on the CPU. (The kill helper's
own test runs everywhere.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engram.store import Store

ARGS = ["training.deterministic=true", "training.epochs=1",
        "training.commit_every_iterations=5", "benchmark.n_experiences=5",
        "run.quiet=true", "logger=none"]  # fmt: skip


def engram_train(store: Path, *extra: str, device: str = "cuda") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engram.train", f"store.path={store}", *ARGS,
                           f"training.device={device}", *extra],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def weights(path: Path) -> dict[str, torch.Tensor]:
    with Store.open(path) as store:
        return store.load(state=False).model


def head_kind(path: Path) -> str | None:
    try:
        with Store.open(path) as s:
            return s.head.meta["kind"] if s.head is not None else None
    except Exception:  # not created yet, or being created
        return None


def kill_at_mid_experience(proc: subprocess.Popen, store: Path, timeout_s: float = 300) -> None:
    """SIGKILL ``proc`` once ``store``'s HEAD is a mid-experience version; fails the test
    if the run ends first (nothing left to kill) or none appears within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if head_kind(store) == "mid-experience":
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=60) == -signal.SIGKILL
                return
            time.sleep(0.05)
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {store} held a "
                        "mid-experience version to kill it at")  # fmt: skip
        pytest.fail(f"no mid-experience version in {store} within {timeout_s:.0f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def test_kill_at_mid_experience_fails_at_once_when_the_run_ends_first(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    with pytest.raises(pytest.fail.Exception, match=r"the run ended \(exit 0\) before"):
        kill_at_mid_experience(proc, tmp_path / "never-created", timeout_s=60)


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["ewc", "replay", "derpp"])
def test_sigkill_and_rerun_equals_an_uninterrupted_run_on_cuda(tmp_path: Path,
                                                                 strategy: str) -> None:  # fmt: skip
    assert engram_train(tmp_path / "whole", f"strategy={strategy}").returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "engram.train",
                             f"store.path={tmp_path / 'killed'}", *ARGS, "training.device=cuda",
                             f"strategy={strategy}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    kill_at_mid_experience(proc, tmp_path / "killed")
    assert engram_train(tmp_path / "killed", f"strategy={strategy}").returncode == 0
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.gpu
def test_a_store_written_on_the_gpu_resumes_on_the_cpu(tmp_path: Path) -> None:
    store = tmp_path / "s"
    assert engram_train(store, "strategy=ewc", "run.max_experiences=2").returncode == 0
    out = engram_train(store, "strategy=ewc", device="cpu")
    assert out.returncode == 0, out.stderr
    assert "device: store 'cuda' vs now 'cpu'" in out.stderr  # warned: not bit-identical
    with Store.open(store) as s:
        assert s.head.meta["execution"]["device"] == "cpu"
        assert s.verify(all=True).ok
