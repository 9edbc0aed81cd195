"""The README's first run: a resumed DER++ run beside what losing its memory costs."""

from __future__ import annotations

import re
from pathlib import Path

from hydra import compose, initialize_config_module

from engram.store import Store
from engram.train import train


def config(store: Path, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=["experiment=first_run", f"store.path={store}",
                                           "logger.tensorboard=false", *overrides])  # fmt: skip


def test_the_second_process_shows_what_the_memory_kept(tmp_path: Path, capsys) -> None:
    first = train(config(tmp_path / "s", "run.max_experiences=2"))
    out = capsys.readouterr().out
    assert len(first) == 2 and "run the same command again" in out
    matrix = train(config(tmp_path / "s"))
    out = capsys.readouterr().out
    assert "this run resumed v0002 and trained experiences 2..4" in out
    rows = re.findall(r"^  exp (\d)\s+((?:\d\.\d\d ){4}\d\.\d\d)\s+((?:\d\.\d\d ){4}\d\.\d\d)",
                      out, re.M)  # fmt: skip
    assert [int(r[0]) for r in rows] == [2, 3, 4]
    assert [[float(a) for a in r[1].split()] for r in rows] == [
        [round(a, 2) for a in row] for row in matrix[2:]]  # fmt: skip # the real run's rows
    kept, lost = map(
        float, re.search(r"average accuracy (\S+)\s+(\S+)", out.split("memory lost")[1]).groups()
    )
    assert kept > lost + 0.15, out  # losing the buffer forgets experiences 0-1
    lost_rows = [[float(a) for a in r[2].split()] for r in rows]
    assert all(row[0] < 0.2 and row[1] < 0.2 for row in lost_rows), lost_rows
    with Store.open(tmp_path / "s") as store:  # the shadow left nothing in the real store
        assert [v.meta["experience"] for v in store.versions()] == [0, 1, 2, 3, 4]
    again = train(config(tmp_path / "s"))  # nothing left to train: nothing compared
    assert again == matrix and "memory lost" not in capsys.readouterr().out
