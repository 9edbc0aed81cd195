"""A user's mistakes on the ``engram-train`` command line: one line, exit 2, nothing left
behind; and a sweep runs every job even when some fail, then says which did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from engram.errors import ConfigError
from engram.run.validation import validate
from engram.store import Store
from engram.train import train  # (importing it registers the config schemas)

TINY = ["training.epochs=1", "run.quiet=true", "logger=none", "benchmark.n_experiences=2"]


def engram_train(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engram.train", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)  # fmt: skip


@pytest.mark.parametrize("overrides, says", [
    (["training.epochs=abc"], "Error merging override training.epochs=abc: Value 'abc' of "
                              "type 'str' could not be converted to Integer"),
    (["seed=1", "seed=2"], "seed is given twice (seed=1, seed=2): give it once"),
    (["strategy=ewcc"], "Could not find 'strategy/ewcc'; options: agem, avalanche.agem,"),
])  # fmt: skip
def test_a_mistake_is_one_line_exit_2_and_creates_nothing(
    tmp_path: Path, overrides: list[str], says: str
) -> None:
    store = tmp_path / "s"
    out = engram_train(f"store.path={store}", *overrides)  # refused before any training
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("engram-train: error: "), out.stderr
    assert says in lines[0] and "Hydra's run directory" not in lines[0]
    assert "_schema" not in lines[0]  # engram's structured schemas are not options
    assert not store.exists()


@pytest.mark.parametrize("override, says", [
    ("seed=1.0", "Error merging override seed=1.0: Value '1.0' of type 'float' could not be "
                 "converted to Integer"),
    ("benchmark=nope", "Could not find 'benchmark/nope'; options: files, permuted_digits,"),
])  # fmt: skip
def test_what_hydra_refuses_composing_is_said_in_one_line(override: str, says: str) -> None:
    from hydra.errors import HydraException

    from engram.run.entry import _composition_error

    with pytest.raises(HydraException) as error:
        config(Path("unused"), override)
    line = _composition_error(error.value)
    assert line is not None and line.startswith(says) and "\n" not in line


def test_an_over_long_path_component_is_one_line(tmp_path: Path) -> None:
    out = engram_train(f"store.path={tmp_path / ('a' * 300)}", *TINY)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "has a name longer than 255 bytes" in line


def config(store: Path, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[f"store.path={store}", *TINY, *overrides])


@pytest.mark.parametrize("override, says", [
    ("benchmark.n_classes=10000000000", "benchmark.n_classes must be an integer in [1, 100000]"),
    ("training.epochs=100000000000", "training.epochs must be an integer in [1, 1000000]"),
])  # fmt: skip
def test_absurd_sizes_are_refused_at_composition(tmp_path: Path, override: str, says: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate(config(tmp_path / "s", override))
    assert says in str(error.value)


@pytest.mark.parametrize("overrides", [
    ["benchmark=files", "benchmark.path=DATA"],  # no .npz files: a data check fails
    ["+model.args.no_such_argument=1"],  # the model builder refuses it
])  # fmt: skip
def test_a_run_that_fails_before_its_first_commit_leaves_nothing_behind(
    tmp_path: Path, overrides: list[str]
) -> None:
    (tmp_path / "data").mkdir()
    overrides = [o.replace("DATA", str(tmp_path / "data")) for o in overrides]
    store = tmp_path / "s"
    out = engram_train(f"store.path={store}", *TINY, *overrides)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not store.exists(), sorted(p.name for p in store.iterdir())


def test_a_failed_run_keeps_a_store_that_has_a_version(tmp_path: Path) -> None:
    import torch

    from engram.run.entry import discard_if_empty

    with Store.open(tmp_path / "s", mode="c") as store:
        store.commit({"x": torch.ones(2)})
    (tmp_path / "s" / "hydra").mkdir()
    discard_if_empty(tmp_path / "s")
    with Store.open(tmp_path / "s") as store:
        assert store.head.id == 1
    Store.open(tmp_path / "empty", mode="c").close()
    discard_if_empty(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_a_sweep_runs_every_job_and_reports_the_failed_ones(tmp_path: Path) -> None:
    # naive forgets at once: with this gate both jobs fail, each exit 3
    out = engram_train("-m", "seed=0,1", "gate.min_average_accuracy=0.9", *TINY, cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    stores = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "multirun")
    assert len(stores) == 2, stores
    for store in stores:  # both jobs ran, and were refused by the gate
        with Store.open(store) as s:
            assert any(t.startswith("gate-failed-") for t in s.tags())
    failed = [line for line in out.stderr.splitlines() if "regression gate failed" in line]
    assert len(failed) == 2
    assert out.stderr.strip().splitlines()[-1].startswith("engram-train: 2 job(s) of the sweep "
                                                          "failed: ")  # fmt: skip


def test_a_sweep_job_whose_config_is_invalid_fails_alone(tmp_path: Path) -> None:
    # job 0's value does not compose (Hydra refused the whole sweep before any job ran),
    # job 1's fails validation; job 2 trains
    tiny = [o for o in TINY if not o.startswith("training.epochs=")]
    out = engram_train("-m", "training.epochs=abc,0,1", *tiny, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    stores = [p for p in (tmp_path / "runs").iterdir() if p.name != "multirun"]
    (trained,) = stores
    assert trained.name.endswith("training.epochs=1")
    with Store.open(trained) as store:
        assert store.versions()
    lines = [line for line in out.stderr.splitlines() if "[HYDRA]" not in line]
    assert "Traceback" not in out.stderr and "Error executing job" not in out.stderr, out.stderr
    assert lines[0] == ("engram-train: job #0 (training.epochs=abc): error: Error merging "
                        "override training.epochs=abc: Value 'abc' of type 'str' could not be "
                        "converted to Integer")  # fmt: skip
    assert lines[1].startswith("engram-train: job #1 (runs/") and lines[1].endswith(
        "training.epochs=0): error: training.epochs must be an integer in [1, 1000000], not 0"
    )
    assert lines[2].startswith("engram-train: 2 job(s) of the sweep failed: job #0 "
                               "(training.epochs=abc) (exit 2), runs/")  # fmt: skip
    assert len(lines) == 3, out.stderr


def test_a_sweep_over_data_directories_gives_each_its_own_store(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for i in range(2):
            (tmp_path / name).mkdir(exist_ok=True)
            y = np.arange(40) % 2 + 2 * i
            np.savez(tmp_path / name / f"{i:03d}.npz", x=rng.normal(size=(40, 8)) + y[:, None], y=y)
    out = engram_train("-m", "benchmark=files", f"benchmark.path={tmp_path / 'a'},{tmp_path / 'b'}",
                       "training.epochs=1", "run.quiet=true", "logger=none", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    stores = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "multirun")
    assert len(stores) == 2 and all("benchmark.path=" in s and "/" not in s for s in stores)


def test_a_bad_scikit_learn_parameter_names_model_args(tmp_path: Path) -> None:
    from engram.errors import EngramError

    with pytest.raises(EngramError, match=r"^model.args: The 'alpha' parameter of SGDClassifier"):
        train(config(tmp_path / "s", "model=sgd_classifier", "+model.args.alpha=-1"))
