"""The central guarantee: a run split across processes, or killed and re-run, ends
bit-identical to a run that never stopped (weights, accuracy matrix, strategy state)."""

from __future__ import annotations

import multiprocessing
import random
import signal
import sys
from pathlib import Path

import pytest
import torch

from engram.memory.replay import ReplayBuffer
from engram.store import Store
from trees import assert_same_tree

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import scenario  # noqa: E402

STRATEGIES = list(scenario.STRATEGIES)
# Variants of a family (another estimator, mode, admission, a composition) resume as
# their family does; in the default run each family once, every variant in -m slow.
VARIANTS = ("ewc_true_fisher", "online_ewc", "derpp_experience_end", "ewc_replay", "si_replay")
EACH = [pytest.param(s, marks=pytest.mark.slow) if s in VARIANTS else s for s in STRATEGIES]


# Fresh processes, started from a fork server that has already imported torch,
# Avalanche and engram (seconds per import): each child is a new process with no
# state of its parent's (no store, no RNG), started in milliseconds.
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["engram.training.template", "scenario"])


def child(*args: object, expect_kill: bool = False) -> None:
    proc = _CONTEXT.Process(target=scenario.main, args=([str(a) for a in args],))
    proc.start()
    proc.join(timeout=300)
    if expect_kill:
        assert proc.exitcode == -signal.SIGKILL, proc.exitcode
    else:
        assert proc.exitcode == 0, proc.exitcode


def assert_equivalent(reference: Path, other: Path) -> None:
    with Store.open(reference) as ref, Store.open(other) as oth:
        a, b = ref.load(), oth.load()
        assert oth.verify(all=True).ok
    assert a.state["cursor"] == b.state["cursor"] == {"experience": 3, "epoch": 0, "iteration": 0}
    assert a.state["metrics"]["accuracy_matrix"] == b.state["metrics"]["accuracy_matrix"]
    assert_same_tree(a.model, b.model, "model")
    plugins_a, plugins_b = dict(a.state["plugins"]), dict(b.state["plugins"])
    for key, state in a.state["plugins"].items():
        if "slots" in state:  # a replay buffer: same contents; sample ids may differ
            # (a killed run consumed ids for samples it never committed)
            assert_same_tree(
                replay_contents(reference, state), replay_contents(other, plugins_b[key]), key
            )
            for plugins in (plugins_a, plugins_b):
                plugins[key] = {k: v for k, v in plugins[key].items() if k != "slots"}
    assert_same_tree(plugins_a, plugins_b, "plugins")
    assert_same_tree(a.state["optimizer"], b.state["optimizer"], "optimizer")
    assert_same_tree(a.state["rng"], b.state["rng"], "rng")
    assert a.state["clock"] == b.state["clock"]


def replay_contents(path: Path, state: dict) -> dict[str, torch.Tensor]:
    """The buffer's samples (x, y, task, experience, logits), slot by slot."""
    with Store.open(path) as store:
        buffer = ReplayBuffer(store, **state["hparams"])
        buffer.load_state_dict(state)
        return buffer.contents()


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """One uninterrupted in-process run per strategy (computed once)."""
    root = tmp_path_factory.mktemp("reference")
    out = {}
    for name in STRATEGIES:
        out[name] = root / name
        scenario.run(name, out[name])
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_process_per_experience(references, tmp_path: Path, strategy: str) -> None:
    store = tmp_path / "store"
    for _ in range(scenario.N_EXPERIENCES):
        child(strategy, store, "--max-experiences", 1)
    assert_equivalent(references[strategy], store)
    with Store.open(store) as s:  # one version per experience, mid-experience ones pruned
        assert [v.meta["kind"] for v in s.versions()] == ["experience"] * 3


@pytest.mark.parametrize("strategy", EACH)
def test_sigkill_mid_experience_then_rerun(references, tmp_path: Path, strategy: str) -> None:
    store = tmp_path / "store"
    # 9 minibatches an epoch, 2 epochs, 3 experiences: 54 iterations in all.
    kill_at = random.Random(strategy).randint(5, 50)
    child(strategy, store, "--commit-every", 4, "--kill-at-iteration", kill_at, expect_kill=True)
    child(strategy, store, "--commit-every", 4)
    assert_equivalent(references[strategy], store)


@pytest.mark.parametrize("strategy", ["ewc", "er"])
def test_sigkill_during_a_commit_then_rerun(references, tmp_path: Path, strategy: str) -> None:
    store = tmp_path / "store"
    child(strategy, store, "--commit-every", 5, "--kill-in-commit", 3, expect_kill=True)
    with Store.open(store) as s:
        assert len(s.versions()) == 2  # the third commit never became visible
    child(strategy, store, "--commit-every", 5)
    assert_equivalent(references[strategy], store)


def test_multihead_task_incremental_resumes_with_all_heads(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    scenario.run("ewc", reference, multihead=True)
    store = tmp_path / "store"
    child(
        "ewc",
        store,
        "--multihead",
        "--commit-every",
        4,
        "--kill-at-iteration",
        23,
        expect_kill=True,
    )
    for _ in range(2):
        child("ewc", store, "--multihead", "--max-experiences", 1)
    assert_equivalent(reference, store)
    with Store.open(store) as s:
        heads = {k.split(".")[2] for k in s.load().model if k.startswith("classifier.classifiers")}
    assert heads == {"0", "1", "2"}
