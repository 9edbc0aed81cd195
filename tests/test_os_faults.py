"""OS faults are one-line errors and lose nothing (docs/reliability.md, "OS faults").

Each test makes a real store with the public API, runs one ``engram`` or
``engram-train`` command in a child process under one fault, and checks: exit code 2
(1 would mean "verify found a problem"), exactly one line on stderr, naming the path,
then that the store verifies (``verify(all=True)``) with HEAD where it was. The
children (torch and Avalanche imports: seconds each) run two at a time, started as
soon as the first test needs one; each test waits for its own.

The faults are real, made by the kernel, in the child only:

* **disk full**: ``RLIMIT_FSIZE`` with SIGXFSZ ignored, so a write past the limit fails
  with EFBIG (LMDB, which writes pages with ``pwrite``, reports a cut-short one as EIO);
* **read-only file system**: the directories written bind-mounted read-only in a
  private mount namespace (``unshare -m``; ``-rm``, a user namespace, when not root);
* **permission denied**: their modes 0555/0444, and, as root, the child without
  CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (else root writes whatever the modes say).

A read-only file system and a permission are checked when a file is opened, so they
reach ``tag`` and ``rollback`` (LMDB opened for writing) as ``Store.open`` fails, and
cannot reach ``Store.close``: the kernel refuses to make a mount read-only while a file
is open for writing on it, and modes are not checked again on an open file.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from engram.store import Store

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux faults (rlimit, mounts)")

BIN = Path(sys.executable).parent
ENGRAM, ENGRAM_TRAIN = str(BIN / "engram"), str(BIN / "engram-train")
TINY = ["training.epochs=1", "benchmark.n_experiences=2", "run.quiet=true", "logger=none"]

DISK_FULL, READ_ONLY, PERMISSION = "disk full", "read-only", "permission denied"
FAULTS = [DISK_FULL, READ_ONLY, PERMISSION]

# Runs in the child, then execs the command: the limit, the ignored SIGXFSZ and the
# dropped capabilities all survive exec.
LAUNCH = r"""
import ctypes, os, resource, shlex, signal, sys
fault, limit, targets, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
if fault == "disk full":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
elif fault == "permission denied" and os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH: dropped for good at exec
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            sys.exit(f"cannot drop capability {cap}: errno {ctypes.get_errno()}")
elif fault == "read-only":
    mounts = "".join(f"mount --bind -o ro {shlex.quote(t)} {shlex.quote(t)} && "
                     for t in targets.split(os.pathsep))
    namespace = ["-m"] if os.geteuid() == 0 else ["-rm"]
    argv = ["unshare", *namespace, "sh", "-c", mounts + 'exec "$@"', "sh", *argv]
os.execvp(argv[0], argv)
"""


def run_faulted(
    fault: str, targets: list[Path], argv: list[str], limit: int = 4096
) -> subprocess.CompletedProcess[str]:
    """``argv`` in a child under ``fault``: writes past ``limit`` bytes fail (disk full),
    or the ``targets`` (directories, and the files in them) are read-only or not writable
    for the child. Modes are restored afterwards."""
    modes: dict[Path, int] = {}
    if fault == PERMISSION:
        for target in targets:
            for path in [target, *target.iterdir()]:
                modes[path] = stat.S_IMODE(path.stat().st_mode)
                path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        cmd = [sys.executable, "-c", LAUNCH, fault, str(limit), os.pathsep.join(map(str, targets))]
        return subprocess.run([*cmd, *argv], capture_output=True, text=True, timeout=240)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


def write_fails(fault: str, where: Path) -> bool:
    """Whether ``fault`` can be made here: a plain write into ``where`` fails under it."""
    (where / "d").mkdir()
    write = (f"try:\n    with open({str(where / 'd' / 'f')!r}, 'w') as f: f.write('x' * 8192)\n"
             "except OSError as e: print('failed', e.errno)")  # fmt: skip
    proc = run_faulted(fault, [where / "d"], [sys.executable, "-c", write])
    return proc.stdout.startswith("failed")


def assert_one_line(proc: subprocess.CompletedProcess[str], prog: str, path: Path) -> str:
    """Exit 2, and one line on stderr: ``<prog>: error: ...`` naming ``path``."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert str(path) in lines[0], f"{path} not named: {lines[0]}"
    return lines[0]


def assert_intact(path: Path, head: int | None, tags: dict[str, int] | None = None) -> None:
    with Store.open(path) as store:
        report = store.verify(all=True)
        assert report.ok, report.problems
        assert (store.head.id if store.head else None) == head
        if tags is not None:
            assert store.tags() == tags


# ------------------------------------------------------------------ the cases

# operation -> (its arguments, the directories it writes: those the fault hits)
OPERATIONS = {
    "gc": (["gc", "{store}", "--keep-last", "1"], ["blobs", "checkpoints"]),
    "compact": (["compact", "{store}"], ["blobs", "checkpoints"]),
    "tag": (["tag", "{store}", "prod", "v0001"], ["memory.lmdb"]),
    "rollback": (["rollback", "{store}", "v0001"], ["memory.lmdb"]),
    "export": (["export", "{store}", "--out", "{out}/model.safetensors"], ["{out}"]),
}


def three_versions(path: Path) -> None:
    """v0001 <- v0002 (HEAD) <- v0003: gc drops v0001, compact codes v0001 and v0003."""
    with Store.open(path, mode="c") as store:
        for i in range(3):
            g = torch.Generator().manual_seed(i)
            weights = {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}
            store.commit({"x": torch.randn(50_000, generator=g), "i": i}, model=weights,
                         meta={"experience": i})  # fmt: skip
        store.rollback(2)


def engram_case(where: Path, base: Path, operation: str, fault: str) -> Any:
    store, out = where / "store", where / "out"
    shutil.copytree(base, store)
    out.mkdir()
    args, writes = OPERATIONS[operation]
    fill = {"store": store, "out": out}
    argv = [ENGRAM] + [a.format(**fill) for a in args]
    targets = [Path(w.format(**fill)) if "{" in w else store / w for w in writes]
    return store, out, run_faulted(fault, targets, argv)


def train_one(path: Path) -> Path:
    """An engram-train store (naive) that has trained experience 0 of 2: HEAD v0001."""
    subprocess.run([ENGRAM_TRAIN, f"store.path={path}", *TINY, "run.max_experiences=1"],
                   check=True, capture_output=True, timeout=240)  # fmt: skip
    return path


def train_commit_case(where: Path, base: Future[Path], fault: str) -> Any:
    store = where / "store"
    shutil.copytree(base.result(), store)
    # The first commit of experience 1 (after one iteration) meets the fault. 32 KiB:
    # Hydra's config files (a few KiB) are written, the commit's pack (80 KiB) is not.
    argv = [ENGRAM_TRAIN, f"store.path={store}", *TINY, "training.commit_every_iterations=1"]
    return store, run_faulted(fault, [store / "blobs", store / "checkpoints"], argv, 32 << 10)


def train_close_case(where: Path, fault: str) -> Any:
    # The case: replay, a new store, `ulimit -f 80`.
    store = where / "store"
    argv = [ENGRAM_TRAIN, "strategy=replay", f"store.path={store}", *TINY]
    return store, run_faulted(fault, [], argv, 80 << 10)


def hydra_case(where: Path, fault: str) -> Any:
    # Hydra creates its run directory in the store, before engram-train runs at all.
    store = where / "store"
    store.mkdir()
    return store, run_faulted(fault, [store], [ENGRAM_TRAIN, f"store.path={store}", *TINY])


@dataclass
class Cases:
    possible: set[str]  # the faults this machine lets a test make
    futures: dict[tuple[str | None, ...], Future[Any]]

    def result(self, *key: str | None) -> Any:
        if key[-1] not in self.possible:
            pytest.skip(f"cannot make a {key[-1]} fault here")
        return self.futures[key].result(timeout=600)


@pytest.fixture(scope="module")
def cases(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cases]:
    """The children of the selected tests of this module, started two at a time (the
    suite's 2 cores): the trained store first, the cases that need it last."""
    possible = {f for f in FAULTS if write_fails(f, tmp_path_factory.mktemp("probe"))}
    kind = {"test_an_engram_command_reports_an_os_fault_in_one_line": "engram",
            "test_engram_train_reports_a_failed_commit_in_one_line": "commit",
            "test_engram_train_reports_a_failed_close_in_one_line": "close",
            "test_engram_train_reports_a_fault_of_hydra_in_one_line": "hydra"}  # fmt: skip
    wanted = [(kind[item.originalname], item.callspec.params.get("operation"),
               item.callspec.params["fault"])
              for item in request.session.items
              if item.module is request.module and item.originalname in kind]  # fmt: skip
    wanted = [key for key in wanted if key[-1] in possible]
    order = {"close": 0, "hydra": 1, "engram": 1, "commit": 2}
    trained: Future[Path] | None = None
    with ThreadPoolExecutor(max_workers=2) as pool:
        if any(k == "commit" for k, _, _ in wanted):
            trained = pool.submit(train_one, tmp_path_factory.mktemp("trained") / "store")
        base = tmp_path_factory.mktemp("base") / "store"
        three_versions(base)
        futures = {}
        for key in sorted(wanted, key=lambda k: order[k[0]]):
            what, operation, fault = key
            where = tmp_path_factory.mktemp("-".join(filter(None, key)).replace(" ", "_"))
            if what == "engram":
                futures[key] = pool.submit(engram_case, where, base, operation, fault)
            elif what == "commit":
                futures[key] = pool.submit(train_commit_case, where, trained, fault)
            else:
                job = train_close_case if what == "close" else hydra_case
                futures[key] = pool.submit(job, where, fault)
        yield Cases(possible, futures)
        pool.shutdown(cancel_futures=True)


# ------------------------------------------------------------------ engram


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_an_engram_command_reports_an_os_fault_in_one_line(
    cases: Cases, operation: str, fault: str
) -> None:
    store, out, proc = cases.result("engram", operation, fault)
    line = assert_one_line(proc, "engram", out if operation == "export" else store)
    assert f": {fault}" in line and line.endswith("then run the command again"), line
    assert_intact(store, head=2, tags={})
    assert list(out.iterdir()) == []  # export: no partial or temporary file


# ------------------------------------------------------------------ engram-train


@pytest.mark.parametrize("fault", FAULTS)
def test_engram_train_reports_a_failed_commit_in_one_line(cases: Cases, fault: str) -> None:
    store, proc = cases.result("commit", None, fault)
    line = assert_one_line(proc, "engram-train", store)
    assert "HEAD is still v0001" in line
    assert_intact(store, head=1)


@pytest.mark.parametrize("fault", [DISK_FULL])
def test_engram_train_reports_a_failed_close_in_one_line(cases: Cases, fault: str) -> None:
    """Replay, a new store, ``ulimit -f 80``: the commit fails, and so does writing its
    replay samples when the store closes, which used to end in a raw ``lmdb.Error``
    from ``Store.close``."""
    store, proc = cases.result("close", None, fault)
    assert_one_line(proc, "engram-train", store)
    assert not store.exists()  # it committed nothing: the store it created is not left behind


@pytest.mark.parametrize("fault", [READ_ONLY])
def test_engram_train_reports_a_fault_of_hydra_in_one_line(cases: Cases, fault: str) -> None:
    """Hydra's own job setup (its run directory, by default in the store, and its config
    files) used to end in Hydra's traceback and exit 1."""
    store, proc = cases.result("hydra", None, fault)
    line = assert_one_line(proc, "engram-train", store)
    assert ": read-only file system" in line and "run the same command again" in line
    assert list(store.iterdir()) == []


# ------------------------------------------------------------------ Store.close

CLOSE = r"""
import json, resource, signal, sys, torch
from engram.store import Store
store = Store.open(sys.argv[1], mode="c")
store.commit({"x": torch.ones(3)}, meta={"i": 0})
store.samples.append([bytes(64)] * 1000)  # pending until the next commit or close
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    store.close()
except Exception as e:
    print(json.dumps({"type": type(e).__name__, "message": str(e)}))
else:
    print(json.dumps({"type": None}))
"""


def test_store_close_reports_unsaved_samples_as_a_commit_error(tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-c", CLOSE, str(store)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["type"] == "CommitError", out
    assert str(store) in out["message"] and "1000 replay samples" in out["message"]
    assert "every committed version is intact" in out["message"]
    assert_intact(store, head=1)
    with Store.open(store, mode="w") as again:  # the lock was released; it takes a commit
        assert again.commit({"x": torch.zeros(3)}).id == 2
    # the advice follows the errno (EFBIG here, as LMDB reports it: EIO or EFBIG)
    assert "free space" in out["message"] or "check the disk" in out["message"], out


OPEN_FOR_WRITING = r"""
import errno, json, sys
from engram.store import Store
try:
    Store.open(sys.argv[1], mode="w").close()
except Exception as e:
    print(json.dumps({"type": type(e).__name__, "os": isinstance(e, OSError),
                      "errno": getattr(e, "errno", None), "message": str(e)}))
else:
    print(json.dumps({"type": None}))
"""


@pytest.mark.parametrize("fault", [READ_ONLY, PERMISSION])
def test_opening_a_store_for_writing_raises_the_os_error(tmp_path: Path, fault: str) -> None:
    """Not "not an engram store": a library caller gets the OSError it can act on."""
    if not write_fails(fault, tmp_path):
        pytest.skip(f"cannot make a {fault} fault here")
    store = tmp_path / "store"
    with Store.open(store, mode="c") as s:
        s.commit({"x": torch.ones(3)})
    proc = run_faulted(fault, [store / "memory.lmdb"],
                       [sys.executable, "-c", OPEN_FOR_WRITING, str(store)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["os"], out
    assert out["errno"] in ({30} if fault == READ_ONLY else {13, 1}), out  # EROFS; EACCES/EPERM
    assert str(store / "memory.lmdb") in out["message"], out
    assert_intact(store, head=1)
