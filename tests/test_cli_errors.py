"""`engram` failures: with --json every error is a JSON document on stdout with the exit
code; `engram export` never overwrites a file without --force, nor anything in the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engram.cli import main
from engram.cli.export import _atomic_write
from engram.errors import EngramError
from engram.models import build_model
from engram.store import Store

ENGRAM = Path(sys.executable).with_name("engram")
SPEC = {"name": "mlp", "args": {"input_shape": [4], "n_classes": 2, "hidden": [8]}}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """Two versions, each with a model checkpoint."""
    path = tmp_path / "store"
    torch.manual_seed(0)
    with Store.open(path, mode="c") as s:
        for e in range(2):
            meta = {"experience": e, "kind": "experience", "model_spec": SPEC}
            s.commit({"clock": {"iterations": e}}, model=build_model(SPEC), meta=meta)
    return path


def run(capsys, *argv: str | os.PathLike) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def json_error(code: int, out: str, err: str, exit: int, *words: str) -> str:
    """The error of a failed --json command: a JSON document on stdout, one line on stderr."""
    assert code == exit
    doc = json.loads(out)
    assert doc == {"error": doc["error"], "exit": exit}
    assert err.count("\n") == 1 and err.rstrip("\n").endswith(f": error: {doc['error']}"), err
    for w in words:
        assert w in doc["error"]
    return doc["error"]


# ------------------------------------------------------------------ --json errors


def test_every_user_error_is_json_with_exit_code_2(store: Path, tmp_path: Path, capsys) -> None:
    cases = [
        (("show", store, "v0042"), "v0042"),
        (("ls", tmp_path / "missing"), "no store at"),
        (("show",), "STORE"),  # a usage error, found by argparse
        (("diff", store, "v0001"), "B"),
        (("frobnicate", store), "invalid choice"),
        (("gc", store, "--keep-last", "many"), "invalid int"),
        (("gc", store, "--keep-last", "-1"), "0 or more"),
        (("export", store, "--out", tmp_path / "no" / "m.safetensors"), "does not exist"),
        (("tag", store, "bad name!"), "bad name!"),
    ]
    for argv, word in cases:
        json_error(*run(capsys, *argv, "--json"), 2, word)
    # without --json: stdout stays empty, as before
    code, out, err = run(capsys, "show", store, "v0042")
    assert (code, out) == (2, "") and err.count("\n") == 1


def test_a_verify_failure_is_json_with_exit_code_1(store: Path, capsys) -> None:
    ckpt = next((store / "checkpoints").glob("model-v0002-*"))
    data = bytearray(ckpt.read_bytes())
    data[-5] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    code, out, err = run(capsys, "verify", store, "--json")
    report = json.loads(out)
    assert code == 1 and err == ""
    assert report["ok"] is False and report["exit"] == 1 and report["problems"]
    assert report["error"].startswith("1 problem(s), the first: ") and ckpt.name in report["error"]
    assert "error" not in json.loads(run(capsys, "verify", store, "v0001", "--json")[1])


def test_a_locked_store_is_json_with_exit_code_2(store: Path, capsys, hold_writer_lock) -> None:
    holder = hold_writer_lock(store)
    json_error(*run(capsys, "rollback", store, "v0001", "--json"), 2, "locked by pid",
               str(holder.pid))  # fmt: skip


def test_the_console_script_prints_json_errors_on_stdout(store: Path) -> None:
    for argv, exit in ((["show", str(store), "v0099", "--json"], 2), (["--json"], 2)):
        proc = subprocess.run([ENGRAM, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == exit and "Traceback" not in proc.stderr
        assert json.loads(proc.stdout)["exit"] == exit
        assert proc.stderr.count("\n") == 1


# ------------------------------------------------------------------ export


def test_export_refuses_an_existing_file_unless_forced(store: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"an earlier export")
    code, text, err = run(capsys, "export", store, "--out", out)
    assert code == 2 and text == "" and err.count("\n") == 1 and "--force" in err
    assert out.read_bytes() == b"an earlier export"
    json_error(*run(capsys, "export", store, "--out", out, "--json"), 2, "exists", "--force")
    assert out.read_bytes() == b"an earlier export"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # a link counts as a file
    json_error(*run(capsys, "export", store, "--out", tmp_path / "dangling", "--json"), 2, "exists")
    assert run(capsys, "export", store, "--out", out, "--force")[0] == 0
    with safe_open(out, "pt") as f:
        assert f.metadata()["version"] == "v0002"
    assert run(capsys, "export", store, "--out", tmp_path / "new.safetensors")[0] == 0


def store_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()
            and "memory.lmdb" not in p.parts and p.name != "writer.lock"}  # fmt: skip


def test_export_never_writes_inside_the_store(
    store: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    before = store_files(store)
    own = next((store / "checkpoints").glob("model-v0001-*"))  # the store's own checkpoint
    (tmp_path / "link").symlink_to(store / "checkpoints")
    targets = [
        own,
        store / "model.safetensors",
        store / "checkpoints" / "new.safetensors",
        tmp_path / "link" / own.name,  # through a symlinked directory
        tmp_path / "link" / ".." / "x.safetensors",
    ]
    for out in targets:
        for force in ([], ["--force"]):
            error = json_error(*run(capsys, "export", store, "--out", out, *force, "--json"), 2)
            assert "inside the store" in error
    assert store_files(store) == before
    monkeypatch.chdir(store)  # a relative --out from inside the store, too
    json_error(*run(capsys, "export", ".", "--out", "m.safetensors", "--json"), 2, "inside")
    assert store_files(store) == before


def test_a_file_that_appears_during_the_export_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "model.safetensors"

    def write(tmp: Path) -> None:  # another process creates --out while we write
        tmp.write_bytes(b"ours")
        out.write_bytes(b"theirs")

    with pytest.raises(EngramError, match="exists; pass --force"):
        _atomic_write(out, write, overwrite=False)
    assert out.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp left
    _atomic_write(out, write, overwrite=True)
    assert out.read_bytes() == b"ours"
