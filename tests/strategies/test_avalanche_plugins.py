"""Avalanche's own plugins passed to DurableTemplate are made durable by their adapters
(engram.strategies.avalanche_state): a run split into one template (a fresh model, a
fresh plugin) per experience on one store ends bit-identical to a run that never
stopped; those with memory and no adapter are refused when the template is built."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import SimpleMLP
from avalanche.training import plugins as P
from avalanche.training.storage_policy import (
    ClassBalancedBuffer,
    ExemplarsBuffer,
    ParametricBuffer,
    ReservoirSamplingBuffer,
)
from torch import nn

from engram.errors import EngramError, HyperparameterMismatchError
from engram.store import SampleIds, Store
from engram.strategies.avalanche_state import ADAPTERS, REFUSED, adapter_for
from engram.strategies.avalanche_state.loaders import ReplayBatchSampler
from engram.strategies.avalanche_state.samples import read_samples
from engram.training.sampler import ResumableBatchSampler
from engram.training.template import DurableTemplate
from helpers import one_thread
from trees import assert_same_tree

# Avalanche's plugins call its own deprecated functions (storage_policy.update...)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
N_EXPERIENCES = 3
# case -> the plugin, given the model (CWR* holds it); small memories, so they evict
CASES: dict[str, Callable[[nn.Module], Any]] = {
    "ewc_separate": lambda m: P.EWCPlugin(ewc_lambda=10.0),
    "ewc_online": lambda m: P.EWCPlugin(ewc_lambda=10.0, mode="online", decay_factor=0.9),
    "si": lambda m: P.SynapticIntelligencePlugin(si_lambda=1.0),
    "lwf": lambda m: P.LwFPlugin(alpha=1.0, temperature=2.0),
    "replay_experience_balanced": lambda m: P.ReplayPlugin(mem_size=40),
    "replay_class_balanced": lambda m: P.ReplayPlugin(
        mem_size=40, storage_policy=ClassBalancedBuffer(40)
    ),
    "replay_reservoir": lambda m: P.ReplayPlugin(
        mem_size=40, storage_policy=ReservoirSamplingBuffer(40)
    ),
    "replay_parametric": lambda m: P.ReplayPlugin(
        mem_size=40, batch_size_mem=16, storage_policy=ParametricBuffer(40, groupby="class")
    ),
    "gem": lambda m: P.GEMPlugin(patterns_per_experience=16, memory_strength=0.5),
    "gdumb": lambda m: P.GDumbPlugin(mem_size=40),
    "cwr_star": lambda m: P.CWRStarPlugin(m),
    "lfl": lambda m: P.LFLPlugin(lambda_e=0.1),
    "gss_greedy": lambda m: P.GSS_greedyPlugin(mem_size=64, mem_strength=2, input_size=[64]),
    "rwalk": lambda m: P.RWalkPlugin(delta_t=2),  # default 10: no score in a 9-step experience
    "agem": lambda m: P.AGEMPlugin(patterns_per_experience=16, sample_size=8),
    "mas": lambda m: P.MASPlugin(lambda_reg=0.1),
    "from_scratch": lambda m: P.FromScratchTrainingPlugin(),
}


@pytest.fixture(scope="module")
def streams():
    from engram.streams.digits import split_digits

    bench = split_digits(5)
    return bench.train_stream[:N_EXPERIENCES], bench.test_stream[:N_EXPERIENCES]


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """These tiny models train faster so, and the float reductions are the same
    whatever the machine (tests/helpers.py)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory, streams) -> Callable[[str], dict[str, Any]]:
    """The uninterrupted run of a case (computed once per case)."""
    done: dict[str, dict[str, Any]] = {}

    def get(case: str) -> dict[str, Any]:
        if case not in done:
            done[case] = run(tmp_path_factory.mktemp(case) / "s", case, streams)
        return done[case]

    return get


def build(store: Path, case: str, *, commit_every: int | None = None, extra=()):
    """A template with a fresh model and a fresh plugin of ``case`` (same seeds)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    if case == "lfl":  # LFL distils features: Avalanche's BaseModel.get_features
        model = SimpleMLP(num_classes=10, input_size=64, hidden_size=16, drop_rate=0)
    else:
        model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    plugin = CASES[case](model)
    template = DurableTemplate(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        store=store,
        plugins=[plugin, *extra],
        train_mb_size=32,
        commit_every_iterations=commit_every,
        name=case,
    )
    return template, plugin


def run(store: Path, case: str, streams, *, max_experiences=None, **kwargs) -> dict[str, Any]:
    """Fit (the rest of) the stream; the final weights, accuracies and plugin state,
    and the weights each experience's version holds."""
    train, test = streams
    template, plugin = build(store, case, **kwargs)
    with template:
        template.fit(train, test, max_experiences=max_experiences)
        versions = [v.id for v in template.store.versions() if v.meta["kind"] == "experience"]
        return {
            "model": template.model.state_dict(),  # GDumb swaps the model: the current one
            "versions": [template.store.load(v).model for v in versions],
            "accuracy": template.accuracy_matrix,
            "plugin": portable(adapter_for(plugin, template).state_dict(), template.samples),
            "cursor": template.cursor.state_dict(),
        }


def portable(tree: Any, table: Any) -> Any:
    """``tree`` with each buffer written to the sample table replaced by its samples
    (two stores give the same samples other ids)."""
    if isinstance(tree, dict):
        if isinstance(tree.get("ids"), SampleIds):
            return {**tree, "ids": read_samples(table, tree)}
        return {k: portable(v, table) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(portable(v, table) for v in tree)
    return tree


def holds_data(tree: Any) -> bool:
    """Whether some tensor or array in ``tree`` is not empty (a state worth comparing)."""
    if isinstance(tree, np.ndarray):
        return tree.size > 0
    if isinstance(tree, torch.Tensor):
        return tree.numel() > 0
    if isinstance(tree, dict):
        return any(holds_data(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return any(holds_data(v) for v in tree)
    return False


def needs_solver(case: str) -> None:
    if case == "gem":  # GEM projects with qpsolvers' quadprog, not an engram dependency
        pytest.importorskip("quadprog")


def test_every_adapter_is_tested() -> None:
    tested = {type(CASES[case](nn.Linear(1, 1))).__name__ for case in CASES}
    assert tested == set(ADAPTERS)


@pytest.mark.parametrize("case", CASES)
def test_a_template_per_experience_ends_bit_identical(
    tmp_path: Path, streams, reference, case
) -> None:
    needs_solver(case)
    expected = reference(case)
    for _ in range(N_EXPERIENCES):  # a new template, model and plugin for each experience
        split = run(tmp_path / "split", case, streams, max_experiences=1)
    assert split["cursor"] == {"experience": N_EXPERIENCES, "epoch": 0, "iteration": 0}
    assert holds_data(expected["plugin"])
    assert_same_tree(split, expected, case)
    with Store.open(tmp_path / "split") as store:
        name = ADAPTERS[type(CASES[case](nn.Linear(1, 1))).__name__].engram_name
        committed = store.load().state["plugins"][name]
        assert_same_tree(portable(committed, store.samples), expected["plugin"], "committed")


@pytest.mark.parametrize("case", CASES)
def test_a_fresh_plugin_restores_the_committed_state(tmp_path: Path, streams, case) -> None:
    """After one experience (GEM: before it ever projects a gradient)."""
    trained = run(tmp_path / "s", case, streams, max_experiences=1)
    template, plugin = build(tmp_path / "s", case)
    with template:
        assert template.restore([*streams[0], *streams[1]])
        restored = portable(adapter_for(plugin, template).state_dict(), template.samples)
    assert holds_data(trained["plugin"])
    assert_same_tree(restored, trained["plugin"], case)


class Crash(SupervisedPlugin):
    """Raise after training iteration N (a crash: the store keeps its last commit)."""

    engram_transient = ("iteration",)  # a test's hook, not memory

    def __init__(self, iteration: int) -> None:
        super().__init__()
        self.iteration = iteration

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if strategy.clock.train_iterations == self.iteration:
            raise KeyboardInterrupt  # not an Exception: nothing on the way catches it


@pytest.mark.parametrize("case", CASES)
def test_a_crash_mid_experience_then_a_new_template(
    tmp_path: Path, streams, reference, case
) -> None:
    """9 minibatches an experience: commits at iterations 4, 8, 12; the crash after 15
    is in experience 1 (memory filled by experience 0), resumed from its iteration 3.
    (GDumb trains on its 40-sample buffer: 2 minibatches an experience.)"""
    needs_solver(case)
    every, crash, resumes_at = (1, 3, 1) if case == "gdumb" else (4, 14, 3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "s", case, streams, commit_every=every, extra=[Crash(crash)])
    with Store.open(tmp_path / "s") as store:
        assert store.head.meta["kind"] == "mid-experience"
        assert (store.head.meta["experience"], store.head.meta["iteration"]) == (1, resumes_at)
    resumed = run(tmp_path / "s", case, streams, commit_every=every)
    assert resumed["cursor"] == {"experience": N_EXPERIENCES, "epoch": 0, "iteration": 0}
    assert_same_tree(resumed, reference(case), case)  # (committing more often changes nothing)


# ------------------------------------------------------------- what is refused

REFUSED_PLUGINS = {
    "BiCPlugin": lambda: P.BiCPlugin(mem_size=20),
    "GenerativeReplayPlugin": lambda: P.GenerativeReplayPlugin(),
    "MIRPlugin": lambda: P.MIRPlugin(batch_size_mem=8, mem_size=20),
    "RARPlugin": lambda: P.RARPlugin(batch_size_mem=8, mem_size=20),
    "CoPEPlugin": lambda: P.CoPEPlugin(mem_size=20),
    "FeatureDistillationPlugin": lambda: P.FeatureDistillationPlugin(),
    "EarlyStoppingPlugin": lambda: P.EarlyStoppingPlugin(patience=1, val_stream_name="test"),
}


def template_with(store: Path, *plugins: Any) -> DurableTemplate:
    model = nn.Linear(64, 10)
    return DurableTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           store=store, plugins=list(plugins))  # fmt: skip


@pytest.mark.parametrize("name", REFUSED_PLUGINS)
def test_a_plugin_with_memory_and_no_adapter_is_refused(tmp_path: Path, name: str) -> None:
    assert name in REFUSED
    with pytest.raises(EngramError) as raised:
        template_with(tmp_path / "s", REFUSED_PLUGINS[name]())
    message = str(raised.value)
    assert name in message and "\n" not in message
    assert "EWCPlugin" in message and "ReplayPlugin" in message  # what is supported
    assert not (tmp_path / "s").exists()  # refused before the store was opened


def test_plugins_without_memory_are_accepted(tmp_path: Path) -> None:
    class Logger(SupervisedPlugin):  # a user's own plugin: no state, as before
        pass

    evaluation = P.EvaluationPlugin(loggers=[])
    with template_with(tmp_path / "s", evaluation, Logger()) as template:
        assert template.named_plugins() == {}


def test_a_subclass_is_adapted_as_its_avalanche_base(tmp_path: Path) -> None:
    class MyEWC(P.EWCPlugin):
        pass

    class MyMIR(P.MIRPlugin):
        pass

    with template_with(tmp_path / "s", MyEWC(ewc_lambda=1.0)) as template:
        assert list(template.named_plugins()) == ["avalanche_ewc"]
    with pytest.raises(EngramError, match="MyMIR"):
        template_with(tmp_path / "t", MyMIR(batch_size_mem=8))


def test_a_storage_policy_of_ones_own_is_refused(tmp_path: Path) -> None:
    class Mine(ExemplarsBuffer):
        def resize(self, strategy: Any, new_size: int) -> None:
            self.max_size = new_size

    with pytest.raises(EngramError, match="storage policy Mine"):
        template_with(tmp_path / "s", P.ReplayPlugin(mem_size=10, storage_policy=Mine(10)))


def test_a_resume_with_other_plugin_settings_is_refused(tmp_path: Path, streams) -> None:
    with template_with(tmp_path / "s", P.EWCPlugin(ewc_lambda=1.0)) as template:
        template.fit(streams[0][:1], streams[1][:1])
    template = template_with(tmp_path / "s", P.EWCPlugin(ewc_lambda=2.0))
    with template, pytest.raises(HyperparameterMismatchError, match="avalanche_ewc.ewc_lambda"):
        template.fit(streams[0], streams[1])


# ------------------------------------------------------------- replay samples


def test_replay_samples_are_written_to_the_sample_table_once(tmp_path: Path, streams) -> None:
    template, plugin = build(tmp_path / "s", "replay_class_balanced")
    with template:
        template.fit(streams[0][:2], streams[1][:2])
        written = len(template.store.samples)
        template.commit("again")  # the buffers did not change: no new record
        assert len(template.store.samples) == written
        groups = adapter_for(plugin, template).state_dict()["storage_policy"]["groups"]
        x, y, task = read_samples(template.store.samples, groups[3]["buffer"])
    assert sorted(groups) == [0, 1, 2, 3]  # one group per class, 10 samples each
    assert all(isinstance(g["buffer"]["ids"], SampleIds) for g in groups.values())
    assert sum(len(g["buffer"]["ids"]) for g in groups.values()) == 40
    assert x.shape == (10, 64) and x.dtype == torch.float32
    assert set(y.tolist()) == {3} and set(task.tolist()) == {0}


def test_the_replay_sampler_resumes_mid_epoch() -> None:
    def batches(start: int) -> list[list[int]]:
        data = ResumableBatchSampler(50, 8, seed=3, experience=1)
        sampler = ReplayBatchSampler(data, [12, 5], [4, 3])
        sampler.set_epoch(2, start)
        return list(sampler)

    whole = batches(0)
    # 7 minibatches of the 50 data items (the last of 2), each with 4 of the first memory
    # part and 3 or 2 of the second (a used-up part restarts, as Avalanche's does)
    assert [len(b) for b in whole] == [8 + 4 + 3, 8 + 4 + 2] * 3 + [2 + 4 + 3]
    assert sorted(i for b in whole for i in b if i < 50) == list(range(50))
    first = [i for b in whole[:3] for i in b if 50 <= i < 62]
    assert sorted(first) == list(range(50, 62))  # a permutation of part 1 per 3 minibatches
    assert all(62 <= i < 67 for b in whole for i in b[-2:])
    assert batches(4) == whole[4:]  # resumed at minibatch 4: the same rest
    assert batches(0) == whole  # a function of (seed, experience, epoch)
