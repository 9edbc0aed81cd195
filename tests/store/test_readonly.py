"""A registry shared read-only: every reading command works on a store directory the
user cannot write, and on a read-only mount (LMDB's lock-free read-only open, since
its lock file cannot be written), and nothing in the store changes.

Both views are real, not mocked. The suite runs as root, which ignores permissions:
the first case removes the copy's write bits and runs its child without
CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped from the bounding set before exec,
as tests/test_os_faults.py does), so the kernel applies the modes to it; the second
bind-mounts the copy read-only in a private mount namespace (``unshare -m``), which
binds root too. A case this machine cannot make is skipped with the reason.
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

from engram.models import build_model
from engram.store import Store

SPEC = {"name": "mlp", "args": {"input_shape": [8], "n_classes": 3, "hidden": [16]}}
# Drops the two capabilities that let root ignore file modes, then execs the command.
WITHOUT_DAC = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: gone for good at exec
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit(f"cannot drop capability {cap}: errno {ctypes.get_errno()}")
os.execv(sys.argv[1], sys.argv[1:])
"""

# Runs in the child, as the user who cannot write the store: each reading command in
# this process (the CLI's main, load_model, ModelHandle), one JSON line each.
READERS = r"""
import contextlib, io, json, sys
from engram.cli import main
store, out = sys.argv[1], sys.argv[2]

def run(name, call):
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            code = call()
    except Exception as e:
        code, buf = 99, io.StringIO(f"{type(e).__name__}: {e}")
    print(json.dumps({"name": name, "exit": code, "output": buf.getvalue()[-1500:]}), flush=True)

for argv in (["ls", store], ["show", store, "prod"], ["verify", store],
             ["verify", "--all", store], ["verify", "--untrusted", "--all", store],
             ["diff", store, "1", "2"], ["du", store],
             ["export", store, "prod", "--out", out + "/model.safetensors"]):
    run(" ".join(argv[:2] if argv[1].startswith("-") else argv[:1]), lambda: main(argv))

def load():
    import engram
    model = engram.load_model(store, "prod")
    return 0 if sum(p.numel() for p in model.parameters()) > 0 else 1

def handle():
    import engram
    with engram.ModelHandle(store, "prod") as h:
        return 0 if h.model is not None and h.version.id == 2 else 1

run("load_model", load)
run("ModelHandle", handle)
"""


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("made") / "store"
    with Store.open(path, mode="c") as store:
        for i in range(2):
            store.samples.append([bytes([i]) * 100])
            store.commit({"w": torch.randn(100)}, model=build_model(SPEC),
                         meta={"experience": i, "model_spec": SPEC})  # fmt: skip
        store.tag("prod")
    return path


@pytest.fixture
def shared(made: Path) -> Iterator[Path]:
    """A world-readable directory (pytest's own temp dirs are 0700): ``store`` (a copy
    of ``made``), ``out`` and ``home`` anyone may write."""
    base = Path(tempfile.mkdtemp(prefix="engram-readonly-"))
    try:
        base.chmod(0o755)
        shutil.copytree(made, base / "store")
        for name in ("out", "home"):
            (base / name).mkdir(mode=0o777)
            (base / name).chmod(0o777)
        yield base
    finally:
        _make_writable(base)
        shutil.rmtree(base)


def _remove_write_bits(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o444)
        os.chmod(dirpath, 0o555)


def _make_writable(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime: what must not change."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _run(argv_prefix: list[str], base: Path) -> list[dict]:
    env = dict(os.environ, HOME=str(base / "home"), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, (str(Path(__file__).resolve().parents[2] / "src"), env.get("PYTHONPATH")))
    )
    done = subprocess.run(
        [*argv_prefix, sys.executable, "-c", READERS, str(base / "store"), str(base / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=base,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def _check(results: list[dict], base: Path) -> None:
    names = [r["name"] for r in results]
    assert names == ["ls", "show", "verify", "verify --all", "verify --untrusted", "diff",
                     "du", "export", "load_model", "ModelHandle"]  # fmt: skip
    for r in results:
        assert r["exit"] == 0, r
    assert (base / "out" / "model.safetensors").stat().st_size > 0


def _unwritable_prefix(store: Path) -> list[str]:
    """How to start a child that cannot write ``store`` (its write bits removed); skips
    the test if this machine cannot make one."""
    prefix = [] if os.geteuid() != 0 else [sys.executable, "-c", WITHOUT_DAC]
    probe = f"open({str(store / 'probe')!r}, 'w')"
    done = subprocess.run([*prefix, sys.executable, "-c", probe], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    if done.returncode == 0 or "PermissionError" not in done.stderr:
        (store / "probe").unlink(missing_ok=True)
        pytest.skip(f"cannot start a child that the file modes bind: {done.stderr[-300:]}")
    return prefix


@pytest.mark.parametrize("lock_file", ["kept", "absent"])
def test_reading_commands_work_without_write_access(shared: Path, lock_file: str) -> None:
    store = shared / "store"
    if lock_file == "absent":  # and it cannot be created: the directory is not writable
        (store / "memory.lmdb" / "lock.mdb").unlink()
    _remove_write_bits(store)
    prefix = _unwritable_prefix(store)
    before = _snapshot(store)
    _check(_run(prefix, shared), shared)
    assert _snapshot(store) == before


def test_reading_commands_work_on_a_read_only_mount(shared: Path) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a private read-only bind mount")
    store = shared / "store"
    mount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'  # the store is read-only for this child only, root included
    probe = subprocess.run(["unshare", "-m", "sh", "-c", mount, str(store), "true"],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.strip()}")
    before = _snapshot(store)
    _check(_run(["unshare", "-m", "sh", "-c", mount, str(store)], shared), shared)
    assert _snapshot(store) == before
