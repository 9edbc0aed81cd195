"""DurableTemplate behaviour beyond equivalence: refusals, pruning, schedulers, custom plugins."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from avalanche.training.plugins import LRSchedulerPlugin
from torch import nn

from engram.errors import ArchitectureMismatchError, HyperparameterMismatchError
from engram.store import Store
from engram.strategies import EWCPlugin
from engram.training.template import DurableTemplate

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "experiments"))
import custom_strategy  # noqa: E402
import scenario  # noqa: E402


def streams(n: int = 2):
    from engram.streams.digits import split_digits

    bench = split_digits(5)
    return bench.train_stream[:n], bench.test_stream[:n]


def template(store: Path, hidden: int = 32, **kwargs) -> DurableTemplate:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    kwargs.setdefault("plugins", [EWCPlugin(ewc_lambda=1.0)])
    return DurableTemplate(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        store=store,
        name="ewc",
        **kwargs,
    )


def test_a_different_architecture_is_refused_with_the_mismatched_keys(tmp_path: Path) -> None:
    train, test = streams()
    with template(tmp_path / "s") as t:
        t.fit(train, test, max_experiences=1)
    with template(tmp_path / "s", hidden=16) as t, pytest.raises(ArchitectureMismatchError) as err:
        t.fit(train, test)
    message = str(err.value)
    assert "0.weight: model (16, 64) vs store (32, 64)" in message and "2.weight" in message


def test_different_hyperparameters_are_refused_unless_branching(tmp_path: Path) -> None:
    train, test = streams()
    with template(tmp_path / "s") as t:
        t.fit(train, test, max_experiences=1)
    with (
        template(tmp_path / "s", plugins=[EWCPlugin(ewc_lambda=2.0)]) as t,
        pytest.raises(
            HyperparameterMismatchError, match=r"plugins\.ewc\.ewc_lambda: store 1\.0 vs now 2\.0"
        ),
    ):
        t.fit(train, test)
    with template(tmp_path / "s", plugins=[EWCPlugin(ewc_lambda=2.0)], branch=True) as t:
        matrix = t.fit(train, test)
    assert len(matrix) == 2
    with Store.open(tmp_path / "s") as s:
        assert s.head.meta["hparams"]["plugins"]["ewc"]["ewc_lambda"] == 2.0


def test_mid_experience_versions_are_pruned_unless_kept(tmp_path: Path) -> None:
    train, test = streams()
    with template(tmp_path / "pruned", commit_every_iterations=3) as t:
        t.fit(train, test)
    with template(tmp_path / "kept", commit_every_iterations=3, keep_mid_experience=True) as t:
        t.fit(train, test)
    with Store.open(tmp_path / "pruned") as s:
        assert [v.meta["kind"] for v in s.versions()] == ["experience", "experience"]
        assert s.verify(all=True).ok
    with Store.open(tmp_path / "kept") as s:
        kinds = [v.meta["kind"] for v in s.versions()]
    assert kinds.count("experience") == 2 and kinds.count("mid-experience") >= 4


def test_commit_every_seconds(tmp_path: Path) -> None:
    train, test = streams(1)
    with template(tmp_path / "s", commit_every_seconds=0.0, keep_mid_experience=True) as t:
        t.fit(train, test)
        iterations = t.clock.train_iterations
    with Store.open(tmp_path / "s") as s:
        # every iteration but an epoch's last commits; then the experience's own version
        assert len(s.versions()) == iterations - 1 + 1


def test_lr_scheduler_state_is_persisted(tmp_path: Path) -> None:
    train, test = streams()

    def build(store: Path) -> DurableTemplate:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
                                  reset_scheduler=False, reset_lr=False)  # fmt: skip
        return DurableTemplate(
            model=model, optimizer=opt, store=store, plugins=[sched], train_epochs=2
        )

    with build(tmp_path / "whole") as t:
        t.fit(train, test)
        lr_whole = t.optimizer.param_groups[0]["lr"]
    for _ in range(2):
        with build(tmp_path / "split") as t:
            t.fit(train, test, max_experiences=1)
            lr_split = t.optimizer.param_groups[0]["lr"]
    assert lr_whole == lr_split == 0.1 * 0.5**4
    with Store.open(tmp_path / "split") as s:
        assert s.load().state["plugins"]["lr_scheduler"]["last_epoch"] == 4


def test_custom_strategy_example_persists_its_fields(tmp_path: Path) -> None:
    args = ["--experiences", "2", "--epochs", "1"]
    whole = custom_strategy.main(["--store", str(tmp_path / "whole"), *args])
    custom_strategy.main(["--store", str(tmp_path / "split"), "--max-experiences", "1", *args])
    split = custom_strategy.main(["--store", str(tmp_path / "split"), *args])
    assert whole == split
    with Store.open(tmp_path / "whole") as a, Store.open(tmp_path / "split") as b:
        sa, sb = a.load().state["plugins"], b.load().state["plugins"]
    assert set(sa["gradient_noise_reg"]) == {"running_sq", "anchors", "steps"}
    assert sa["gradient_noise_reg"]["steps"] == sb["gradient_noise_reg"]["steps"] > 0
    for name, value in sa["gradient_noise_reg"]["running_sq"].items():
        assert torch.equal(value, sb["gradient_noise_reg"]["running_sq"][name])


def test_plain_avalanche_train_calls_commit_each_experience(tmp_path: Path) -> None:
    train, _ = streams()
    with template(tmp_path / "s") as t:
        for experience in train:
            t.train(experience)
    with Store.open(tmp_path / "s") as s:
        assert [v.meta["experience"] for v in s.versions()] == [0, 1]
        assert s.head.meta["kind"] == "experience"
        assert set(s.load().state["plugins"]["ewc"]["importances"]) == {"0", "1"}


def test_scenario_reference_learns(tmp_path: Path) -> None:
    """Sanity: the scenario used by the equivalence tests really trains."""
    matrix = scenario.run("naive", tmp_path / "s")
    assert matrix[0][0] > 0.9 and matrix[1][1] > 0.9 and matrix[2][2] > 0.5
    assert matrix[2][0] < 0.1  # and naive fine-tuning forgets, as it should


def test_lwf_teacher_is_stored_once_across_versions(tmp_path: Path) -> None:
    from engram.strategies import LwFPlugin

    train, test = streams(3)
    with template(tmp_path / "s", plugins=[LwFPlugin()], commit_every_iterations=2,
                  keep_mid_experience=True) as t:  # fmt: skip
        t.fit(train, test)
    with Store.open(tmp_path / "s") as s:
        versions = [
            v
            for v in s.versions()
            if v.meta["experience"] == 2 and v.meta["kind"] == "mid-experience"
        ]
        assert len(versions) >= 3

        def teacher_digests(v):
            teacher = s.manifest(v.id)["state"]["plugins"]["lwf"]["teacher"]
            return [c[0] for rec in teacher.values() for c in rec["__tensor__"]["chunks"]]

        first = teacher_digests(versions[0])
        assert first and all(teacher_digests(v) == first for v in versions[1:])
        # the digests name the stored blobs: equal digests, one copy; and the mid versions
        # after the first write nothing for the teacher (all write the same amount)
        assert len({v.new_bytes for v in versions}) == 1


@pytest.mark.parametrize(
    "admission, replays_current", [("stream", True), ("experience_end", False)]
)
def test_replay_admission_decides_whether_the_current_experience_is_replayed(
    tmp_path: Path, admission: str, replays_current: bool
) -> None:
    from engram.strategies import ERPlugin

    train, test = streams(2)
    plugin = ERPlugin(mem_size=60, policy="experience_balanced", admission=admission)
    with template(tmp_path / "s", plugins=[plugin], commit_every_iterations=5,
                  keep_mid_experience=True) as t:  # fmt: skip
        t.fit(train, test)
    with Store.open(tmp_path / "s") as store:
        for v in store.versions():
            replay = store.load(v.id).state["plugins"]["replay"]
            kept = set(replay["slot_keys"].tolist())  # experience of each buffered sample
            current = v.meta["experience"]
            if v.meta["kind"] == "mid-experience":
                assert (current in kept) == replays_current, (v.name, kept)
                assert kept <= set(range(current + 1))
            else:  # after the experience: it is in the buffer either way
                assert current in kept and len(replay["slot_keys"]) == 60
