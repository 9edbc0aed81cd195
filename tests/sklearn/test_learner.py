"""scikit-learn learners through engram-train: the same store, metrics, gate and resume."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

import engram
from engram.errors import EngramError, GateFailed
from engram.run.validation import ConfigError
from engram.signature import SignatureError
from engram.sklearn import persist
from engram.sklearn.estimators import MODELS
from engram.store import Store
from engram.train import train


def config(store: Path, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[f"store.path={store}", "training.epochs=1",
                                           "run.quiet=true", "logger.tensorboard=false",
                                           *overrides])  # fmt: skip


def estimator_arrays(est) -> dict[str, object]:
    """Every fitted attribute of an estimator (a Pipeline's steps, an MLP's optimizer
    and RNG included), for exact comparison."""
    out: dict[str, object] = {}

    def walk(obj, prefix: str, depth: int = 0) -> None:
        if hasattr(obj, "steps"):
            for name, step in obj.steps:
                walk(step, f"{prefix}{name}.", depth + 1)
        for key, value in sorted(vars(obj).items()):
            if isinstance(value, np.ndarray):
                out[prefix + key] = value
            elif isinstance(value, list) and value and isinstance(value[0], np.ndarray):
                for i, v in enumerate(value):
                    out[f"{prefix}{key}[{i}]"] = v
            elif isinstance(value, np.random.RandomState):
                out[prefix + key] = value.get_state()[1]
            elif hasattr(value, "__dict__") and depth < 2 and key.endswith("_"):
                walk(value, f"{prefix}{key}.", depth + 1)
            elif isinstance(value, int | float | str | bool) and key.endswith("_"):
                out[prefix + key] = value

    walk(est, "")
    return out


def assert_same_estimator(a, b) -> None:
    left, right = estimator_arrays(a), estimator_arrays(b)
    assert left.keys() == right.keys()
    for key in left:
        assert np.array_equal(left[key], right[key]), key


def buffer_contents(path: Path) -> dict[str, object]:
    from engram.memory.replay import ReplayBuffer

    with Store.open(path) as store:
        state = store.load().state["replay"]
        hp = state["hparams"]
        buffer = ReplayBuffer(store, hp["capacity"], hp["policy"], hp["seed"])
        buffer.load_state_dict(state)
        return {k: v.numpy() for k, v in buffer.contents().items()}


def head_of(path: Path):
    with Store.open(path) as store:
        snap = store.load()
        return snap, engram.load_model(store)


def test_replay_beats_naive_partial_fit_on_class_incremental_digits(tmp_path: Path) -> None:
    naive = train(config(tmp_path / "naive", "model=sgd_classifier", "strategy=naive"))
    replay = train(config(tmp_path / "replay", "model=sgd_classifier", "strategy=replay"))
    from engram.metrics import average_accuracy, forgetting

    assert average_accuracy(replay) > average_accuracy(naive) + 0.4, (naive, replay)
    assert forgetting(replay) < forgetting(naive) - 0.4


@pytest.mark.parametrize("model", MODELS)
def test_every_estimator_resumes_bit_identically(tmp_path: Path, model: str) -> None:
    strategy = "naive" if model.endswith("_nb") else "replay"
    args = [f"model={model}", f"strategy={strategy}", "benchmark.n_experiences=2"]
    whole = train(config(tmp_path / "whole", *args))
    train(config(tmp_path / "cut", *args, "run.max_experiences=1"))
    cut = train(config(tmp_path / "cut", *args))  # a new run resumes from HEAD
    assert cut == whole
    (a_snap, a), (b_snap, b) = head_of(tmp_path / "whole"), head_of(tmp_path / "cut")
    assert type(a).__name__ == type(b).__name__ and a.__class__.__module__.startswith("sklearn")
    assert_same_estimator(a, b)
    if strategy == "replay":  # the same samples in the same slots (their ids may differ)
        for key in ("slot_keys", "admit_rng", "sample_rng"):
            assert np.array_equal(a_snap.state["replay"][key], b_snap.state["replay"][key]), key
        a_mem, b_mem = buffer_contents(tmp_path / "whole"), buffer_contents(tmp_path / "cut")
        assert all(np.array_equal(a_mem[k], b_mem[k]) for k in ("x", "y", "experience"))


def test_each_version_names_its_skops_file_and_records_what_loading_needs(tmp_path: Path) -> None:
    train(config(tmp_path / "s", "model=sgd_pipeline", "strategy=replay"))
    with Store.open(tmp_path / "s") as store:
        versions = store.versions()
        assert [v.artifact for v in versions] == [f"model-v{i + 1:04d}-exp{i}.skops"
                                                  for i in range(5)]  # fmt: skip
        head = store.head
        assert head.meta["sklearn"]["versions"] == persist.library_versions()
        assert head.meta["signature"] == {
            "input": {"dtype": "float32", "shape": [64]},
            "classes": list(range(10)),
            "task_labels": False,
        }
        assert head.meta["metrics"]["average_accuracy"] > 0.8
        assert store.verify(all=True).ok
        est = engram.load_model(store, "HEAD~2")  # an earlier version, as it was
        assert est.predict(np.zeros((2, 64), dtype=np.float32)).shape == (2,)


def test_a_sigkilled_run_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    args = ["model=mlp_classifier", "strategy=replay", "benchmark.n_experiences=5"]
    train(config(tmp_path / "whole", *args))
    # The child dies as soon as experience 2's model file is written, before the
    # version is published: the kill lands inside the commit it aims at.
    overrides = [f"store.path={tmp_path / 'cut'}", "training.epochs=1", "run.quiet=true",
                 "logger.tensorboard=false", *args]  # fmt: skip
    script = textwrap.dedent(f"""
        import os, signal, sys, threading
        from hydra import compose, initialize_config_module
        from engram.train import train
        def hook(frame, event, arg):
            if (event == "return" and frame.f_code.co_name == "_write_artifact_durably"
                    and "exp2" in arg.file):
                os.kill(os.getpid(), signal.SIGKILL)
        sys.setprofile(hook)
        threading.setprofile(hook)
        with initialize_config_module(version_base="1.3", config_module="engram.configs"):
            cfg = compose("train", overrides={overrides!r})
        train(cfg)
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=240)  # fmt: skip
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    with Store.open(tmp_path / "cut") as store:  # killed where intended
        assert store.head.meta["experience"] == 1
        assert (store.path / "checkpoints" / "model-v0003-exp2.skops").exists()  # unpublished
    again = train(config(tmp_path / "cut", *args))
    assert again == train(config(tmp_path / "whole", *args))  # (already trained: the matrix)
    assert_same_estimator(head_of(tmp_path / "whole")[1], head_of(tmp_path / "cut")[1])
    with Store.open(tmp_path / "cut") as store:  # the unpublished id's file was rewritten
        assert store.verify(all=True).ok


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["strategy=ewc"],
            r"strategy=ewc needs gradients \(ewc\).*strategy=naive or strategy=replay",
        ),
        (["strategy=derpp"], "needs gradients"),
        (["benchmark=split_digits_task"], "task-incremental"),
        (["training.precision=bf16-mixed"], "training.precision is for torch models"),
        (["training.commit_every_iterations=10"], "commits once per experience"),
        (["training.device=cuda"], "trains on the CPU"),
    ],
)
def test_what_does_not_apply_to_partial_fit_is_refused_in_one_line(
    tmp_path: Path, overrides: list[str], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        train(config(tmp_path / "s", "model=sgd_classifier", *overrides))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "s").exists()


def test_a_label_outside_the_declared_space_is_named(tmp_path: Path) -> None:
    from engram.signature import signature
    from engram.sklearn.learner import SklearnLearner
    from engram.streams import build_benchmark

    bench = build_benchmark({"name": "split_digits", "n_experiences": 5})
    spec = {"name": "sgd_classifier", "args": {"params": {"random_state": 0}}}
    with Store.open(tmp_path / "s", mode="c") as store:
        learner = SklearnLearner(spec, store, signature=signature([64], range(4)))
        train_list, test_list = list(bench.train_stream), list(bench.test_stream)
        learner.fit(train_list[:2], test_list[:2])  # classes 0-3: declared
        with pytest.raises(
            SignatureError, match=r"label 4 and more outside the declared label space 0\.\.3"
        ):
            learner.fit(train_list[:3], test_list[:3])
        assert store.head.meta["experience"] == 1  # nothing committed for it


def test_the_regression_gate_applies_to_estimators(tmp_path: Path) -> None:
    with pytest.raises(GateFailed, match="after experience 1"):
        train(config(tmp_path / "s", "model=sgd_classifier", "gate.max_forgetting=0.2",
                     "gate.promote=prod"))  # fmt: skip
    with Store.open(tmp_path / "s") as store:
        assert store.tags()["prod"] == store.head.id == 1  # rolled back to the passing one
        assert "gate-failed-v0002" in store.tags()


def test_a_torch_store_is_not_continued_by_an_estimator(tmp_path: Path) -> None:
    train(config(tmp_path / "s", "run.max_experiences=1"))
    with pytest.raises(EngramError, match="model this run would build differs"):
        train(config(tmp_path / "s", "model=sgd_classifier"))


def test_the_handle_serves_estimators_and_follows_the_tag(tmp_path: Path) -> None:
    train(config(tmp_path / "s", "model=sgd_classifier", "strategy=replay",
                 "gate.promote=prod"))  # fmt: skip
    with Store.open(tmp_path / "s", mode="w") as store:
        handle = engram.ModelHandle(store, "prod", check_every=0)
        est, version = handle.get()
        assert version.id == 5 and hasattr(est, "predict_proba")
        store.tag("prod", 2)
        est2, version2 = handle.get()
        assert version2.id == 2 and est2 is not est
        assert_same_estimator(est2, engram.load_model(store, 2))


def test_predict_checks_the_signature_for_estimators_and_torch_models(tmp_path: Path) -> None:
    train(config(tmp_path / "sk", "model=sgd_classifier", "benchmark.n_experiences=2"))
    train(config(tmp_path / "torch", "benchmark.n_experiences=2"))
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    for name in ("sk", "torch"):
        with engram.ModelHandle(tmp_path / name, "HEAD") as handle:
            labels, version = handle.predict(x)
            assert labels.shape == (3,) and version.id == 2
            assert set(labels.tolist()) <= set(range(10))
            with pytest.raises(SignatureError, match=r"shape \(3, 63\).*\(N, 64\) of float32"):
                handle.predict(x[:, :63])
            with pytest.raises(SignatureError, match="must be numeric"):
                handle.predict(np.array([["a"] * 64]))


def test_tensorboard_reviews_an_estimator_like_a_network(tmp_path: Path) -> None:
    from helpers import scalars

    args = ["model=sgd_classifier", "strategy=replay", "logger.tensorboard=true"]
    train(config(tmp_path / "whole", *args))
    for _ in range(2):
        train(config(tmp_path / "split", *args, "run.max_experiences=3"))
    whole, split = scalars(tmp_path / "whole" / "tb"), scalars(tmp_path / "split" / "tb")
    assert {"accuracy/exp0", "metrics/forgetting", "metrics/average_accuracy"} <= set(whole)
    whole.pop("store/version_bytes"), split.pop("store/version_bytes")  # skops zip sizes vary
    assert whole == split
    assert [step for step, _ in whole["accuracy/exp4"]] == [0, 1, 2, 3, 4]
