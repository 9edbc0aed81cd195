"""scikit-learn estimators through skops and engram's allowlist: round trips, refusals."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from engram.errors import CorruptionError
from engram.sklearn import persist
from engram.sklearn.estimators import MODELS, build_estimator, partial_fit, spec_params
from engram.sklearn.persist import UnsafeModelError, VersionMismatchError

RNG = np.random.default_rng(0)
X = RNG.random((120, 16)).astype(np.float32)
Y = RNG.integers(0, 4, 120)
CLASSES = np.arange(4)


def fitted(name: str, **args):
    spec = {"name": name, "args": {"params": spec_params(name, args, seed=0)}}
    est = build_estimator(spec)
    for start in range(0, 120, 40):
        partial_fit(est, X[start : start + 40], Y[start : start + 40], CLASSES)
    return est


VARIANTS = [(name, {}) for name in MODELS] + [
    ("mlp_classifier", {"solver": "sgd"}),
    ("sgd_classifier", {"loss": "hinge"}),
    ("sgd_classifier", {"loss": "modified_huber"}),
    ("sgd_pipeline", {"clf": {"loss": "hinge"}}),
]


@pytest.mark.parametrize("name, args", VARIANTS, ids=[f"{n}-{a}" for n, a in VARIANTS])
def test_every_supported_estimator_round_trips_within_the_allowlist(name: str, args) -> None:
    est = fitted(name, **args)
    data = persist.dumps(est)
    assert persist.check_types(data, what=name) <= persist.ALLOWED_TYPES
    back = persist.loads(data, persist.library_versions())
    assert type(back) is type(est)
    np.testing.assert_array_equal(back.predict(X), est.predict(X))
    # and it keeps learning exactly where the original does
    partial_fit(est, X[:30], Y[:30], CLASSES)
    partial_fit(back, X[:30], Y[:30], CLASSES)
    np.testing.assert_array_equal(back.predict(X), est.predict(X))
    if hasattr(est, "predict_proba"):
        np.testing.assert_array_equal(back.predict_proba(X), est.predict_proba(X))


def test_a_type_outside_the_allowlist_is_refused_by_name() -> None:
    import skops.io as sio
    from sklearn.tree import DecisionTreeClassifier

    data = sio.dumps(DecisionTreeClassifier().fit(X, Y))  # skops itself trusts it
    with pytest.raises(UnsafeModelError, match=r"sklearn\.tree\._classes\.DecisionTreeClassifier"):
        persist.loads(data, persist.library_versions())
    with pytest.raises(UnsafeModelError, match="DecisionTreeClassifier"):
        persist.dumps(DecisionTreeClassifier().fit(X, Y))  # never written either


def test_a_function_hidden_inside_a_supported_estimator_is_refused() -> None:
    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    evil = Pipeline([("f", FunctionTransformer(np.exp)), ("clf", fitted("sgd_classifier"))])
    data = sio.dumps(evil)
    with pytest.raises(UnsafeModelError, match="FunctionTransformer"):
        persist.loads(data, persist.library_versions())


def test_another_scikit_learn_version_is_refused_unless_allowed() -> None:
    data = persist.dumps(fitted("sgd_classifier"))
    recorded = {**persist.library_versions(), "scikit-learn": "0.24.2"}
    with pytest.raises(
        VersionMismatchError, match=r"scikit-learn 0\.24\.2.*allow_version_mismatch"
    ):
        persist.loads(data, recorded)
    est = persist.loads(data, recorded, allow_version_mismatch=True)
    assert est.predict(X).shape == (120,)


@pytest.mark.parametrize("data", [b"", b"not a zip", b"PK\x05\x06" + bytes(18)])
def test_damaged_bytes_are_corruption(data: bytes) -> None:
    with pytest.raises(CorruptionError, match="not a skops file"):
        persist.loads(data, persist.library_versions())


def test_loading_never_unpickles(monkeypatch) -> None:
    import joblib

    data = persist.dumps(fitted("mlp_classifier"))

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(joblib, "load", refuse)
    assert persist.loads(data, persist.library_versions()).predict(X).shape == (120,)
