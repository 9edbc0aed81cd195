"""engram export of scikit-learn versions: skops, joblib (for existing code), ONNX."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import engram
from engram.cli import main
from engram.signature import signature
from engram.sklearn import persist
from engram.sklearn.estimators import build_estimator, partial_fit, spec_params
from engram.store import Artifact, Store

RNG = np.random.default_rng(1)
X = RNG.random((90, 8)).astype(np.float32)
Y = RNG.integers(0, 3, 90)


def estimator(name: str = "sgd_pipeline"):
    est = build_estimator({"name": name, "args": {"params": spec_params(name, {}, 0)}})
    for start in range(0, 90, 30):
        partial_fit(est, X[start : start + 30], Y[start : start + 30], np.arange(3))
    return est


def commit(path: Path, est, versions: dict | None = None) -> None:
    meta = {
        "sklearn": {"versions": versions or persist.library_versions(),
                    "estimator": type(est).__name__},
        "signature": signature([8], range(3)),
        "model_spec": {"name": "sgd_pipeline", "args": {}},
    }  # fmt: skip
    with Store.open(path, mode="c") as store:
        store.commit(artifact=Artifact("skops", persist.dumps(est)), meta=meta)


def export(store: Path, out: Path, *extra: str, capsys=None) -> dict:
    assert main(["export", str(store), "HEAD", "--out", str(out), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out) if capsys is not None else {}


def test_joblib_export_loads_with_joblib_and_predicts_identically(tmp_path, capsys) -> None:
    import joblib

    est = estimator()
    commit(tmp_path / "s", est)
    result = export(tmp_path / "s", tmp_path / "model.joblib", capsys=capsys)
    assert result["format"] == "joblib" and "pickle" in result["note"]
    back = joblib.load(tmp_path / "model.joblib")
    np.testing.assert_array_equal(back.predict(X), est.predict(X))
    np.testing.assert_array_equal(back.predict_proba(X), est.predict_proba(X))


def test_skops_export_is_the_stored_file(tmp_path, capsys) -> None:
    import skops.io as sio

    est = estimator("mlp_classifier")
    commit(tmp_path / "s", est)
    export(tmp_path / "s", tmp_path / "model.skops", capsys=capsys)
    with Store.open(tmp_path / "s") as store:
        assert (tmp_path / "model.skops").read_bytes() == store.artifact_path().read_bytes()
    data = (tmp_path / "model.skops").read_bytes()
    back = sio.loads(data, trusted=sio.get_untrusted_types(data=data))
    np.testing.assert_array_equal(back.predict(X), est.predict(X))


def test_onnx_export_predicts_the_same_labels(tmp_path, capsys) -> None:
    ort = pytest.importorskip("onnxruntime")
    est = estimator()
    commit(tmp_path / "s", est)
    export(tmp_path / "s", tmp_path / "model.onnx", capsys=capsys)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    labels = session.run(None, {"input": X})[0]
    np.testing.assert_array_equal(labels, est.predict(X))


def test_what_a_format_cannot_hold_is_one_line(tmp_path, capsys) -> None:
    commit(tmp_path / "s", estimator())
    assert (
        main(["export", str(tmp_path / "s"), "HEAD", "--out", str(tmp_path / "m.safetensors")]) == 2
    )
    assert "holds a scikit-learn estimator, not tensors" in capsys.readouterr().err
    with Store.open(tmp_path / "t", mode="c") as store:
        import torch

        store.commit(model=torch.nn.Linear(2, 2))
    assert main(["export", str(tmp_path / "t"), "HEAD", "--out", str(tmp_path / "m.joblib")]) == 2
    assert "holds a torch model; --format joblib is for scikit-learn" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.joblib").exists()


def test_another_scikit_learn_version_is_refused_unless_allowed(tmp_path, capsys) -> None:
    est = estimator()
    commit(tmp_path / "s", est, {**persist.library_versions(), "scikit-learn": "1.2.0"})
    out = tmp_path / "m.joblib"
    assert main(["export", str(tmp_path / "s"), "HEAD", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "written by scikit-learn 1.2.0" in err and "--allow-version-mismatch" in err
    with pytest.raises(persist.VersionMismatchError):
        engram.load_model(tmp_path / "s")
    export(tmp_path / "s", out, "--allow-version-mismatch")
    assert out.exists()
    assert engram.load_model(tmp_path / "s", allow_version_mismatch=True).predict(X).shape == (90,)


def test_show_diff_and_du_describe_an_estimator_store(tmp_path, capsys) -> None:
    est = estimator()
    commit(tmp_path / "s", est)
    partial_fit(est, X[:30], Y[:30], np.arange(3))
    commit(tmp_path / "s", est)
    assert main(["show", str(tmp_path / "s"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["artifact"]["file"] == "model-v0002.skops" and shown["signature"]["classes"] == [
        0,
        1,
        2,
    ]
    assert main(["diff", str(tmp_path / "s"), "v0001", "v0002", "--json"]) == 0
    changed = {c["path"] for c in json.loads(capsys.readouterr().out)["tensors"]["changed"]}
    assert {"model/clf/coef_", "model/clf/intercept_", "model/scale/mean_"} <= changed
    assert main(["du", str(tmp_path / "s"), "--json"]) == 0
    usage = json.loads(capsys.readouterr().out)
    model = [c for c in usage["components"] if c["kind"] == "model"]
    with Store.open(tmp_path / "s") as store:
        on_disk = sum(store.artifact_path(v).stat().st_size for v in (1, 2))
    assert model and model[0]["unique"] == on_disk
