"""``Store.commit`` with a :class:`~engram.store.Later` value: produced while the
weights are written (the data-parallel commit's receive of the other ranks' parts)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from engram.errors import EncodingError
from engram.store import Later, Store
from engram.store.codec import SampleIds


def _state(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"plugins": {"ewc": {"fisher": torch.rand(32, 32, generator=gen)}},
            "rng": {"python": (3, tuple(range(625)), None)}, "clock": {"iteration": seed}}  # fmt: skip


def _checkpoint_files(store: Store) -> list[str]:
    return sorted(p.name for p in (store.path / "checkpoints").iterdir())


def test_a_later_value_commits_what_the_value_commits(tmp_path: Path, net: torch.nn.Module) -> None:
    with Store.open(tmp_path / "a", mode="c") as a, Store.open(tmp_path / "b", mode="c") as b:
        va = a.commit(_state(1), model=net, meta={"experience": 0})
        late = {**_state(1), "plugins": Later(lambda: _state(1)["plugins"])}
        vb = b.commit(late, model=net, meta={"experience": 0})
        sa, sb = a.load(), b.load()
        assert va.nbytes == vb.nbytes and va.new_bytes == vb.new_bytes
        assert json.dumps(a.manifest()["state"]) == json.dumps(b.manifest()["state"])  # order too
        assert sa.state["rng"] == sb.state["rng"] == {"python": (3, tuple(range(625)), None)}
        assert torch.equal(
            sa.state["plugins"]["ewc"]["fisher"], sb.state["plugins"]["ewc"]["fisher"]
        )
        assert all(torch.equal(sb.model[k], v) for k, v in net.state_dict().items())
        assert b.verify().ok


def test_a_later_value_is_produced_while_the_checkpoint_is_written(
    store: Store, net: torch.nn.Module
) -> None:
    seen: list[list[str]] = []

    def produce() -> dict:
        seen.append([t.name for t in threading.enumerate()])
        return _state(2)

    store.commit({"clock": 1, "late": Later(produce)}, model=net)
    (names,) = seen
    assert any(name.startswith("engram-ckpt") for name in names), names


def test_samples_a_later_value_appends_are_published_with_the_version(
    tmp_path: Path, net: torch.nn.Module
) -> None:
    with Store.open(tmp_path / "s", mode="c") as store:

        def produce() -> dict:
            ids = store.samples.append([b"a" * 16, b"b" * 16])
            return {"slots": SampleIds.of(ids)}

        store.commit({"replay": Later(produce)}, model=net)
        assert store.samples.pending_items() == []  # in the version's transaction
    with Store.open(tmp_path / "s", mode="r") as reader:
        slots = reader.load().state["replay"]["slots"]
        assert reader.samples.read_records(slots.tolist()) == [b"a" * 16, b"b" * 16]


@pytest.mark.parametrize("fail", ["raises", "not a mapping"])
def test_a_failing_later_value_commits_nothing_and_leaves_no_file(
    store: Store, net: torch.nn.Module, fail: str
) -> None:
    first = store.commit(_state(1), model=net)
    before = _checkpoint_files(store)
    torch.nn.init.zeros_(next(net.parameters()))  # new weights: a new file would be written

    def produce() -> dict:
        if fail == "raises":
            raise RuntimeError("rank 1 went away")
        return {"a module": torch.nn.Linear(1, 1)}

    error = RuntimeError if fail == "raises" else EncodingError
    with pytest.raises(error):
        store.commit({"late": Later(produce)}, model=net)
    assert store.head.id == first.id
    assert _checkpoint_files(store) == before
    assert store.verify(all=True).ok
    assert store.commit(_state(3), model=net).id == first.id + 1


def test_a_later_value_among_non_str_keys_keeps_their_order(store: Store) -> None:
    store.commit({3: "three", "late": Later(lambda: [1, 2]), 1: torch.ones(2)})
    assert list(store.load().state) == [3, "late", 1]
    assert store.load().state["late"] == [1, 2]


def test_a_later_value_needs_a_plain_key(store: Store) -> None:
    with pytest.raises(EncodingError, match="plain str key"):
        store.commit({1: Later(dict)})
    assert store.head is None


def test_a_tensor_met_twice_is_one_record_and_loads_as_two_tensors(store: Store) -> None:
    """A data-parallel version holds every rank's all-reduced importances as rank 0's
    tensor objects: stored once, counted at each place, loaded as independent copies."""
    fisher = torch.rand(64, 64)
    state = {"plugins": {"fisher": fisher}, "ranks": Later(lambda: [{"fisher": fisher}])}
    v = store.commit(state)
    alone = store.commit({"plugins": {"fisher": fisher}, "ranks": [{"fisher": fisher.clone()}]})
    assert v.nbytes == alone.nbytes == 2 * fisher.numel() * 4
    records = store.manifest(v.id)["state"]
    assert records["plugins"]["fisher"] == records["ranks"][0]["fisher"]
    loaded = store.load(v.id).state
    a, b = loaded["plugins"]["fisher"], loaded["ranks"][0]["fisher"]
    assert torch.equal(a, fisher) and torch.equal(b, fisher)
    a.zero_()
    assert torch.equal(b, fisher)  # not one tensor
    assert store.verify(all=True).ok
