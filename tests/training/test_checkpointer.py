"""The Checkpointer: one app state of named Stateful parts, committed and restored as one
version — here driven by a plain PyTorch loop, no Avalanche (engram.training.checkpointer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engram.store import Store
from engram.training.app_state import UnkeptStateError
from engram.training.checkpointer import Checkpointer
from engram.training.state import RngStreams


class Steps:
    """A loop's own counter and loss history, Stateful."""

    def __init__(self) -> None:
        self.done = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done, self.losses = state["done"], list(state["losses"])


class Loop:
    """A plain training loop: model, Adam, RNG streams, its counter; dropout draws from the
    RNG so a resume is bit-identical only if the streams come back too."""

    def __init__(self, store: Store, *, background: bool = False) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.Linear(16, 3))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.01)
        self.steps = Steps()
        self.ckpt = Checkpointer(store, self.app_state, model=self.model, background=background)

    def app_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "rng": RngStreams(), "steps": self.steps}

    def train(self, n: int) -> None:
        for _ in range(n):
            x = torch.randn(4, 8)
            loss = self.model(x).logsumexp(dim=1).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.steps.done += 1
            self.steps.losses.append(float(loss.detach()))


def test_a_plain_loop_resumes_bit_identically(tmp_path: Path) -> None:
    with Store.open(tmp_path / "straight", "c") as store:
        straight = Loop(store)
        assert straight.ckpt.restore() is None  # an empty store
        straight.train(6)

    with Store.open(tmp_path / "stopped", "c") as store:
        first = Loop(store)
        first.train(3)
        version = first.ckpt.commit({"kind": "mid-experience"}, message="step 3")
        assert version is not None and store.head.id == version.id
        first.train(5)  # lost: never committed
    with Store.open(tmp_path / "stopped", "c") as store:
        again = Loop(store)
        resumed = again.ckpt.restore()
        assert resumed is not None and resumed.name == version.name
        assert again.steps.done == 3
        again.train(3)

    assert again.steps.losses == straight.steps.losses
    for a, b in zip(again.model.state_dict().values(), straight.model.state_dict().values(),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)


def test_the_state_layout_is_the_app_states_names(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", "c") as store:
        loop = Loop(store)
        loop.train(1)
        loop.ckpt.commit({})
        state = store.load().state
    assert list(state) == ["optimizer", "rng", "steps"]
    assert state["steps"] == {"done": 1, "losses": loop.steps.losses}


def test_an_entry_that_is_not_stateful_is_refused_by_name(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", "c") as store:
        with pytest.raises(UnkeptStateError, match=r"app state 'history' \(list\)"):
            Checkpointer(store, {"history": [1, 2, 3]})
        assert store.head is None


def test_a_check_that_refuses_leaves_the_app_state_as_it_was(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", "c") as store:
        loop = Loop(store)
        loop.train(2)
        loop.ckpt.commit({})
        fresh = Loop(store)

        def refuse(resumed: Any) -> None:
            raise RuntimeError(f"not {resumed.name}")

        with pytest.raises(RuntimeError, match="not v0001"):
            fresh.ckpt.restore(check=refuse)
        assert fresh.steps.done == 0


def test_background_and_synchronous_commits_are_the_same_call(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", "c") as store:
        loop = Loop(store, background=True)
        loop.train(2)
        assert loop.ckpt.commit({"kind": "mid-experience"}, background=True) is None
        loop.train(1)  # goes on while the version is written
        waited = loop.ckpt.wait()
        assert waited is not None and loop.ckpt.last_bytes == waited.new_bytes
        assert store.load(waited.id).state["steps"]["done"] == 2
        sync = loop.ckpt.commit({"kind": "experience"})
        assert sync is not None and store.head.id == sync.id
        loop.ckpt.close()


def test_a_model_and_an_artifact_are_not_both_committed(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", "c") as store, pytest.raises(ValueError, match="not both"):
        Checkpointer(store, {}, model=nn.Linear(1, 1), artifact=object())  # type: ignore[arg-type]
