"""'May this run continue this store?': every check once, cheapest first, one style."""

from __future__ import annotations

import pytest

from engram.errors import HyperparameterMismatchError
from engram.store import VersionInfo
from engram.streams.files import DataFileError
from engram.training.lineage import ModelMismatchError, check_lineage, diff

SPEC = {"name": "mlp", "args": {"hidden": [256], "n_classes": 10}}
HPARAMS = {"strategy": "ewc", "plugins": {"ewc": {"ewc_lambda": 50.0}}}
IDS = ["000.npz:aa", "001.npz:bb", "002.npz:cc"]


def head(kind: str = "experience", experience: int = 1, **meta) -> VersionInfo:
    meta = {"kind": kind, "experience": experience, "model_spec": SPEC, "hparams": HPARAMS,
            "experience_ids": IDS[:2], **meta}  # fmt: skip
    return VersionInfo(3, 2, "2026-12-01T00:00:00Z", "", meta, 0, 0, None)


def check(version: VersionInfo | None, **changes) -> None:
    settings = {"hparams": HPARAMS, "model_spec": SPEC, "experience_ids": IDS, **changes}
    check_lineage(version, path="runs/s", **settings)


def test_the_same_run_continues_and_a_new_store_has_nothing_to_check() -> None:
    check(head())
    check(None, hparams={"anything": 1})


def test_the_stream_is_checked_first() -> None:
    changed = {"hparams": {"strategy": "si"}, "model_spec": {"name": "cnn", "args": {}}}
    with pytest.raises(DataFileError, match="experience 1 was trained on '001.npz'"):
        check(head(), experience_ids=["000.npz:aa", "001.npz:XX"], **changed)


def test_the_file_of_an_interrupted_experience_must_not_change() -> None:
    interrupted = head(kind="mid-experience", experience=1)
    with pytest.raises(DataFileError, match="being trained on '001.npz' when the run stopped"):
        check(interrupted, experience_ids=["000.npz:aa", "001.npz:XX"])
    check(head(kind="mid-experience", experience=0), experience_ids=["000.npz:aa", "001.npz:XX"])


def test_the_model_before_the_hyperparameters() -> None:
    spec = {"name": "mlp", "args": {"hidden": [128], "n_classes": 10}}
    with pytest.raises(ModelMismatchError, match=r"args\.hidden: store \[256\] vs now \[128\]"):
        check(head(), model_spec=spec, hparams={"strategy": "si"})


def test_hyperparameters_differ_unless_branching() -> None:
    changed = {"strategy": "ewc", "plugins": {"ewc": {"ewc_lambda": 5.0}}}
    with pytest.raises(HyperparameterMismatchError,
                       match=r"plugins\.ewc\.ewc_lambda: store 50\.0 vs now 5\.0"):  # fmt: skip
        check(head(), hparams=changed)
    check_lineage(head(), path="s", hparams=changed, model_spec=SPEC, branch=True)


def test_diff_names_new_missing_and_changed_keys() -> None:
    assert diff({"a": 1, "b": {"c": 2}}, {"b": {"c": 3}, "d": 4}) == [
        "a: missing (store has 1)", "b.c: store 2 vs now 3", "d: new (4)",
    ]  # fmt: skip
    assert diff([1], [1]) == [] and diff(1, 2) == ["value: store 1 vs now 2"]
