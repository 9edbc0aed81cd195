"""``engram verify --untrusted`` on a store this user may not read: one line, exit 2, as
``engram verify`` says it, never "the store is corrupt" (its bytes may be intact).

The suite runs as root, which reads whatever the modes say, so the command runs in a
child without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (``WITHOUT_DAC`` of
test_readonly.py); the verifying grandchild ``--untrusted`` starts inherits that. Each
case takes every permission away from one part of a copy of the store (mode 000).
Skipped where this machine cannot start such a child.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_readonly import SPEC, WITHOUT_DAC

from engram.models import build_model
from engram.store import Store

# (case, the part made unreadable, the command's arguments before the store)
CASES = [
    ("store directory", ".", ["verify", "--untrusted"]),
    ("memory.lmdb", "memory.lmdb", ["verify", "--untrusted"]),
    ("data.mdb", "memory.lmdb/data.mdb", ["verify", "--untrusted"]),
    ("a pack file", "blobs/pack-00000001.bin", ["verify", "--untrusted", "--all"]),
    ("HEAD's checkpoint", "checkpoints/model-v0002.safetensors", ["verify", "--untrusted"]),
    (
        "a pack file, --json",
        "blobs/pack-00000001.bin",
        ["verify", "--untrusted", "--all", "--json"],
    ),
]

# In the child without the two capabilities: each case's command, one JSON line each.
COMMANDS = r"""
import contextlib, io, json, sys
from engram.cli import main

for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except BaseException as e:  # a traceback's stand-in: the test fails on it
        code, err = 99, io.StringIO(f"Traceback: {type(e).__name__}: {e}")
    print(json.dumps({"exit": code, "stdout": out.getvalue(), "stderr": err.getvalue()}))
"""


@pytest.fixture
def base() -> Iterator[Path]:
    """A directory of one copy of a 2-version store per case (pytest's temp dirs are
    0700, so the copies live in a directory of their own)."""
    root = Path(tempfile.mkdtemp(prefix="engram-unreadable-"))
    try:
        torch.manual_seed(0)
        with Store.open(root / "made", mode="c") as store:
            for i in range(2):
                store.commit({"w": torch.randn(100)}, model=build_model(SPEC), meta={"i": i})
        for i, (_, part, _) in enumerate(CASES):
            shutil.copytree(root / "made", root / f"s{i}")
            (root / f"s{i}" / part).resolve().chmod(0o000)
        yield root
    finally:
        for dirpath, _, _ in os.walk(root):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(root)


def _child_prefix(probe: Path) -> list[str]:
    """How to start a child the file modes bind (root without the two capabilities);
    skips the test where none can be started."""
    prefix = [] if os.geteuid() != 0 else [sys.executable, "-c", WITHOUT_DAC]
    done = subprocess.run([*prefix, sys.executable, "-c", f"open({str(probe)!r}).read()"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    if done.returncode == 0 or "PermissionError" not in done.stderr:
        pytest.skip(f"cannot start a child that the file modes bind: {done.stderr[-300:]}")
    return prefix


def test_verify_untrusted_of_an_unreadable_store_is_one_line_exit_2(base: Path) -> None:
    prefix = _child_prefix(base / "s2" / "memory.lmdb" / "data.mdb")
    argvs = [[*args, str(base / f"s{i}")] for i, (_, _, args) in enumerate(CASES)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    done = subprocess.run(
        [*prefix, sys.executable, "-c", COMMANDS, json.dumps(argvs)],
        capture_output=True, text=True, timeout=300, env=env, cwd=base,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(CASES)
    for i, ((case, part, args), r) in enumerate(zip(CASES, results, strict=True)):
        denied = str((base / f"s{i}" / part).resolve())
        assert r["exit"] == 2, (case, r)
        if "--json" in args:
            result = json.loads(r["stdout"])
            assert result["exit"] == 2, (case, result)
            message = result["error"]
        else:
            assert r["stdout"] == "", (case, r)
            (message,) = r["stderr"].splitlines()  # one line
        assert "Traceback" not in message and "corrupt" not in message, (case, message)
        assert "cannot access " in message and "permission denied" in message, (case, message)
        named = message.split("cannot access ")[1].split(": permission denied")[0]
        # the part itself, a file inside it, or (LMDB names its environment) its directory
        assert named.startswith(denied) or denied.startswith(named), (case, message, denied)
