"""The demo loop resumes bit-identically across processes through the store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from engram.demo import main
from engram.store import Store


def run_demo(store: Path, *args: str) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engram.demo",
            "--store",
            str(store),
            "--quiet",
            "--epochs",
            "1",
            *args,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def test_one_process_per_experience_equals_one_process(tmp_path: Path) -> None:
    assert main(["--store", str(tmp_path / "whole"), "--quiet", "--epochs", "1"]) == 0
    for _ in range(5):
        run_demo(tmp_path / "split", "--max-experiences", "1")
    assert "already trained" in run_demo(tmp_path / "split")
    with Store.open(tmp_path / "whole") as whole, Store.open(tmp_path / "split") as split:
        a, b = whole.load(), split.load()
        assert [v.id for v in split.versions()] == [1, 2, 3, 4, 5]
        assert a.state["accuracy_matrix"] == b.state["accuracy_matrix"]
        for key in a.model:
            assert torch.equal(a.model[key], b.model[key]), key
        assert split.verify(all=True).ok


def test_locked_store_gives_one_line_error(tmp_path: Path, capsys) -> None:
    with Store.open(tmp_path / "s", mode="c"):
        assert main(["--store", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram-demo: error: store") and "locked by pid" in err
