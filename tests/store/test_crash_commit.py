"""SIGKILL during commits: at a random moment of a commit loop (and of a 64 MiB commit),
and, deterministically, right after each step of the commit protocol and of the
store's creation (``crash_at``, tests/store/children.py): the lock is reclaimed,
``verify`` is clean, HEAD is exactly what was committed, the store takes new commits
and ``gc`` leaves no orphan file. Also with replay samples pending in the commit.

The large crash studies run with ``pytest -m slow``.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from children import LINUX_ONLY, assert_no_leftovers, assert_same, make_state, make_weights

from engram.store import SampleIds, Store

pytestmark = LINUX_ONLY


def check_recovered(path: Path, printed: list[tuple[int, int]]) -> int | None:
    """A store whose writer was SIGKILLed: lock reclaimable, consistent, HEAD exact, usable.

    ``printed``: the (version id, step) pairs the child reported as committed.
    Returns the id HEAD had after the crash.
    """
    with Store.open(path, mode="w") as store:  # the dead writer's lock is reclaimed
        report = store.verify(all=True)
        assert report.ok, [str(p) for p in report.problems]
        head = store.head
        versions = store.versions()
        if printed:
            last_id, last_i = printed[-1]
            assert last_id == last_i + 1
            assert head is not None
            # the commit the kill interrupted may have published before the child printed
            assert last_id <= head.id <= last_id + 1, (head.id, last_id)
        # no half-published version: exactly the steps 0..HEAD, in order, and HEAD is last
        assert [v.id for v in versions] == list(range(1, (head.id if head else 0) + 1))
        assert [v.meta for v in versions] == [{"i": v.id - 1} for v in versions]
        by_id = {v.id: v for v in versions}
        for vid, i in printed:  # every version a child reported is there, as reported
            assert by_id[vid].meta == {"i": i}
        if head is not None:
            i = head.meta["i"]
            snap = store.load(verify=True)
            assert snap.version.id == head.id
            assert_same(snap.state, make_state(i))
            assert_same(snap.model, make_weights(i), "model")
            if head.id > 1:  # and the one before, which shares pack files and maybe weights
                prev = store.load(head.id - 1, verify=True)
                assert_same(prev.state, make_state(i - 1))
                assert_same(prev.model, make_weights(i - 1), "model")
        # the store takes new commits: the next id follows HEAD, nothing is reused wrongly
        after = store.commit(make_state(1000), model=make_weights(1000), meta={"i": "after"})
        assert after.id == (head.id if head else 0) + 1
        assert after.parent == (head.id if head else None)
        store.gc()
        report = store.verify(all=True)
        assert report.ok, [str(p) for p in report.problems]
        snap = store.load(verify=True)
        assert snap.version.id == after.id
        assert_same(snap.state, make_state(1000))
        assert_same(snap.model, make_weights(1000), "model")
    assert_no_leftovers(path)
    return head.id if head is not None else None


COMMIT_LOOP = """
path = sys.argv[1]
with Store.open(path, mode="c") as store:
    print("start", flush=True)
    for i in range(100_000):
        info = store.commit(make_state(i), model=linear(i), message=f"step {i}", meta={"i": i})
        print("committed", info.id, i, flush=True)
"""


def parse_committed(lines: list[str]) -> list[tuple[int, int]]:
    """(version id, step) of each complete "committed ID STEP" line.

    The kill can land while the child prints, so the last line may be cut short.
    """
    printed = []
    for line in lines:
        words = line.split()
        if len(words) == 3 and words[0] == "committed" and all(w.isdigit() for w in words[1:]):
            printed.append((int(words[1]), int(words[2])))
    return printed


def run_kill_trial(spawn, path: Path, seed: int) -> None:
    rng = random.Random(seed)
    child = spawn(COMMIT_LOOP, path)
    child.expect("start")
    time.sleep(rng.uniform(0.0, 1.2))
    child.sigkill()
    printed = parse_committed(child.finish())
    check_recovered(path, printed)


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_during_commit_loop(spawn, tmp_path: Path, seed: int) -> None:
    run_kill_trial(spawn, tmp_path / "store", seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 140))
def test_sigkill_during_commit_loop_study(spawn, tmp_path: Path, seed: int) -> None:
    run_kill_trial(spawn, tmp_path / "store", seed)


# trial 7 by default; the rest of the study with -m slow
@pytest.mark.parametrize(
    "seed", [7, *(pytest.param(seed, marks=pytest.mark.slow) for seed in range(8, 16))]
)
def test_sigkill_resumed_twice_on_one_store(spawn, tmp_path: Path, seed: int) -> None:
    """Kill, reopen and keep committing in a new process, kill again: still consistent."""
    path = tmp_path / "store"
    resume = """
    path = sys.argv[1]
    with Store.open(path, mode="w") as store:
        i = store.head.meta["i"] + 1 if store.head is not None else 0
        print("start", flush=True)
        for i in range(i, i + 100_000):
            info = store.commit(make_state(i), model=linear(i), meta={"i": i})
            print("committed", info.id, i, flush=True)
    """
    rng = random.Random(seed)
    printed: list[tuple[int, int]] = []
    for n in range(2):
        child = spawn(COMMIT_LOOP if n == 0 else resume, path)
        child.expect("start")
        child.expect("committed")  # each writer has written when it is killed
        time.sleep(rng.uniform(0.3, 1.0))
        child.sigkill()
        mine = parse_committed(child.finish())
        assert mine, "the writer was killed before it committed"
        printed += mine
        ids = [vid for vid, _ in printed]
        assert ids == sorted(set(ids))  # the second writer continued, never reused an id
    check_recovered(path, printed)


CRASH_POINT = """
path, point = sys.argv[1], sys.argv[2]
with Store.open(path, mode="c") as store:
    for i in range(2):
        info = store.commit(make_state(i), model=linear(i), meta={"i": i})
        print("committed", info.id, i, flush=True)
    crash_at(point)
    store.commit(make_state(2), model=linear(2), meta={"i": 2})  # new blobs, new weights
    sys.setprofile(None)
    print("survived", flush=True)
"""


@pytest.mark.parametrize(
    ("point", "leftover", "head"),
    [
        ("finish", "blobs/pack-00000003.bin", 2),  # the new pack is written and fsynced
        ("write_safetensors", "checkpoints/.model-v0003.safetensors.tmp-", 2),  # not yet fsynced
        ("write_checkpoint", "checkpoints/model-v0003.safetensors", 2),  # renamed, durable
        ("publish", "checkpoints/model-v0003.safetensors", 2),  # inside the LMDB txn
        ("write", "checkpoints/model-v0003.safetensors", 3),  # the txn committed (Env.write)
    ],
    ids=["pack-written", "checkpoint-tmp", "checkpoint-renamed", "in-lmdb-txn", "published"],
)
def test_sigkill_at_each_commit_step(spawn, tmp_path: Path, point, leftover, head) -> None:
    """A deterministic SIGKILL right after each step of the commit protocol."""
    path = tmp_path / "store"
    child = spawn(CRASH_POINT, path, point)
    lines = child.finish()
    assert child.proc.returncode == -signal.SIGKILL, (lines, child.stderr())
    printed = parse_committed(lines)
    assert printed == [(1, 0), (2, 1)]
    folder, name = leftover.split("/")
    assert any(f.startswith(name) for f in os.listdir(path / folder)), os.listdir(path / folder)
    assert check_recovered(path, printed) == head


CREATE_CRASH = """
path, point = sys.argv[1], sys.argv[2]
if point == "_init_meta":
    crash_at(point)
else:  # right after the mkdir of that directory
    crash_at("mkdir", lambda frame: os.path.basename(str(frame.f_locals["self"])) == point)
Store.open(path, mode="c")
sys.setprofile(None)
print("survived", flush=True)
"""


@pytest.mark.parametrize(
    "point",
    [
        "memory.lmdb",
        "checkpoints",
        "blobs",
        "_init_meta",
    ],
)
def test_sigkill_while_creating_the_store(spawn, tmp_path: Path, point: str) -> None:
    """A writer killed while ``Store.open(mode="c")`` creates the store: creating it again
    (or opening it for writing) gives a store that takes commits."""
    path = tmp_path / "store"
    child = spawn(CREATE_CRASH, path, point)
    lines = child.finish()
    assert child.proc.returncode == -signal.SIGKILL, (lines, child.stderr())
    with Store.open(path, mode="c") as store:
        assert store.head is None
        info = store.commit(make_state(0), model=make_weights(0), meta={"i": 0})
        assert info.id == 1
        assert store.verify(all=True).ok
        assert_same(store.load(verify=True).state, make_state(0))
    assert_no_leftovers(path)


BIG_COMMIT = """
path = sys.argv[1]
with Store.open(path, mode="c") as store:
    store.commit(make_state(0), model=linear(0), meta={"i": 0})
    n = 8 << 20  # int64: 64 MiB, four full chunks, all distinct
    big = (torch.arange(n, dtype=torch.int64) * 2654435761) % 2147483647
    print("start", flush=True)
    info = store.commit({"big": big}, model=linear(1), meta={"i": "big"})
    print("committed", info.id, flush=True)
"""


def run_big_kill_trial(spawn, path: Path, seed: int) -> None:
    rng = random.Random(seed)
    child = spawn(BIG_COMMIT, path)
    child.expect("start")
    time.sleep(rng.uniform(0.005, 0.3))
    child.sigkill()
    done = any(line.startswith("committed") for line in child.finish())
    with Store.open(path, mode="w") as store:
        report = store.verify(all=True)
        assert report.ok, [str(p) for p in report.problems]
        head = store.head
        assert head is not None
        assert head.id in ((2,) if done else (1, 2))
        snap = store.load(verify=True)
        if head.id == 1:
            assert_same(snap.state, make_state(0))
            assert_same(snap.model, make_weights(0), "model")
        else:
            n = 8 << 20
            expected = (torch.arange(n, dtype=torch.int64) * 2654435761) % 2147483647
            assert_same(snap.state, {"big": expected})
            assert_same(snap.model, make_weights(1), "model")
        after = store.commit(make_state(3), model=make_weights(3), meta={"i": 3})
        assert after.id == head.id + 1
        store.gc()
        assert store.verify(all=True).ok
        assert_same(store.load(verify=True).state, make_state(3))
    assert_no_leftovers(path)


def test_sigkill_during_large_commit(spawn, tmp_path: Path) -> None:
    run_big_kill_trial(spawn, tmp_path / "store", seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 11))
def test_sigkill_during_large_commit_study(spawn, tmp_path: Path, seed: int) -> None:
    run_big_kill_trial(spawn, tmp_path / "store", seed)


CRASH_WITH_SAMPLES = """
from engram.store import SampleIds
path, point = sys.argv[1], sys.argv[2]
with Store.open(path, mode="c") as store:
    ids = []
    for i in range(3):
        if i == 2:
            crash_at(point)
        # pending (write-behind) samples: the commit that references them makes them durable
        ids += store.samples.append([bytes([i]) * 40 for _ in range(5)])
        info = store.commit({"slots": SampleIds.of(ids)}, meta={"i": i})
        print("committed", info.id, i, flush=True)
    sys.setprofile(None)
    print("survived", flush=True)
"""


@pytest.mark.parametrize(("point", "head"), [("publish", 2), ("write", 3)])
def test_sigkill_with_pending_replay_samples(spawn, tmp_path: Path, point, head) -> None:
    """Replay samples are written in the transaction that publishes the version that
    references them: killed inside it, neither is there; after it, both are."""
    path = tmp_path / "store"
    child = spawn(CRASH_WITH_SAMPLES, path, point)
    lines = child.finish()
    assert child.proc.returncode == -signal.SIGKILL, (lines, child.stderr())
    assert parse_committed(lines) == [(1, 0), (2, 1)]
    with Store.open(path, mode="w") as store:
        report = store.verify(all=True)  # every referenced sample is there
        assert report.ok, [str(p) for p in report.problems]
        assert store.head.id == head
        slots = store.load().state["slots"].tolist()
        assert len(slots) == 5 * head
        assert len(store.samples) == 5 * head  # the killed commit's samples: not written
        rows = store.samples.read(slots, 40)
        assert [int(r[0]) for r in rows] == [i for i in range(head) for _ in range(5)]
        store.samples.append([bytes(40)])
        store.commit({"slots": SampleIds.of(slots)}, meta={"i": head})  # still takes commits
