"""engram-train refuses a bad option at start-up: one line naming the key, no store made.

Also: each job of a sweep gets its own store by default, and a re-run resumes each.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from engram.run import validation
from engram.run.config import TrainConfig
from engram.run.validation import ConfigError, check_overrides, validate
from engram.store import Store
from engram.train import build_optimizer, train

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "engram" / "configs"


def config(tmp_path: Path, *overrides: str, store: bool = True):
    extra = [f"store.path={tmp_path / 's'}"] if store else []
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[*extra, "training.epochs=1", "run.quiet=true",
                                           "logger=none", *overrides])  # fmt: skip


# (overrides, the start of the message); the first group is the reproduced list
BAD = [
    (["training.batch_size=0"], "training.batch_size must be an integer >= 1, not 0"),
    (["optimizer.lr=-0.1"], "optimizer.lr must be a number > 0, not -0.1"),
    (["optimizer.momentum=-0.5"], "optimizer.momentum must be a number in [0, 1), not -0.5"),
    (["strategy=ewc", "strategy.ewc.mode=bogus"],
     "strategy.ewc.mode must be one of separate, online, not 'bogus'"),
    (["strategy=agem", "strategy.agem.sample_size=0"],
     "strategy.agem.sample_size must be an integer >= 1, not 0"),
    (["model.hidden=[-1]"], "model.hidden must be a list of integers >= 1, not [-1]"),
    (["training.epochs=0"], "training.epochs must be an integer in [1, 1000000], not 0"),
    (["training.epochs=-1"], "training.epochs must be an integer in [1, 1000000], not -1"),
    (["+training.epoch=7"],
     "training.epoch is not an option, so nothing would read it; did you mean training.epochs?"),
    (["gate.promote=v0003"], "gate.promote must be a tag name"),
    (["gate.promote=HEAD"], "gate.promote must be a tag name"),
    # every other group's ranges and choices
    (["optimizer.momentum=1"], "optimizer.momentum must be a number in [0, 1), not 1.0"),
    (["optimizer.lr=nan"], "optimizer.lr must be a number > 0, not nan"),
    (["optimizer.weight_decay=-1"], "optimizer.weight_decay must be a number >= 0"),
    (["optimizer=adam", "optimizer.momentum=0.9"], "optimizer.momentum must be 0 with optimizer=adam"),
    (["training.eval_batch_size=0"], "training.eval_batch_size must be an integer >= 1"),
    (["training.commit_every_iterations=0"],
     "training.commit_every_iterations must be an integer >= 1 or null, not 0"),
    (["training.commit_every_seconds=0"], "training.commit_every_seconds must be a number > 0"),
    (["training.threads=0"], "training.threads must be an integer >= 1 or null, not 0"),
    (["benchmark.n_experiences=0"], "benchmark.n_experiences must be an integer >= 1"),
    (["benchmark.test_fraction=1"], "benchmark.test_fraction must be a number in (0, 1)"),
    (["benchmark.n_classes=0"], "benchmark.n_classes must be an integer in [1, 100000] or null"),
    (["benchmark=files"], "benchmark=files needs benchmark.path="),
    (["seed=-1"], "seed must be an integer in [0, 4294967295], not -1"),
    (["model.channels=[8,0]"], "model.channels must be a list of integers >= 1"),
    (["model.name=mpl"], "model.name must be one of "),
    (["strategy=ewc", "strategy.ewc.ewc_lambda=-1"], "strategy.ewc.ewc_lambda must be a number >= 0"),
    (["strategy=ewc", "strategy.ewc.estimator=exact"],
     "strategy.ewc.estimator must be one of empirical, true"),
    (["strategy=ewc", "strategy.ewc.fisher_mb_size=0"], "strategy.ewc.fisher_mb_size must be an"),
    (["strategy=online_ewc", "strategy.ewc.decay_factor=null"],
     "strategy.ewc.decay_factor must be set with strategy.ewc.mode=online"),
    (["strategy=ewc", "strategy.ewc.decay_factor=0.9"],
     "strategy.ewc.decay_factor is used only with strategy.ewc.mode=online"),
    (["strategy=ewc", "strategy.ewc=null"], "strategy.ewc is null, so strategy ewc would train"),
    (["strategy=si", "strategy.si.eps=0"], "strategy.si.eps must be a number >= 1.2e-38"),
    (["strategy=mas", "strategy.mas.alpha=2"], "strategy.mas.alpha must be a number in [0, 1]"),
    (["strategy=lwf", "strategy.lwf.temperature=0"], "strategy.lwf.temperature must be a number >= 1.2e-38"),
    (["strategy=replay", "strategy.replay.mem_size=0"], "strategy.replay.mem_size must be an"),
    (["strategy=replay", "strategy.replay.policy=fifo"],
     "strategy.replay.policy must be one of reservoir, class_balanced, experience_balanced"),
    (["strategy=der", "strategy.der.admission=never"],
     "strategy.der.admission must be one of stream, experience_end, not 'never'"),
    (["strategy=der", "strategy.der.beta=-1"], "strategy.der.beta must be a number >= 0"),
    (["strategy=ewc", "+strategy.ewc.lamda=1"],
     "strategy.ewc.lamda is not an option, so nothing would read it; did you mean "
     "strategy.ewc.ewc_lambda?"),
    (["+training.lr=1"], "training.lr is not an option, so nothing would read it; did you mean "
                         "optimizer.lr?"),
    (["store.lock_timeout=-1"], "store.lock_timeout must be a number >= 0"),
    (["gate.max_forgetting=1.5"], "gate.max_forgetting must be a number in [0, 1] or null"),
    (["gate.min_average_accuracy=-0.1"], "gate.min_average_accuracy must be a number in [0, 1]"),
    (["run.max_experiences=0"], "run.max_experiences must be an integer >= 1 or null, not 0"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_option_is_one_line_naming_it_and_no_store_is_made(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    cfg = config(tmp_path, *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        train(cfg)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "s").exists()


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(config(tmp_path, "training.batch_size=0", "optimizer.lr=0"))
    message = str(caught.value)
    assert "training.batch_size must" in message and "optimizer.lr must" in message
    assert "; " in message and "\n" not in message


@pytest.mark.parametrize("where", ["file", "inside a file", "foreign directory"])
def test_a_store_path_that_cannot_be_a_store_is_refused(tmp_path: Path, where: str) -> None:
    (tmp_path / "f").write_text("not a store")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    path = {"file": "f", "inside a file": "f/s", "foreign directory": "d"}[where]
    cfg = config(tmp_path, f"store.path={tmp_path / path}")
    message = {"file": "names an existing file", "inside a file": "a file; a store is a",
               "foreign directory": "is a directory that is not an engram store"}[where]  # fmt: skip
    with pytest.raises(ConfigError, match=f"^store.path {tmp_path / path} .*{message}"):
        train(cfg)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["notes.txt"]


# ------------------------------------------------ sections a strategy does not have


@pytest.mark.parametrize(
    "argv, message",
    [
        (["strategy=der", "strategy.replay.mem_size=10"],
         "strategy der has no replay section, so strategy.replay.mem_size cannot be set (did you "
         "mean strategy.der.mem_size?); strategies with a replay section: ewc_replay, replay"),
        (["strategy=ewc", "+strategy.replay.mem_size=10"],
         "strategy ewc has no replay section, so strategy.replay.mem_size cannot be set; for ewc + "
         "replay use strategy=ewc_replay"),
        (["-m", "strategy=ewc_replay,ewc", "strategy.replay.mem_size=10"], "strategy ewc has no "),
        (["experiment=class_il_derpp", "strategy.replay.mem_size=3"], "strategy derpp has no "),
        (["strategy.lwf.alpha=2"], "strategy naive has no lwf section"),
    ],
)  # fmt: skip
def test_an_override_into_a_section_the_strategy_lacks_is_refused(
    argv: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        check_overrides(argv)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "argv", [["strategy=ewc_replay", "strategy.replay.mem_size=10"], ["optimizer.lr=0.1"],
             ["experiment=class_il_derpp", "strategy.der.mem_size=3"], ["--help"]],
)  # fmt: skip
def test_overrides_into_the_strategys_own_sections_pass(argv: list[str]) -> None:
    check_overrides(argv)


# --------------------------------------------------------------- shipped configs


def options() -> list[tuple[str, str]]:
    groups = [p for p in sorted(CONFIGS.iterdir()) if p.is_dir() and p.name != "hydra"]
    return [(g.name, p.stem) for g in groups for p in sorted(g.glob("*.yaml"))]


@pytest.mark.parametrize("group, option", options())
def test_every_shipped_option_validates(tmp_path: Path, group: str, option: str) -> None:
    (tmp_path / "data").mkdir()
    validate(config(tmp_path, f"{group}={option}", f"benchmark.path={tmp_path / 'data'}"))


def test_every_option_of_the_schema_has_a_rule() -> None:
    unchecked = {  # booleans and free-form values (types are checked by the schema)
        "benchmark.task_labels",
        "benchmark.data_dir",
        "benchmark.download",
        "benchmark.path",
        "model.multihead",
        "model.args",
        "model.name",
        "training.async_commit",
        "training.deterministic",
        "run.quiet",
        "run.compare_memory_lost",
        "logger.tensorboard",
        "store.path",
        "store.keep_mid_experience",
        "branch",
        "extra",
    }  # fmt: skip  (model.name, benchmark.path and store.path have rules of their own)
    keys = set(validation._schema_keys(TrainConfig))
    assert keys - set(validation.rules()) == unchecked
    assert set(validation.rules()) <= keys


def test_every_optimizer_choice_builds() -> None:
    import torch

    model = torch.nn.Linear(2, 2)
    for name in validation.OPTIMIZERS:
        cfg = OmegaConf.create({"optimizer": {"name": name, "lr": 0.1, "momentum": 0.0,
                                              "weight_decay": 0.0}})  # fmt: skip
        assert build_optimizer(cfg, model) is not None


def test_shipped_strategy_sections_follow_their_files() -> None:
    shipped = validation.shipped_strategies()
    assert shipped["naive"] == () and shipped["ewc_replay"] == ("ewc", "replay")
    assert shipped["derpp"] == ("der",) and set(shipped) >= {"ewc", "agem", "lwf"}


# ------------------------------------------------------------- default store path


def default_store_path(*overrides: str) -> str:
    """store.path as a Hydra job with these command-line overrides resolves it."""
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        return cfg.store.path
    finally:
        HydraConfig.instance().cfg = None


def test_default_store_path_names_the_overrides_that_change_training() -> None:
    assert default_store_path() == "runs/naive-split_digits-seed0"
    assert default_store_path("strategy=ewc", "seed=1") == "runs/ewc-split_digits-seed1"
    assert default_store_path("run.quiet=true", "logger=none", "store.lock_timeout=5",
                              "training.threads=2", "gate.promote=prod", "run.max_experiences=1",
                              "training.commit_every_iterations=5") == "runs/naive-split_digits-seed0"  # fmt: skip
    assert (default_store_path("optimizer.lr=0.01", "training.epochs=1", "seed=2")
            == "runs/naive-split_digits-seed2-optimizer.lr=0.01,training.epochs=1")  # fmt: skip
    assert default_store_path("store.path=mine", "optimizer.lr=0.01") == "mine"


def test_what_the_store_path_leaves_out_covers_whole_groups() -> None:
    hydra = OmegaConf.load(CONFIGS / "train.yaml").hydra
    excluded = set(hydra.job.config.override_dirname.exclude_keys)
    for key in validation._schema_keys(TrainConfig):
        if key.split(".")[0] in ("store", "run", "logger", "gate"):
            assert key in excluded, key


def test_branch_with_a_default_path_that_names_the_overrides_is_refused(tmp_path: Path) -> None:
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        cfg = compose("train", overrides=["optimizer.lr=0.01", "branch=true"],
                      return_hydra_config=True)  # fmt: skip
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(ConfigError, match="branch=true continues an existing store"):
            validate(cfg)
    finally:
        HydraConfig.instance().cfg = None


# ------------------------------------------------------------------- the command line


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engram.train", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)  # fmt: skip


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["training.batch_size=0"], "training.batch_size"),
        (["+training.epoch=7"], "training.epoch"),
    ],
)
def test_cli_bad_option_exits_2_with_one_line_before_any_directory(
    tmp_path: Path, overrides: list[str], key: str
) -> None:
    (tmp_path / "f").write_text("a file")
    out = run_cli(tmp_path, *overrides, "run.quiet=true")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"engram-train: error: {key} ") and out.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no runs/, no hydra dir


def test_cli_override_into_a_section_the_strategy_lacks_exits_2(tmp_path: Path) -> None:
    out = run_cli(tmp_path, "strategy=der", "strategy.replay.mem_size=10", "run.quiet=true")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("engram-train: error: strategy der has no replay section")
    assert out.stderr.count("\n") == 1 and not list(tmp_path.iterdir())


def test_cli_sweep_gives_each_job_a_store_and_a_rerun_resumes_each(tmp_path: Path) -> None:
    args = ["-m", "optimizer.lr=0.05,0.01", "seed=0,1", "training.epochs=1",
            "benchmark.n_experiences=2", "run.quiet=true", "logger=none"]  # fmt: skip
    first = run_cli(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    stores = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "multirun")
    assert stores == sorted(
        f"naive-split_digits-seed{seed}-benchmark.n_experiences=2,optimizer.lr={lr},"
        "training.epochs=1" for lr in ("0.05", "0.01") for seed in (0, 1)
    )  # fmt: skip
    for name in stores:
        with Store.open(tmp_path / "runs" / name, mode="r") as store:
            assert store.verify().ok and store.head.meta["experience"] == 1
    again = run_cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    for name in stores:
        assert f"runs/{name}: all 2 experiences are already trained" in again.stdout
