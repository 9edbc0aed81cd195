"""engram-train: every strategy config composes and runs; re-running resumes; errors are short."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from engram.errors import EngramError
from engram.store import Store
from engram.streams import digits
from engram.train import GateFailed, train
from helpers import scalars

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "engram" / "configs"
STRATEGIES = sorted(p.stem for p in (CONFIGS / "strategy").glob("*.yaml"))


def config(store: Path, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose(
            "train",
            overrides=[f"store.path={store}", "training.epochs=1", "run.quiet=true", *overrides],
        )


GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and not p.name.startswith("_"))


def group_options() -> list[tuple[str, str]]:
    return [
        (g, p.stem) for g in GROUPS if g != "hydra" for p in sorted((CONFIGS / g).glob("*.yaml"))
    ]


@pytest.mark.parametrize("group, option", group_options())
def test_every_config_composes(tmp_path: Path, group: str, option: str) -> None:
    extra = ["benchmark.path=data"] if "files" in option else []
    cfg = config(tmp_path / "s", f"{group}={option}", *extra)
    assert cfg.store.path == str(tmp_path / "s")
    if group != "experiment":
        assert cfg[group] is not None
    if group == "model":  # every model config builds a model for the default data
        from engram.models import build_model
        from engram.sklearn.estimators import build_estimator, is_sklearn
        from engram.train import model_spec

        build = build_estimator if is_sklearn(option) else build_model
        assert build(model_spec(cfg, (64,), 10, False)) is not None


def test_help_lists_every_option_of_every_group() -> None:
    out = subprocess.run([sys.executable, "-m", "engram.train", "--help"], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed: dict[str, set[str]] = {}
    group = None
    for line in text.splitlines()[2:]:
        head, sep, rest = line.partition(":")
        if sep and head.strip().isidentifier() and not line.startswith("   "):
            group, line = head.strip(), rest
        if group:
            names = {w.strip().split(" ")[0] for w in line.split(",")}
            listed.setdefault(group, set()).update(n for n in names if n)
    for group, option in group_options():
        assert option in listed.get(group, set()), (group, option, listed.get(group))
    assert "_schema" not in text


def test_every_experiment_file_starts_with_its_command() -> None:
    for path in sorted((CONFIGS / "experiment").glob("*.yaml")):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package _global_"  # Hydra reads this header line first
        first = lines[1]
        assert first.startswith(f"# engram-train experiment={path.stem}"), path


def digit_files(root: Path, experiences: range) -> None:
    """split digits as user files: experience i holds digits 2i and 2i+1."""
    x_train, y_train, x_test, y_test = digits.digits_tensors(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in experiences:
        keep, keep_test = (y_train // 2) == i, (y_test // 2) == i
        np.savez(root / f"{i:03d}.npz", x=x_train[keep].numpy(), y=y_train[keep].numpy(),
                 x_test=x_test[keep_test].numpy(), y_test=y_test[keep_test].numpy())  # fmt: skip


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
)
def test_every_experiment_runs_tiny(tmp_path: Path, experiment: str) -> None:
    digit_files(tmp_path / "data", range(2))
    cfg = config(tmp_path / "s", f"experiment={experiment}", "benchmark.n_experiences=2",
                 f"benchmark.path={tmp_path / 'data'}", f"store.path={tmp_path / 's'}",
                 "gate.max_forgetting=null", "gate.min_average_accuracy=null")  # fmt: skip
    assert len(train(cfg)) == 2


def test_every_strategy_is_configured() -> None:
    assert len(STRATEGIES) >= 11 and {"naive", "ewc", "replay", "derpp", "ewc_replay"} <= set(
        STRATEGIES
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_and_resumes(tmp_path: Path, strategy: str) -> None:
    cfg = config(tmp_path / "s", f"strategy={strategy}", "run.max_experiences=1")
    assert len(train(cfg)) == 1
    assert len(train(cfg)) == 2  # the same command again: the next experience
    with Store.open(tmp_path / "s") as store:
        head = store.head
    assert head.meta["strategy"] == strategy and head.meta["experience"] == 1


def test_task_incremental_multihead(tmp_path: Path) -> None:
    cfg = config(tmp_path / "s", "benchmark=split_digits_task", "strategy=ewc",
                 "run.max_experiences=2")  # fmt: skip
    matrix = train(cfg)
    assert matrix[1][0] > 0.5  # task-incremental with its own head: little forgetting
    with Store.open(tmp_path / "s") as store:
        assert store.head.meta["model_spec"]["args"]["multihead"] is True  # followed the data


def weights(path: Path) -> dict[str, torch.Tensor]:
    with Store.open(path) as store:
        return dict(store.load(state=False).model)


def test_one_experience_per_call_equals_one_full_run(tmp_path: Path) -> None:
    common = ["strategy=derpp", "benchmark.n_experiences=5"]
    whole = train(config(tmp_path / "whole", *common))
    for _ in range(5):
        split = train(config(tmp_path / "split", *common, "run.max_experiences=1"))
    assert split == whole
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_async_mid_experience_checkpoints_change_nothing_but_the_stall(tmp_path: Path) -> None:
    common = ["strategy=replay", "training.commit_every_iterations=5"]
    sync = train(config(tmp_path / "sync", *common, "store.keep_mid_experience=true"))
    asyn = train(config(tmp_path / "async", *common, "training.async_commit=true",
                        "store.keep_mid_experience=true"))  # fmt: skip
    assert asyn == sync
    with Store.open(tmp_path / "sync") as a, Store.open(tmp_path / "async") as b:
        assert len(a.versions()) == len(b.versions()) > 10  # every checkpoint was kept
    a, b = weights(tmp_path / "sync"), weights(tmp_path / "async")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_files_new_data_trains_only_the_new_experience(tmp_path: Path) -> None:
    data = tmp_path / "data"
    digit_files(data, range(2))
    args = [
        "benchmark=files",
        f"benchmark.path={data}",
        "benchmark.n_classes=10",
        "strategy=replay",
    ]
    assert len(train(config(tmp_path / "s", *args))) == 2
    digit_files(data, range(2, 3))  # new data arrived
    matrix = train(config(tmp_path / "s", *args))
    assert len(matrix) == 3 and [len(r) for r in matrix] == [2, 2, 3]  # the stream grew
    with Store.open(tmp_path / "s") as store:
        kinds = [v.meta["experience"] for v in store.versions() if v.meta["kind"] == "experience"]
        assert kinds == [0, 1, 2]  # experiences 0 and 1 were not trained again
        assert [i.split(":")[0] for i in store.head.meta["experience_ids"]] == [
            "000.npz", "001.npz", "002.npz"]  # fmt: skip
    assert len(train(config(tmp_path / "s", *args))) == 3  # nothing new: nothing trained


def test_files_malformed_new_file_leaves_the_store_untouched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    digit_files(data, range(2))
    args = ["benchmark=files", f"benchmark.path={data}", "benchmark.n_classes=4"]
    train(config(tmp_path / "s", *args))
    with Store.open(tmp_path / "s") as store:
        before = [(v.id, v.tags) for v in store.versions()], store.head.id
    bad = [
        {"x": np.zeros((5, 64), np.float32)},  # no labels
        {"x": np.zeros((5, 8, 8), np.float32), "y": np.zeros(5, np.int64)},  # wrong shape
        {"x": np.zeros((5, 64), np.float32), "y": np.full(5, 7)},  # label out of range
    ]
    for arrays in bad:
        np.savez(data / "002.npz", **arrays)
        with pytest.raises(EngramError, match="002.npz"):
            train(config(tmp_path / "s", *args))
        with Store.open(tmp_path / "s") as store:
            assert ([(v.id, v.tags) for v in store.versions()], store.head.id) == before
    (data / "002.npz").unlink()
    (data / "001.npz").rename(data / "009.npz")  # a trained file moved after new ones
    np.savez(data / "001.npz", x=np.ones((9, 64), np.float32), y=np.arange(9) % 4)
    with pytest.raises(EngramError, match="experience 1 was trained on '001.npz'"):
        train(config(tmp_path / "s", *args))


def test_gate_rolls_back_tags_the_failure_and_promotes_passing_versions(tmp_path: Path) -> None:
    args = ["gate.max_forgetting=0.2", "gate.promote=prod"]
    with pytest.raises(GateFailed, match="regression gate failed after experience 1: forgetting"):
        train(config(tmp_path / "s", *args))  # naive forgets experience 0 at once
    with Store.open(tmp_path / "s") as store:
        head, tags = store.head, store.tags()
        failed = [t for t in tags if t.startswith("gate-failed-")]
        assert head.meta["experience"] == 0 and tags["prod"] == head.id
        assert len(failed) == 1 and store.info(tags[failed[0]]).meta["experience"] == 1


@pytest.mark.parametrize(
    "override, error",
    [
        ("training.epoch=2", ConfigCompositionException),
        ("training.epochs=abc", ConfigCompositionException),
        ("strategy=ewcc", ConfigCompositionException),
        ("strategy.ewc_lambda=3", ConfigCompositionException),
    ],
)
def test_typos_fail_at_composition(tmp_path: Path, override: str, error: type) -> None:
    with pytest.raises((error, ConfigKeyError, ValidationError)):
        config(tmp_path / "s", override)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engram.train", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_resumes_and_reports_completion(tmp_path: Path) -> None:
    store = tmp_path / "s"
    args = [f"store.path={store}", "training.epochs=1", "benchmark.n_experiences=2"]
    first = run_cli(*args, "run.max_experiences=1")
    assert first.returncode == 0, first.stderr
    assert "experience 0: accuracy" in first.stdout
    second = run_cli(*args)
    assert "resuming" in second.stdout and "experience 1: accuracy" in second.stdout
    third = run_cli(*args)
    assert "already trained" in third.stdout
    # the resolved config and job log are kept beside the store, not in it
    assert len(list((tmp_path / "hydra" / "s").glob("*/train.log"))) == 3
    assert not (store / "hydra").exists()


def test_cli_multirun_gives_each_job_its_own_store(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engram.train", "-m", "strategy=naive,ewc", "seed=0,1",
         "training.epochs=1", "benchmark.n_experiences=2", "run.quiet=true"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    stores = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "multirun")
    # the default path also names the overrides that change what is trained
    assert stores == [f"{s}-split_digits-seed{n}-benchmark.n_experiences=2,training.epochs=1"
                      for s in ("ewc", "naive") for n in (0, 1)]  # fmt: skip
    for name in stores:
        assert hparams_in(tmp_path / "runs" / name / "tb")
        with Store.open(tmp_path / "runs" / name) as store:
            assert store.head.meta["experience"] == 1


def test_cli_killed_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    import signal
    import time

    args = ["strategy=replay", "training.epochs=2",
            "training.commit_every_iterations=5", "run.quiet=true"]  # fmt: skip
    train(config(tmp_path / "whole", *args[:-1]))
    cmd = [sys.executable, "-m", "engram.train", f"store.path={tmp_path / 'cut'}", *args]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = None  # the mid-experience HEAD the kill is aimed at
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:  # until mid experience 1
        try:
            with Store.open(tmp_path / "cut", mode="r") as store:
                head = store.head
                if head and head.meta["experience"] >= 1 and head.meta["kind"] == "mid-experience":
                    seen = dict(head.meta)
                    break
        except EngramError:
            pass
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    # the kill must land on a running child: a finished one would make the rerun a no-op
    assert child.returncode == -signal.SIGKILL, f"child was not killed (rc {child.returncode})"
    assert seen is not None, "never saw a mid-experience HEAD before the child ended"
    with Store.open(tmp_path / "whole", mode="r") as store:
        last = store.head.meta["experience"]
    with Store.open(tmp_path / "cut", mode="r") as store:  # what the rerun resumes from
        at_kill = store.head.meta
    assert at_kill["kind"] == "mid-experience" or at_kill["experience"] < last, at_kill
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_stream_setting_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngramError, match="cannot be divided by n_experiences"):
        train(config(tmp_path / "s", "benchmark.n_experiences=3"))


def test_cli_error_is_one_line(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", mode="c"):
        out = run_cli(f"store.path={tmp_path / 's'}", "training.epochs=1")
    assert out.returncode == 2
    assert (
        out.stderr.strip().startswith("engram-train: error: store")
        and "locked by pid" in out.stderr
    )
    assert "Traceback" not in out.stderr


def hparams_in(log_dir: Path) -> bool:
    """The store's TensorBoard run holds the HParams summaries itself (no sub-run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    subdirs = [p for p in log_dir.iterdir() if p.is_dir()]
    return not subdirs and "_hparams_/experiment" in events.PluginTagToContent("hparams")


def test_tensorboard_history_after_a_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    common = ["benchmark.n_experiences=5", "strategy=ewc"]
    train(config(tmp_path / "whole", *common))
    for _ in range(3):
        train(config(tmp_path / "split", *common, "run.max_experiences=2"))
    whole, split = scalars(tmp_path / "whole" / "tb"), scalars(tmp_path / "split" / "tb")
    expected = {"accuracy/exp0", "metrics/forgetting", "metrics/bwt", "metrics/fwt",
                "metrics/average_accuracy", "store/version_bytes"}  # fmt: skip
    assert expected <= set(whole)
    assert whole == split
    assert any(v != 0.0 for _, v in whole["metrics/fwt"])  # the untrained model's baseline
    assert [step for step, _ in whole["accuracy/exp0"]] == [0, 1, 2, 3, 4]
    assert hparams_in(tmp_path / "split" / "tb")
