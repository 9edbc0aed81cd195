"""`engram ls` lists the newest versions only (its cost flat in the history's length),
says how many there are, and lists every one with --all."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engram.cli import main
from engram.cli.history import LS_NEWEST
from engram.store import Store


def test_ls_pages_a_long_history(tmp_path: Path, capsys) -> None:
    n = LS_NEWEST + 5
    with Store.open(tmp_path / "s", mode="c") as store:
        for i in range(n):
            store.commit({"x": torch.full((2,), float(i))}, meta={"i": i})
    assert main(["ls", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if " v00" in line]
    assert len(rows) == LS_NEWEST and "v0006" in rows[0] and f"v{n:04d}" in rows[-1]
    assert out[-1] == f"(the newest {LS_NEWEST} of {n} versions; --all lists every one)"
    assert main(["ls", str(tmp_path / "s"), "--all"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if " v00" in line]) == n and "--all" not in out[-1]
    assert main(["ls", str(tmp_path / "s"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["count"] == n and len(listed["versions"]) == LS_NEWEST
