"""Data-parallel runs on ``torchrun`` (2 ranks, gloo, CPU): the resume guarantees of
docs/distributed.md, each against an uninterrupted run of the same world size.

Every job is a real ``torchrun --standalone`` (seconds each: two interpreters import
torch and Avalanche), so the cases share their runs through module fixtures.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engram.memory.replay import ReplayBuffer
from engram.store import Store
from helpers import scalars
from trees import assert_same_tree

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")

BIN = Path(sys.executable).parent
TORCHRUN, ENGRAM_TRAIN = str(BIN / "torchrun"), str(BIN / "engram-train")
# EWC + replay: a buffer sharded over the ranks and importances all-reduced, in one job;
# a mid-experience commit every 4 iterations (each a collective commit).
JOB = ["strategy=ewc_replay", "benchmark.n_experiences=2", "training.epochs=2",
       "training.commit_every_iterations=4", "store.keep_mid_experience=true",
       "logger=none", "run.quiet=true", "training.threads=1"]  # fmt: skip


def job(*extra: str) -> list[str]:
    """JOB with ``extra``'s options in place of its own (an option given twice is refused)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [o for o in JOB if o.split("=", 1)[0] not in keys] + list(extra)


def torchrun(store: Path, *extra: str, ranks: int = 2, check: bool = True,
             wait: bool = True) -> subprocess.CompletedProcess[str] | subprocess.Popen[str]:  # fmt: skip
    argv = [TORCHRUN, "--standalone", f"--nproc-per-node={ranks}", "-m", "engram.train",
            f"store.path={store}", *job(*extra)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def plain(store: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([ENGRAM_TRAIN, f"store.path={store}", *job(*extra)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def head(path: Path) -> tuple[dict, dict]:
    with Store.open(path) as store:
        assert store.verify(all=True).ok
        snap = store.load()
        return snap.state, snap.model


def buffers(path: Path) -> list[dict[str, torch.Tensor]]:
    """Each rank's replay shard (its samples, slot by slot), HEAD's."""
    with Store.open(path) as store:
        state = store.load().state
        out = []
        for part in [state, *state.get("ranks", [])]:
            shard = part["plugins"]["replay"]
            buffer = ReplayBuffer(store, **shard["hparams"])
            buffer.load_state_dict(shard)
            out.append(buffer.contents())
        return out


def without_slots(state: dict) -> dict:
    """A state with its buffers' sample ids left out (a killed run consumed ids it never
    committed; the samples themselves are compared by :func:`buffers`)."""
    out = {k: v for k, v in state.items() if k not in ("plugins", "ranks")}
    parts = [state, *state.get("ranks", [])]
    out["parts"] = [{k: ({**v, "slots": None} if k == "replay" else v)
                     for k, v in p["plugins"].items()} for p in parts]  # fmt: skip
    out["rng"] = [p["rng"] for p in parts]
    return out


def assert_equivalent(reference: Path, other: Path) -> None:
    (a, wa), (b, wb) = head(reference), head(other)
    assert a["metrics"]["accuracy_matrix"] == b["metrics"]["accuracy_matrix"]
    assert_same_tree(wa, wb, "model")
    assert_same_tree(without_slots(a), without_slots(b), "state")
    assert_same_tree(buffers(reference), buffers(other), "buffers")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank run."""
    path = tmp_path_factory.mktemp("dp") / "reference"
    torchrun(path, "logger=tensorboard")
    return path


def test_a_two_rank_run_holds_every_rank_in_one_version(reference: Path) -> None:
    state, _ = head(reference)
    assert len(state["ranks"]) == 1  # rank 1's part; rank 0's is the state itself
    shards = buffers(reference)
    assert [len(s["y"]) for s in shards] == [100, 100]  # mem_size 200, global
    with Store.open(reference) as store:
        execution = store.head.meta["execution"]
        assert execution["world_size"] == 2 and execution["threads"] == 1
        fisher = state["plugins"]["ewc"]["importances"]
        other = state["ranks"][0]["plugins"]["ewc"]["importances"]
        assert_same_tree(fisher, other, "ewc")  # all-reduced: the same on every rank
        assert len(state["metrics"]["accuracy_matrix"]) == 2


def test_one_torchrun_call_per_experience_equals_one_call(reference: Path, tmp_path: Path) -> None:
    path = tmp_path / "split"
    torchrun(path, "run.max_experiences=1", "logger=tensorboard")
    with Store.open(path) as store:
        assert store.head.meta["experience"] == 0
    torchrun(path, "logger=tensorboard")
    assert_equivalent(reference, path)
    # TensorBoard: written by rank 0 alone, and the same history across the resume
    whole, split = scalars(reference / "tb"), scalars(path / "tb")
    assert {"accuracy/exp0", "metrics/forgetting"} <= set(whole)
    assert whole == split
    assert [step for step, _ in whole["accuracy/exp0"]] == [0, 1]
    assert len(list((reference / "tb").glob("events.out.tfevents.*"))) == 1  # one writer


# Rank 1 in the default run; rank 0 (the store's writer) too under -m slow.
@pytest.mark.parametrize("victim", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_sigkill_of_one_rank_mid_experience_then_rerun(
    reference: Path, tmp_path: Path, victim: int
) -> None:
    """Rank ``victim`` is killed once the store holds a mid-experience version of
    experience 1; torchrun tears the job down; the same command resumes."""
    path = tmp_path / "killed"
    job = torchrun(path, wait=False)
    deadline = time.monotonic() + 240
    killed = None
    while time.monotonic() < deadline and job.poll() is None:
        versions = _versions(path)
        if any(v.meta.get("experience") == 1 and v.meta.get("kind") == "mid-experience"
               for v in versions):  # fmt: skip
            killed = _rank_pid(job.pid, victim)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    job.communicate(timeout=120)
    assert killed is not None, "the job ended before a version of experience 1"
    assert job.returncode != 0  # killed where intended: the run did not finish
    with Store.open(path) as store:
        assert store.verify(all=True).ok
        assert store.head.meta["experience"] == 1 or store.head.meta["kind"] != "experience"
        assert len(store.load().state["metrics"]["accuracy_matrix"]) < 2
    torchrun(path)
    assert_equivalent(reference, path)


@pytest.mark.slow
def test_two_nodes_through_a_c10d_rendezvous_equal_one_standalone_node(
    reference: Path, tmp_path: Path
) -> None:
    """The multi-node launch (``--nnodes=2 --rdzv-backend=c10d``): two torchrun agents,
    one rank each, meet at a rendezvous endpoint (here both on this host, sharing the
    store's path: only the rank that is 0 opens it) and train what one
    ``--standalone --nproc-per-node=2`` agent does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "nodes"
    argv = [TORCHRUN, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=engram-test", "-m", "engram.train",
            f"store.path={path}", *job("logger=tensorboard")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True) for _ in range(2)]  # fmt: skip
    try:
        outs = [agent.communicate(timeout=300) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
    for agent, (_, err) in zip(agents, outs, strict=True):
        assert agent.returncode == 0, err[-4000:]
    assert_equivalent(reference, path)
    assert scalars(path / "tb") == scalars(reference / "tb")


def test_world_size_one_under_torchrun_equals_plain_engram_train(tmp_path: Path) -> None:
    torchrun(tmp_path / "one", ranks=1)
    plain(tmp_path / "plain")
    (a, wa), (b, wb) = head(tmp_path / "one"), head(tmp_path / "plain")
    assert "ranks" not in a
    assert_same_tree(wa, wb, "model")
    assert_same_tree(a, b, "state")


def test_two_ranks_to_one_and_one_to_two_keep_every_sample(tmp_path: Path) -> None:
    two = tmp_path / "two"
    torchrun(two, "run.max_experiences=1")
    before = buffers(two)
    kept = sorted(torch.cat([s["y"] for s in before]).tolist())
    one = tmp_path / "one"
    shutil.copytree(two, one)
    proc = plain(one)  # 2 -> 1
    assert "world_size: store 2 vs now 1" in proc.stderr
    state, _ = head(one)
    assert "ranks" not in state and len(state["metrics"]["accuracy_matrix"]) == 2
    with Store.open(one) as store:  # experience 0's version, resumed: every sample kept
        v1 = store.load(1).state
        assert len(v1["ranks"]) == 1
    back = tmp_path / "back"
    plain(back, "run.max_experiences=1")
    proc = torchrun(back)  # 1 -> 2
    assert "world_size: store 1 vs now 2" in proc.stderr
    shards = buffers(back)
    assert [len(s["y"]) for s in shards] == [100, 100]
    assert kept  # the 2-rank buffer held samples of both shards
    assert len(kept) == 200


def _versions(path: Path) -> list:
    try:
        with Store.open(path) as store:
            return store.versions()
    except Exception:  # not created yet, or being created
        return []


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker with ``RANK=rank``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def test_a_locked_store_is_one_line_on_rank_0_and_every_rank_exits_non_zero(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locked"
    with Store.open(path, mode="c"):  # another job holds the store
        proc = torchrun(path, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "engram-train" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("engram-train: error: ") and "is locked by" in errors[0]
    assert "exitcode  : 1" in proc.stderr or "exitcode  : 2" in proc.stderr  # both ranks
    with Store.open(path) as store:
        assert store.versions() == []


def test_avalanche_plugins_are_refused_across_ranks_in_one_line(tmp_path: Path) -> None:
    """Each rank's Avalanche buffer would differ and no commit merges them."""
    argv = [TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "engram.train",
            f"store.path={tmp_path / 's'}", "strategy=avalanche.replay",
            *(o for o in JOB if not o.startswith("strategy="))]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert errors and all("cannot train data-parallel (2 ranks)" in e for e in errors), proc.stderr
    assert any("avalanche_replay" in e for e in errors)


KILL_IN_COMMIT = Path(__file__).with_name("kill_in_commit.py")


# rank 0 inside Store.commit by default; rank 1 after sending its part under -m slow
@pytest.mark.parametrize("point", ["rank0-checkpoint", pytest.param("rank1-sent",
                                   marks=pytest.mark.slow)])  # fmt: skip
def test_sigkill_inside_the_collective_commit_then_rerun(
    reference: Path, tmp_path: Path, point: str
) -> None:
    """The 6th collective commit (in experience 1) is cut short by a SIGKILL of one
    rank; the store verifies, and the same command resumes to the uninterrupted run."""
    path, marker = tmp_path / "killed", tmp_path / "marker"
    argv = [TORCHRUN, "--standalone", "--nproc-per-node=2", str(KILL_IN_COMMIT), point, "6",
            str(marker), f"store.path={path}", *JOB]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert marker.read_text() == f"killed: {point} 6\n", proc.stderr[-3000:]
    with Store.open(path) as store:
        assert store.verify(all=True).ok
        assert len(store.load().state["metrics"]["accuracy_matrix"]) < 2
    torchrun(path)
    assert_equivalent(reference, path)
