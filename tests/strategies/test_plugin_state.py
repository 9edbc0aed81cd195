"""Each replay-based plugin's state survives a round trip through the store: a fresh
plugin on the same store restores the state the trained one committed, bit for bit,
and its memory then holds the same samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from engram.store import SampleIds, Store
from engram.strategies import registry
from engram.training.template import DurableTemplate
from trees import assert_same_tree

# (config section, its options): mem_size below the experience's size, so samples evict
CASES = {
    "er_stream": ("replay", {"mem_size": 30}),
    "er_experience_end": ("replay", {"mem_size": 30, "admission": "experience_end"}),
    "der": ("der", {"mem_size": 30}),
    "der_experience_end": ("der", {"mem_size": 30, "admission": "experience_end"}),
    "derpp": ("der", {"mem_size": 30, "beta": 0.5}),  # configs/strategy/derpp.yaml
    "agem": ("agem", {"mem_size": 30, "sample_size": 16}),
    "er_ace": ("er_ace", {"mem_size": 30}),
    "er_ace_experience_end": ("er_ace", {"mem_size": 30, "admission": "experience_end"}),
}
# The committed layout is the buffer's state dict itself: stores written before hold it.
BUFFER_STATE_KEYS = ["hparams", "seen", "seen_per_key", "slots", "slot_keys", "schema",
                     "admit_rng", "sample_rng"]  # fmt: skip


@pytest.fixture(scope="module")
def streams():
    from engram.streams.digits import split_digits

    bench = split_digits(5)
    return bench.train_stream[:1], bench.test_stream[:1]


def template(store: Path, plugin: Any) -> DurableTemplate:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    return DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                           store=store, plugins=[plugin], name="replay")  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_fresh_plugin_restores_the_trained_ones_state(tmp_path: Path, streams, case) -> None:
    section, options = CASES[case]
    train, test = streams
    trained = registry.build_plugins({section: options})[0]
    with template(tmp_path / "s", trained) as t:
        t.fit(train, test)
        state, contents = trained.state_dict(), trained.memory.buffer.contents()
    assert list(state) == BUFFER_STATE_KEYS and isinstance(state["slots"], SampleIds)
    assert 0 < len(state["slots"]) <= options["mem_size"] < state["seen"]
    if section == "der":
        assert "logits" in contents
    with Store.open(tmp_path / "s") as store:
        assert_same_tree(store.load().state["plugins"][trained.engram_name], state, "committed")

    fresh = registry.build_plugins({section: options})[0]
    with template(tmp_path / "s", fresh) as t:
        assert t.restore([*train, *test])
        assert fresh.memory.buffer is None  # the store is first seen in before_training
        assert_same_tree(fresh.state_dict(), state, "restored")
        fresh.before_training(t)
        assert_same_tree(fresh.state_dict(), state, "applied")
        assert_same_tree(fresh.memory.buffer.contents(), contents, "contents")
    assert fresh.hparams() == trained.hparams()
    split = fresh.repartition  # the template calls it on the instance (data-parallel resume)
    assert split([{}, {}], 3) == [{}, {}, {}]  # nothing trained yet
    assert split([state, state], 1)[0]["hparams"]["capacity"] == 2 * options["mem_size"]
