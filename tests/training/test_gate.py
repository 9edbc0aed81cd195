"""The regression gate, pruning that keeps the version tree a tree, and the non-finite
guard: a bad model never becomes what users of HEAD or a promoted tag get."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest
import torch
from hydra import compose, initialize_config_module

from engram import load_model
from engram.errors import CorruptionError, GateFailed, NonFiniteError, VersionNotFoundError
from engram.store import Store
from engram.store import format as fmt
from engram.store.records import seal, unseal
from engram.train import train

TINY = ["training.epochs=1", "run.quiet=true", "logger=none", "benchmark.n_experiences=5"]


def config(store: Path, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[f"store.path={store}", *TINY, *overrides])


CADENCES = {
    "per-experience": [],
    "every-3-iterations": ["training.commit_every_iterations=3"],
    "every-few-ms": ["training.commit_every_seconds=0.001"],
    "async-every-3": ["training.commit_every_iterations=3", "training.async_commit=true"],
}


@pytest.mark.parametrize("cadence", sorted(CADENCES))
def test_gate_rolls_back_to_the_last_passing_version_whatever_the_cadence(
    tmp_path: Path, cadence: str
) -> None:
    # naive forgets experience 0 at once: experience 0 passes, experience 1 fails
    gate = ["gate.min_average_accuracy=0.9", "gate.promote=prod", "run.max_experiences=2"]
    with pytest.raises(GateFailed, match="regression gate failed after experience 1"):
        train(config(tmp_path / "s", *gate, *CADENCES[cadence]))
    with Store.open(tmp_path / "s") as store:
        head, tags = store.head, store.tags()
        assert head.meta["kind"] == "experience" and head.meta["experience"] == 0
        assert head.meta["gate"] == {"passed": True, "failures": []}
        assert tags["prod"] == head.id
        (failed,) = [t for t in tags if t.startswith("gate-failed-")]
        rejected = store.info(tags[failed])
        assert rejected.meta["experience"] == 1 and rejected.meta["gate"]["passed"] is False
        assert rejected.parent is not None and store.info(rejected.parent).id == head.id
        assert not [v for v in store.versions() if v.meta["kind"] == "mid-experience"]
        assert store.verify(all=True).ok
    # The next run trains experience 1 again from the passing version, not on the failure.
    with pytest.raises(GateFailed):
        train(config(tmp_path / "s", *gate, *CADENCES[cadence]))
    with Store.open(tmp_path / "s") as store:
        assert store.head.id == head.id and store.tags()["prod"] == head.id
        failures = [store.info(t) for n, t in store.tags().items() if n.startswith("gate-failed")]
        assert len(failures) == 2 and all(v.parent == head.id for v in failures)


def test_engram_train_exits_3_when_the_gate_fails_with_mid_experience_commits(
    tmp_path: Path,
) -> None:
    store = tmp_path / "s"
    out = subprocess.run(
        [sys.executable, "-m", "engram.train", f"store.path={store}", *TINY,
         "training.commit_every_iterations=3", "gate.min_average_accuracy=0.95",
         "gate.promote=prod", "run.max_experiences=2"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert "regression gate failed after experience 1" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    with Store.open(store) as s:
        assert s.head.meta["experience"] == 0 and s.tags()["prod"] == s.head.id


def test_a_first_experience_that_fails_the_gate_resets_head(tmp_path: Path) -> None:
    # lr 1e-6 barely moves the weights: experience 0 stays near chance
    with pytest.raises(GateFailed, match="HEAD was reset"):
        train(config(tmp_path / "s", "gate.min_average_accuracy=0.9", "optimizer.lr=1e-6"))
    with Store.open(tmp_path / "s") as store:
        assert store.head is None
        (failed,) = store.tags()
        assert failed.startswith("gate-failed-") and store.verify(all=True).ok
        with pytest.raises(VersionNotFoundError, match="no HEAD"):
            store.load()


def test_pruned_mid_experience_versions_leave_a_tree(tmp_path: Path) -> None:
    """HEAD~N, diff, rollback and load_model walk through pruned versions' places."""
    store_path = tmp_path / "s"
    train(config(store_path, "training.commit_every_iterations=3", "run.max_experiences=3"))
    with Store.open(store_path) as store:
        versions = store.versions()
        assert [v.meta["kind"] for v in versions] == ["experience"] * 3
        assert [v.parent for v in versions] == [None, versions[0].id, versions[1].id]
        assert versions[1].id - versions[0].id > 1  # mid-experience versions were pruned
        assert store.info("HEAD~1").id == versions[1].id
        assert store.info("HEAD~2").id == versions[0].id
        assert store.verify(all=True).ok
    model = load_model(store_path, "HEAD~1")
    assert isinstance(model, torch.nn.Module)
    engram = [str(Path(sys.executable).with_name("engram"))]
    for args in (["show", "HEAD~1"], ["diff", "HEAD~1", "HEAD"], ["rollback", "HEAD~1"]):
        out = subprocess.run([*engram, args[0], str(store_path), *args[1:]],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, (args, out.stderr)
    with Store.open(store_path) as store:
        assert store.head.id == versions[1].id


def commit_chain(store: Store, n: int) -> list[int]:
    return [store.commit({"step": torch.tensor([i])}, message=str(i)).id for i in range(n)]


def test_gc_relinks_kept_versions_to_their_nearest_kept_ancestor(store: Store) -> None:
    v = commit_chain(store, 6)
    store.gc(drop=[v[1], v[2], v[4]])
    assert [(i.id, i.parent) for i in store.versions()] == [
        (v[0], None), (v[3], v[0]), (v[5], v[3]),
    ]  # fmt: skip
    assert store.info("HEAD~2").id == v[0]
    store.gc(keep_last=1)  # every ancestor dropped: HEAD becomes a root
    assert [(i.id, i.parent) for i in store.versions()] == [(v[5], None)]
    assert store.verify(all=True).ok


def rewrite_parent(store_path: Path, vid: int, parent: int) -> None:
    """Edit a manifest in the real LMDB file, as a damaged or hand-made store would."""
    env = lmdb.open(str(store_path / fmt.LMDB_DIR), max_dbs=8, subdir=True)
    try:
        db = env.open_db(fmt.DB_VERSIONS)
        with env.begin(write=True, db=db) as txn:
            key = vid.to_bytes(8, "big")
            manifest = json.loads(bytes(unseal(b"versions", key, txn.get(key))))
            manifest["parent"] = parent
            txn.put(key, seal(b"versions", key, json.dumps(manifest).encode()))
    finally:
        env.close()


@pytest.mark.parametrize("damage", ["self", "cycle", "dangling"])
def test_verify_reports_a_broken_parent_graph(store_path: Path, damage: str) -> None:
    with Store.open(store_path, mode="c") as store:
        v = commit_chain(store, 3)
    if damage == "self":
        rewrite_parent(store_path, v[2], v[2])
    elif damage == "cycle":
        rewrite_parent(store_path, v[0], v[2])
    else:
        rewrite_parent(store_path, v[2], 999)
    with Store.open(store_path) as store:
        report = store.verify(all=True)
        assert not report.ok
        assert {p.where for p in report.problems} == {"parent"}
        assert store.verify(v[2]).problems  # HEAD alone: its ancestry is checked too
        with pytest.raises((CorruptionError, VersionNotFoundError)):
            store.info("HEAD~100000000")  # a cycle is reported, not walked forever


def test_a_diverging_run_stops_before_a_commit_and_head_stays_finite(tmp_path: Path) -> None:
    train(config(tmp_path / "s", "run.max_experiences=1"))
    with Store.open(tmp_path / "s") as store:
        good = store.head
    with pytest.raises(NonFiniteError, match=r"experience 1, epoch 0, iteration \d+.*not finite"):
        train(config(tmp_path / "s", "optimizer.lr=1e30", "branch=true"))
    with Store.open(tmp_path / "s") as store:
        assert store.head.id == good.id
        assert [v.id for v in store.versions()] == [good.id]
        weights = store.load().model
        assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_a_diverging_run_is_a_one_line_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engram.train", f"store.path={tmp_path / 's'}", *TINY,
         "optimizer.lr=1e30"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("engram-train: error: experience 0")
    assert len(out.stderr.strip().splitlines()) == 1
    # nothing diverged was committed, so the store the run created is not left behind
    assert not (tmp_path / "s").exists()


class NaNOnce(torch.nn.Module):
    """Cross-entropy, except a NaN loss on the ``at``-th call."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.calls, self.at = 0, at

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(output, target)
        return loss * float("nan") if self.calls == self.at else loss


def test_nonfinite_skip_drops_only_the_bad_update(tmp_path: Path) -> None:
    from engram.streams.digits import split_digits
    from engram.training.template import DurableTemplate

    bench = split_digits(5)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    with DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                         store=tmp_path / "s", criterion=NaNOnce(at=3),
                         nonfinite="skip") as template:  # fmt: skip
        template.fit(bench.train_stream[:1], bench.test_stream[:1])
        assert template.skipped_updates == 1
    with Store.open(tmp_path / "s") as store:
        assert store.head.meta["skipped_updates"] == 1
        assert all(bool(torch.isfinite(w).all()) for w in store.load().model.values())
