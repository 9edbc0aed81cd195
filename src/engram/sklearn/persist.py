"""scikit-learn estimators to bytes and back, with skops and engram's own allowlist.

``joblib.load``/``pickle`` run code from the file. skops (``skops.io``) stores an
estimator as a zip of a JSON schema and ``.npy`` arrays and rebuilds it node by node,
refusing types it does not trust. engram adds two rules on top:

* **an allowlist in this module**, never a trust list read from the file: every type
  the file names (walked in its schema before skops sees it) must be in
  :data:`ALLOWED_TYPES`; anything else is refused with an error naming the type;
* **the scikit-learn version**: the versions a file was written with are recorded
  beside it (:func:`library_versions`); loading under another scikit-learn is refused
  unless the caller says otherwise (``allow_version_mismatch=True``), because an
  estimator's attributes change between releases.

Never falls back to ``joblib.load``.
"""

from __future__ import annotations

import functools
import io
import json
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

from engram.errors import CorruptionError, EngramError

FORMAT = "skops"

# Every type a supported estimator's file may name ("module.Class"), and nothing more.
# tests/sklearn/test_persist.py fits each supported estimator and checks that the types
# its file names are in here, so a new scikit-learn that adds an internal type fails
# that test instead of a user's load.
_ESTIMATORS = (
    "sklearn.linear_model._stochastic_gradient.SGDClassifier",
    "sklearn.linear_model._perceptron.Perceptron",
    "sklearn.naive_bayes.GaussianNB",
    "sklearn.naive_bayes.MultinomialNB",
    "sklearn.naive_bayes.BernoulliNB",
    "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.pipeline.Pipeline",
)
_INTERNALS = (
    # MLPClassifier's optimizer state after partial_fit, and its label binarizer
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.preprocessing._label.LabelBinarizer",
    # SGDClassifier's and Perceptron's loss objects (Cython classes)
    *(
        f"sklearn.linear_model._sgd_fast.{loss}"
        for loss in (
            "Hinge",
            "Log",
            "LogLoss",
            "ModifiedHuber",
            "SquaredHinge",
            "Huber",
            "SquaredLoss",
            "SquaredError",
            "EpsilonInsensitive",
            "SquaredEpsilonInsensitive",
            "CyHalfBinomialLoss",
        )
    ),
    "sklearn._loss._loss.CyHalfBinomialLoss",
    "numpy.random.mtrand.RandomState",
)
_PLAIN = (
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "builtins.int",
    "builtins.float", "builtins.bool", "builtins.NoneType", "builtins.slice",
    "numpy.ndarray", "numpy.dtype", "numpy.float16", "numpy.float32", "numpy.float64",
    "numpy.int8", "numpy.int16", "numpy.int32", "numpy.int64", "numpy.uint8", "numpy.uint16",
    "numpy.uint32", "numpy.uint64", "numpy.bool_", "numpy.bool", "numpy.str_",
)  # fmt: skip
ALLOWED_TYPES = frozenset(_ESTIMATORS + _INTERNALS + _PLAIN)
_MAX_SCHEMA_BYTES = 64 << 20


class UnsafeModelError(EngramError):
    """A model file names a type outside engram's allowlist."""


class VersionMismatchError(EngramError):
    """A model file was written by another scikit-learn version."""


def library_versions() -> dict[str, str]:
    """The versions an estimator file depends on, recorded with every version."""
    return dict(_versions())


@functools.cache
def _versions() -> tuple[tuple[str, str], ...]:
    # Read once per process: four importlib.metadata look-ups cost ~3 ms, more than the
    # skops save or load of a linear model (docs/benchmarks.md, "scikit-learn").
    from importlib.metadata import version

    return tuple((lib, version(lib)) for lib in ("scikit-learn", "numpy", "scipy", "skops"))


def dumps(estimator: Any) -> bytes:
    """The estimator as skops bytes (after checking every type it holds is allowed)."""
    import skops.io as sio

    data = sio.dumps(estimator)
    check_types(data, what=type(estimator).__name__)  # refuse writing what we cannot read
    return data


def loads(
    data: bytes,
    recorded: Mapping[str, str] | None = None,
    *,
    what: str = "model file",
    allow_version_mismatch: bool = False,
) -> Any:
    """The estimator in skops ``data``, through the allowlist.

    Args:
        recorded: the library versions the file was written with (see
            :func:`library_versions`); None: not checked.
        allow_version_mismatch: load a file written by another scikit-learn version.

    Raises:
        UnsafeModelError: the file names a type outside :data:`ALLOWED_TYPES`.
        VersionMismatchError: written by another scikit-learn, and not allowed.
        CorruptionError: not a readable skops file.
    """
    import skops.io as sio

    if recorded is not None and not allow_version_mismatch:
        check_versions(recorded, what)
    found = check_types(data, what=what)
    try:
        return sio.loads(data, trusted=sorted(found - set(_PLAIN)))
    except Exception as e:  # skops' own refusal or a damaged file
        raise CorruptionError(f"{what}: cannot be read as a skops file: {e}") from None


def check_versions(recorded: Mapping[str, str], what: str) -> None:
    now = library_versions()
    stored = recorded.get("scikit-learn")
    if stored != now["scikit-learn"]:
        raise VersionMismatchError(
            f"{what} was written by scikit-learn {stored}, this is {now['scikit-learn']}; an "
            "estimator's attributes change between releases, so it is not loaded. Install "
            f"scikit-learn=={stored}, pass allow_version_mismatch=True "
            "(engram export/serve: --allow-version-mismatch) to load it anyway, or re-fit "
            "from the version's lineage (engram show names its data and settings)"
        )


def check_types(data: bytes, *, what: str) -> set[str]:
    """Every type ``data``'s schema names; UnsafeModelError for one outside the allowlist."""
    found = set(_types(_schema(data, what)))
    refused = sorted(found - ALLOWED_TYPES)
    if refused:
        raise UnsafeModelError(
            f"{what} holds {', '.join(refused[:5])}{' ...' if len(refused) > 5 else ''}, "
            "outside engram's allowlist of scikit-learn types "
            "(engram.sklearn.persist.ALLOWED_TYPES); it is not loaded"
        )
    return found


def _schema(data: bytes, what: str) -> Any:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            info = z.getinfo("schema.json")
            if info.file_size > _MAX_SCHEMA_BYTES:
                raise CorruptionError(f"{what}: its schema claims {info.file_size} bytes")
            return json.loads(z.read(info))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise CorruptionError(f"{what}: not a skops file ({e})") from None


def _types(node: Any) -> Iterator[str]:
    """``module.Class`` of every node of a skops schema, and of every type it names."""
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "__class__" in node or "__module__" in node:
                yield f"{node.get('__module__')}.{node.get('__class__')}"
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
