"""Ordinary readers of a store whose LMDB pages are damaged: one line, never a traceback.

Bits of ``data.mdb`` are flipped (outside its two meta pages, so the file still opens
as LMDB) and each reader runs in its own child: ``engram ls``, ``show`` and ``du``
through the CLI, :func:`engram.load_model`, and what a resumed run reads (HEAD, with
the store opened for writing). Each must end with exit 0 (the flips
missed what it reads) or a one-line error (exit 2), never a Python traceback. A
signal death (SIGBUS/SIGSEGV: LMDB's C code followed a bad page) is allowed and
counted: no in-process reader can contain it; ``engram verify --untrusted`` does, in
a child of its own (docs/store.md, "Damaged stores").

To keep it fast the children are forked from one warm interpreter (this file run as a
script, :func:`run_readers`; test_escape.py uses it too) that has imported engram and
torch but opened no store, so no LMDB environment crosses a fork; each child has a
deadline, so a reader that hangs is reported, not waited for.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest
import torch

from engram.models import build_model
from engram.store import Store

SPEC = {"name": "mlp", "args": {"input_shape": [8], "n_classes": 3, "hidden": [16]}}
READERS = ("ls", "show", "du", "load_model", "resume")
FLIPS = (1, 10, 300)
LAYOUTS = ("plain", "compact")  # data.mdb as written (free pages too), or compacted
PAGE = 4096  # LMDB's page size here (the OS page size, as LMDB creates the file)
CHILD_TIMEOUT_S = 20.0  # one reader of a ~100 KB store takes milliseconds


def make_store(path: Path, *, compact: bool) -> None:
    """Five versions with a model spec, replay samples, a tag: every database in use.
    ``compact``: its data.mdb holds no free page (else, as LMDB left it, many)."""
    torch.manual_seed(0)
    with Store.open(path, mode="c") as store:
        for i in range(5):
            store.samples.append([bytes([i]) * 3000 for _ in range(4)])  # overflow pages
            store.commit({"w": torch.randn(300), "i": i}, model=build_model(SPEC),
                         message="m" * 500, meta={"experience": i, "model_spec": SPEC})  # fmt: skip
        store.tag("prod", 4)
    if not compact:
        return
    # LMDB's copy without free pages: every flip lands in a page some reader may read.
    lmdb_dir = path / "memory.lmdb"
    env = lmdb.open(str(lmdb_dir), readonly=True, max_dbs=8)
    try:
        (path / "compacted").mkdir()
        env.copy(str(path / "compacted"), compact=True)
    finally:
        env.close()
    os.replace(path / "compacted" / "data.mdb", lmdb_dir / "data.mdb")
    os.rmdir(path / "compacted")
    (lmdb_dir / "lock.mdb").unlink()


def flip(data: Path, n: int, seed: int) -> None:
    raw, rng = bytearray(data.read_bytes()), random.Random(seed)
    for _ in range(n):
        raw[rng.randrange(2 * PAGE, len(raw))] ^= 1 << rng.randrange(8)
    data.write_bytes(bytes(raw))


def _resume(path: str) -> None:
    """What a resumed run reads first (engram.training.checkpointer): HEAD, as the writer."""
    with Store.open(path, mode="c") as store:
        if store.head is not None:
            store.load()


def _read(argv: list[str]) -> int:
    """One reader, in a forked child: ``engram ARGV...``, or ``["load_model", STORE]``
    or ``["resume", STORE]``; its exit status (an engram error is one line on stderr,
    exit 2, as the CLI does)."""
    from engram.cli import main
    from engram.errors import EngramError
    from engram.inference import load_model

    if argv[0] not in ("load_model", "resume"):
        return main(argv)
    try:
        load_model(argv[1]) if argv[0] == "load_model" else _resume(argv[1])
    except EngramError as e:
        print(f"{argv[0]}: error: {e}", file=sys.stderr)
        return 2
    return 0


def run_forked(argv: list[str], log: Path, timeout: float = CHILD_TIMEOUT_S) -> dict:
    """:func:`_read` of ``argv`` in a forked child, output to ``log``: its exit status
    (negative: the signal that ended it; None: still running after ``timeout`` s,
    then killed), whether its output holds a traceback, and the output's tail."""
    import traceback

    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = _read(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline, exit_code = time.monotonic() + timeout, None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            exit_code = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:  # hung: killed, reported as None
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    out = log.read_text(errors="replace")
    return {"exit": exit_code, "traceback": "Traceback" in out, "output": out[-2000:]}


def _fuzz_main(work: Path, seeds: list[int], flips: list[int]) -> None:
    """The warm parent: for each layout, flip count and seed a damaged copy, each reader
    forked on it; one JSON line per run on stdout."""
    for layout, n, seed in itertools.product(LAYOUTS, flips, seeds):
        pristine = work / f"pristine-{layout}"
        store = work / f"{layout}-{n}-{seed}"
        shutil.copytree(pristine, store)
        flip(store / "memory.lmdb" / "data.mdb", n, seed)
        for reader in READERS:
            result = run_forked([reader, str(store)], work / f"{store.name}-{reader}.log")
            run = {"layout": layout, "flips": n, "seed": seed, "reader": reader}
            print(json.dumps({**run, **result}), flush=True)
        shutil.rmtree(store)


def run_readers(argvs: list[list[str]], work: Path, timeout: float = CHILD_TIMEOUT_S) -> list:
    """Each of ``argvs`` (see :func:`_read`) forked from one warm interpreter, with a
    deadline of ``timeout`` s each: :func:`run_forked`'s results, in order."""
    done = subprocess.run(
        [sys.executable, __file__, "run", str(work), json.dumps(argvs), str(timeout)],
        capture_output=True, text=True, timeout=60 + (timeout + 5) * len(argvs), cwd=work,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def fuzz(tmp_path: Path, seeds: list[int], flips: tuple[int, ...] = FLIPS) -> list[dict]:
    for layout in LAYOUTS:
        make_store(tmp_path / f"pristine-{layout}", compact=layout == "compact")
    done = subprocess.run(
        [sys.executable, __file__, "fuzz", str(tmp_path), json.dumps(seeds),
         json.dumps(list(flips))],
        capture_output=True, text=True, timeout=60 + 10 * len(seeds) * len(flips),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def check(results: list[dict], expected: int) -> dict[str, int]:
    """Assert no traceback, no hang, only exit 0/2 or a signal; the outcome counts."""
    assert len(results) == expected
    counts = {"ok": 0, "error": 0, "signal": 0}
    for r in results:
        what = f"{r['reader']}, {r['layout']} store, {r['flips']} flips, seed {r['seed']}: {r['output']}"
        assert r["exit"] is not None, f"hung: {what}"
        assert not r["traceback"], what
        tally(r, what, counts)
    return counts


def tally(r: dict, what: str, counts: dict[str, int]) -> None:
    """Count one child's outcome: a signal, or exit 0, or exit 2 with one line (naming
    the command that examines the damage when LMDB reported it); anything else fails."""
    if r["exit"] < 0:
        counts["signal"] += 1  # SIGBUS/SIGSEGV in LMDB's C code: verify --untrusted's job
        return
    assert r["exit"] in (0, 2), what
    if r["exit"] == 2:
        assert r["output"].count("\n") == 1, what
        if "LMDB reports" in r["output"]:
            assert "engram verify --untrusted" in r["output"], what
        counts["error"] += 1
    else:
        counts["ok"] += 1


def test_damaged_pages_give_one_line_errors(tmp_path: Path) -> None:
    seeds = [1, 2]  # both gave lmdb tracebacks (plain layout, 300 flips) before the fix
    counts = check(fuzz(tmp_path, seeds), len(LAYOUTS) * len(seeds) * len(FLIPS) * len(READERS))
    print(counts)


@pytest.mark.slow
def test_damaged_pages_study(tmp_path: Path) -> None:
    seeds = list(range(100, 135))  # 35 stores per flip count, as in issue 27
    counts = check(fuzz(tmp_path, seeds), len(LAYOUTS) * len(seeds) * len(FLIPS) * len(READERS))
    print(counts)


if __name__ == "__main__":
    if sys.argv[1] == "fuzz":
        _fuzz_main(Path(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]))
    else:  # "run": one JSON line per reader
        work, timeout = Path(sys.argv[2]), float(sys.argv[4])
        for i, argv in enumerate(json.loads(sys.argv[3])):
            print(json.dumps(run_forked(argv, work / f"reader-{i}.log", timeout)), flush=True)
