"""The LMDB-backed replay buffer: sampling laws, invariants, durability, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from engram.errors import EngramError
from engram.memory.replay import ReplayBuffer, ReplayBufferError
from engram.store import Store


def stream(n: int, n_classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-incremental stream: items carry their own index in x[:, 0] (uint8 pixels)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 4, 4), dtype=torch.uint8, generator=gen)
    y = torch.arange(n) * n_classes // n  # classes arrive one after another
    return x, y


def test_reservoir_keeps_each_item_with_probability_capacity_over_n(tmp_path: Path) -> None:
    n, capacity, runs = 60, 10, 300
    survived = np.zeros(n)
    with Store.open(tmp_path / "s", mode="c") as store:
        for run in range(runs):
            buffer = ReplayBuffer(store, capacity, "reservoir", seed=run)
            x = torch.arange(n, dtype=torch.int64).reshape(n, 1)
            for start in range(0, n, 7):  # uneven minibatches
                buffer.add(
                    x[start : start + 7],
                    torch.zeros(len(x[start : start + 7]), dtype=torch.int64),
                    experience=0,
                )
            assert len(buffer) == capacity
            survived[buffer.contents()["x"][:, 0].numpy()] += 1
    assert survived.sum() == capacity * runs
    # Uniform inclusion: each item expected capacity/n * runs = 50 times.
    p = chisquare(survived).pvalue
    assert p > 0.001, p


def test_class_balanced_shares_capacity_among_seen_classes(tmp_path: Path) -> None:
    x, y = stream(1000, n_classes=5)
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = ReplayBuffer(store, 100, "class_balanced", seed=0)
        for start in range(0, 1000, 32):
            buffer.add(x[start : start + 32], y[start : start + 32], experience=0)
            # no seen class ever has fewer than min(its share, what it offered)
            offered = np.bincount(y[: start + 32].numpy())
            counts = np.bincount(buffer.slot_keys[: len(buffer)], minlength=len(offered))
            share = 100 // len(offered)
            assert (counts >= np.minimum(share, offered)).all(), (counts, offered)
        counts = np.bincount(buffer.contents()["y"].numpy(), minlength=5)
    assert counts.tolist() == [20, 20, 20, 20, 20]


def test_experience_balanced(tmp_path: Path) -> None:
    x, y = stream(600, n_classes=3)
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = ReplayBuffer(store, 90, "experience_balanced", seed=0)
        for e in range(3):
            part = slice(200 * e, 200 * (e + 1))
            buffer.add(x[part], y[part], experience=e)
        counts = np.bincount(buffer.contents()["experience"].numpy())
    assert counts.tolist() == [30, 30, 30]


def test_samples_keep_dtype_and_logits_round_trip(tmp_path: Path) -> None:
    x, y = stream(50)
    logits = torch.randn(50, 10, dtype=torch.float16)
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = ReplayBuffer(store, 100, seed=0)
        buffer.add(x, y, experience=3, task=torch.full((50,), 2), logits=logits)
        got = buffer.contents()
    assert got["x"].dtype == torch.uint8 and torch.equal(got["x"], x)
    assert torch.equal(got["y"], y) and got["task"].eq(2).all() and got["experience"].eq(3).all()
    assert got["logits"].dtype == torch.float16 and torch.equal(got["logits"], logits)


def test_samples_with_non_finite_logits_or_inputs_are_not_admitted(tmp_path: Path) -> None:
    # the outputs of a minibatch that training.nonfinite=skip skipped
    x, y = stream(20)
    x = x.float()
    logits = torch.randn(20, 10)
    logits[3, 1], logits[7, 0], x[11, 2, 2] = float("nan"), float("inf"), float("nan")
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = ReplayBuffer(store, 100, seed=0)
        assert buffer.add(x, y, experience=0, logits=logits) == 17
        got = buffer.contents()
    assert bool(torch.isfinite(got["logits"]).all()) and bool(torch.isfinite(got["x"]).all())
    kept = [i for i in range(20) if i not in (3, 7, 11)]
    assert torch.equal(got["y"].sort().values, y[kept].sort().values)


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced", "experience_balanced"])
def test_resumed_buffer_continues_the_same_random_streams(tmp_path: Path, policy: str) -> None:
    x, y = stream(400)

    def feed(buffer: ReplayBuffer, start: int, stop: int) -> None:
        for s in range(start, stop, 25):
            buffer.add(x[s : s + 25], y[s : s + 25], experience=s // 100)

    with Store.open(tmp_path / "a", mode="c") as store:
        whole = ReplayBuffer(store, 64, policy, seed=5)
        feed(whole, 0, 400)
        whole_batch = whole.sample(32)
        whole_contents = whole.contents()
    with Store.open(tmp_path / "b", mode="c") as store:
        first = ReplayBuffer(store, 64, policy, seed=5)
        feed(first, 0, 150)
        store.commit({"replay": first.state_dict()})
    with Store.open(tmp_path / "b", mode="w") as store:  # a new "process"
        second = ReplayBuffer(store, 64, policy, seed=5)
        second.load_state_dict(store.load().state["replay"])
        feed(second, 150, 400)
        assert torch.equal(second.sample(32)["x"], whole_batch["x"])
        got = second.contents()
    for key in whole_contents:
        assert torch.equal(got[key], whole_contents[key]), key


def test_rollback_restores_the_older_buffer_and_gc_keeps_what_versions_need(tmp_path: Path) -> None:
    x, y = stream(300)
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = ReplayBuffer(store, 50, seed=0)
        buffer.add(x[:100], y[:100], experience=0)
        v1 = store.commit({"replay": buffer.state_dict()})
        old = buffer.contents()
        buffer.add(x[100:300], y[100:300], experience=1)
        store.commit({"replay": buffer.state_dict()})
        store.rollback(v1.id)
        restored = ReplayBuffer(store, 50, seed=0)
        restored.load_state_dict(store.load().state["replay"])
        assert torch.equal(restored.contents()["x"], old["x"])
        report = store.gc()  # both versions kept: nothing they reference goes
        assert store.verify(all=True).ok
        samples_before = len(store.samples)
        report = store.gc(keep_last=0)  # only HEAD (v1) stays
        assert report.samples > 0 and len(store.samples) == samples_before - report.samples
        assert torch.equal(restored.contents()["x"], old["x"])
        assert store.verify(all=True).ok
        # sample ids are never reused, even after rollback and gc
        more = ReplayBuffer(store, 50, seed=0)
        more.add(x[:5], y[:5], experience=2)
        assert more.slots[: len(more)].min() > buffer.slots[: len(buffer)].max()


def test_verify_reports_missing_samples(tmp_path: Path) -> None:
    x, y = stream(20)
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = ReplayBuffer(store, 20, seed=0)
        buffer.add(x, y, experience=0)
        store.commit({"replay": buffer.state_dict()})
        store.env.write(
            lambda txn: store.env.delete(txn, b"samples", int(buffer.slots[3]).to_bytes(8, "big"))
        )
        report = store.verify()
    assert not report.ok and "replay samples missing" in str(report.problems[0])


@pytest.mark.parametrize(
    "bad",
    [
        {"x": torch.zeros(4, 5, 4, dtype=torch.uint8)},
        {"x": torch.zeros(4, 4, 4, dtype=torch.float32)},
        {"y": torch.zeros(3, dtype=torch.int64)},
        {"logits": torch.zeros(4, 10)},
    ],
    ids=["shape", "dtype", "labels", "logits-added"],
)
def test_misfit_samples_are_refused_and_the_buffer_is_unchanged(tmp_path: Path, bad: dict) -> None:
    x, y = stream(40)
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = ReplayBuffer(store, 16, seed=0)
        buffer.add(x[:20], y[:20], experience=0)
        before = (buffer.state_dict(), len(store.samples))
        args = {"x": x[20:24], "y": y[20:24], **bad}
        with pytest.raises(ReplayBufferError, match="does not fit|shape"):
            buffer.add(args["x"], args["y"], experience=0, logits=args.get("logits"))
        after = (buffer.state_dict(), len(store.samples))
    assert before[1] == after[1]
    assert before[0]["seen"] == after[0]["seen"] and torch.equal(
        before[0]["slots"], after[0]["slots"]
    )
    assert torch.equal(before[0]["admit_rng"], after[0]["admit_rng"])


def samples_seen_by_another_process(path: Path) -> int:
    code = "import sys; from engram.store import Store; print(len(Store.open(sys.argv[1]).samples))"
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_samples_become_durable_with_the_commit_that_references_them(tmp_path: Path) -> None:
    x, y = stream(40)
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = ReplayBuffer(store, 30, seed=0)
        buffer.add(x, y, experience=0)
        assert len(buffer.sample(8)["x"]) == 8  # readable at once
        assert samples_seen_by_another_process(tmp_path / "s") == 0  # no version needs them yet
        store.commit({"replay": buffer.state_dict()})
        assert samples_seen_by_another_process(tmp_path / "s") == 30
        assert store.verify(all=True).ok


def test_a_second_handle_in_the_same_process_gets_a_clear_error(tmp_path: Path) -> None:
    with (
        Store.open(tmp_path / "s", mode="c"),
        pytest.raises(EngramError, match="already open in this process"),
    ):
        Store.open(tmp_path / "s")


@pytest.mark.parametrize("mirror_bytes", [64 << 20, 0])
def test_sampling_from_memory_equals_the_stored_records(
    tmp_path: Path, monkeypatch, mirror_bytes: int
) -> None:
    """Minibatches drawn from the in-memory copy of the records are the store's records,
    and a buffer restored from its state (nothing in memory) draws the same ones."""
    import engram.memory.replay as replay_module

    monkeypatch.setattr(replay_module, "_MIRROR_BYTES", mirror_bytes)
    gen = torch.Generator().manual_seed(4)
    with Store.open(tmp_path / "s", mode="c") as store:
        buf = ReplayBuffer(store, capacity=20, seed=3)
        for e in range(6):
            x = torch.randn(16, 2, 3, generator=gen)
            y = torch.randint(0, 5, (16,), generator=gen)
            buf.add(x, y, experience=e, logits=torch.randn(16, 5, generator=gen))
            if e == 2:
                store.commit({"replay": buf.state_dict()})
        state = buf.state_dict()
        restored = ReplayBuffer(store, capacity=20, seed=3)
        restored.load_state_dict(state)
        contents = buf.contents()
        for _ in range(3):
            a, b = buf.sample(8), restored.sample(8)
            assert a.keys() == b.keys() == contents.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), k
            rows = [int(np.flatnonzero((contents["x"] == xi).all(dim=(1, 2)))[0]) for xi in a["x"]]
            for k in a:
                assert torch.equal(a[k], contents[k][rows]), k


# ---------------------------------------------------------- without replacement


def filled(store: Store, n: int = 10, draw: str = "without_replacement") -> ReplayBuffer:
    """A buffer holding items 0..n-1 (x[:, 0] is the item)."""
    buffer = ReplayBuffer(store, n, "reservoir", seed=3, draw=draw)
    buffer.add(torch.arange(n, dtype=torch.int64).reshape(n, 1), torch.zeros(n, dtype=torch.int64),
               experience=0)  # fmt: skip
    assert len(buffer) == n
    return buffer


def test_without_replacement_draws_every_sample_once_per_pass(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = filled(store)
        picks = torch.cat([buffer.sample(3)["x"][:, 0] for _ in range(10)]).tolist()  # 3 passes
    for k in range(3):
        assert sorted(picks[10 * k : 10 * k + 10]) == list(range(10)), picks
    assert picks[:10] != picks[10:20]  # each pass in a new order


def test_with_replacement_repeats_within_a_pass(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = filled(store, draw="with_replacement")
        picks = torch.cat([buffer.sample(10)["x"][:, 0] for _ in range(5)])
    assert any(len(set(picks[k : k + 10].tolist())) < 10 for k in range(0, 50, 10))


def test_a_resumed_pass_continues_where_it_stopped(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = filled(store)
        buffer.sample(4)
        state = buffer.state_dict()
        expected = [buffer.sample(4)["x"][:, 0].tolist() for _ in range(4)]
        resumed = ReplayBuffer(store, 10, "reservoir", seed=3, draw="without_replacement")
        resumed.load_state_dict(state)
        assert [resumed.sample(4)["x"][:, 0].tolist() for _ in range(4)] == expected


def test_an_admission_starts_a_new_pass_over_the_grown_buffer(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = ReplayBuffer(store, 20, "reservoir", seed=0, draw="without_replacement")
        buffer.add(torch.arange(5).reshape(5, 1), torch.zeros(5, dtype=torch.int64), experience=0)
        buffer.sample(2)
        buffer.add(torch.arange(5, 12).reshape(7, 1), torch.zeros(7, dtype=torch.int64),
                   experience=1)  # fmt: skip
        picks = torch.cat([buffer.sample(4)["x"][:, 0] for _ in range(3)]).tolist()
    assert sorted(picks) == list(range(12))


def test_the_default_draw_is_not_recorded_so_older_states_load(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", mode="c") as store:
        state = filled(store, draw="with_replacement").state_dict()
        assert state["hparams"] == {"capacity": 10, "policy": "reservoir", "seed": 3}
        assert "order" not in state
        with pytest.raises(ReplayBufferError, match="draw"):
            filled(store, draw="without_replacement").load_state_dict(state)
        with pytest.raises(ReplayBufferError, match="draw must be one of"):
            ReplayBuffer(store, 10, draw="fifo")


def test_a_shard_dealt_anew_starts_a_new_pass(tmp_path: Path) -> None:
    from engram.memory.shards import repartition

    with Store.open(tmp_path / "s", mode="c") as store:
        buffer = filled(store)
        buffer.sample(3)
        shards = repartition([buffer.state_dict()], 2)
        assert all("order" not in s for s in shards)
        half = ReplayBuffer(store, 5, "reservoir", seed=3, draw="without_replacement")
        half.load_state_dict(shards[0])
        assert sorted(half.sample(5)["x"][:, 0].tolist()) == list(range(0, 10, 2))
