"""``engram diff`` without torch (issue 26 item 3): numpy reads what the tensors hold.

diff compares the stored bytes through numpy (:func:`engram.store.codec.numpy_values`
widens bfloat16, complex32 and the float8 formats itself) and reads a scikit-learn
version's fitted arrays from its skops file without skops. Here torch and skops,
imported by the test only, say what each dtype's values are, what norms the torch path
computed and which arrays an estimator holds; the command runs in a fresh interpreter
that must import neither.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engram.cli.common import flatten
from engram.cli.diff import _estimator_arrays
from engram.sklearn import persist
from engram.sklearn.estimators import build_estimator, partial_fit, spec_params
from engram.store import Artifact, SampleIds, Store
from engram.store.codec import TENSOR_ITEMSIZES, numpy_values

NOT_IN_NUMPY = ("bfloat16", "complex32", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
                "float8_e5m2fnuz", "float8_e8m0fnu")  # fmt: skip
# Every dtype a store may hold; a checkpoint file, all but complex32 and complex128.
STATE_DTYPES = tuple(TENSOR_ITEMSIZES)
WEIGHT_DTYPES = tuple(d for d in STATE_DTYPES if d not in ("complex32", "complex128"))


def _bits(x: np.ndarray) -> np.ndarray:
    """Each value's bits (complex: each part's), every NaN the same."""
    parts = x.view(np.float32 if x.dtype == np.complex64 else x.dtype).astype(np.float32)
    bits = parts.view(np.uint32).copy()
    bits[np.isnan(parts)] = 0x7FC00000
    return bits


@pytest.mark.parametrize("dtype", NOT_IN_NUMPY)
def test_numpy_values_are_torchs_for_every_code(dtype: str) -> None:
    """Every bit pattern of the dtype (bfloat16, complex32: all 2**16 of one value or
    part) widens to the value torch gives, signed zeros, subnormals and infinities too."""
    itemsize = TENSOR_ITEMSIZES[dtype]
    codes = np.arange(256 ** min(itemsize, 2), dtype=np.uint8 if itemsize == 1 else np.uint16)
    if dtype == "complex32":  # (code, code) and (code, reversed code) pairs of float16
        codes = np.stack([codes, codes[::-1]], axis=1).reshape(-1)
    raw = codes.view(np.uint8)
    n = raw.size // itemsize
    expected = torch.from_numpy(raw.copy()).view(getattr(torch, dtype))
    expected = expected.to(torch.complex64 if dtype == "complex32" else torch.float32)
    got = numpy_values(dtype, (n,), raw)
    assert got.dtype == (np.complex64 if dtype == "complex32" else np.float32)
    np.testing.assert_array_equal(_bits(got), _bits(expected.numpy()))


def _tensors(seed: int, dtypes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """A (4, 5) tensor of each dtype, of values from every part of its range."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in dtypes:
        x = 3 * torch.randn(4, 5, generator=gen)
        if name.startswith("complex"):
            x = torch.complex(x, torch.randn(4, 5, generator=gen))
        elif name.startswith("uint") or name == "float8_e8m0fnu":
            x = 7 * x.abs() + 0.01
        elif name == "bool":
            x = x > 0
        with warnings.catch_warnings():  # complex32: "ComplexHalf support is experimental"
            warnings.simplefilter("ignore", UserWarning)
            out[name] = x.to(getattr(torch, name))
    # beyond float64's integers: the conversion's rounding is compared too
    out["uint64_large"] = torch.tensor([2**64 - 1 - seed, 2**63 + 12345 * seed], dtype=torch.uint64)
    return out


@pytest.fixture(scope="module")
def dtype_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two versions (the first compacted: its weights delta-coded in the blob store, the
    second's in a checkpoint file) of every dtype, in the state and as weights."""
    path = tmp_path_factory.mktemp("diff") / "store"
    with Store.open(path, mode="c") as store:
        for v in range(2):
            state = {
                "t": _tensors(10 + v, STATE_DTYPES),
                "np": {"f": np.arange(6.0).reshape(2, 3) * v, "i": np.arange(3, dtype=np.int32)},
                # other bytes, equal values: a NaN's payload, a zero's sign
                "signed_zero": torch.tensor([0.0, -0.0 * v]),
                "to_ndarray": torch.zeros(2) if v == 0 else -np.zeros(2, dtype=np.float32),
                "nan": torch.tensor([0x7FC00000 + v], dtype=torch.int32).view(torch.float32),
                "grown": torch.ones(v + 1),
                "slots": SampleIds.of(range(v, v + 4)),
                "clock": {"experience": v},
            }
            store.commit(state, model=_tensors(v, WEIGHT_DTYPES), message=f"v{v}")
        assert store.compact().versions == (1,)
    return path


def _run_fresh(argv: list[str]) -> tuple[str, list[str]]:
    """``engram <argv>`` in a fresh interpreter: its output, and which of torch, skops
    and Avalanche it imported."""
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from engram.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = main({argv!r})
        heavy = sorted(m for m in ("torch", "skops", "avalanche") if m in sys.modules)
        print(json.dumps([rc, out.getvalue(), heavy]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rc, out, heavy = json.loads(proc.stdout)
    assert rc == 0, out
    return out, heavy


def _as_float(x: Any) -> np.ndarray:
    """What the torch path compared: each value as float64 (complex128), through torch."""
    if isinstance(x, torch.Tensor):
        return (x.to(torch.complex128) if x.is_complex() else x.to(torch.float64)).numpy()
    return np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _torch_changes(store: Store, a: str, b: str) -> dict[str, dict[str, Any]]:
    """The changed arrays and norms of ``a -> b`` as the torch path computed them, from
    the versions :meth:`Store.load` loads (slot tables left out)."""
    flats = []
    for version in (a, b):
        snap = store.load(version)
        flat = flatten(snap.state)
        flat.update({f"model/{k}": t for k, t in snap.model.items()})
        flats.append({p: x for p, x in flat.items() if isinstance(x, torch.Tensor | np.ndarray)})
    changed = {}
    for path in (set(flats[0]) & set(flats[1])) - {"/slots"}:
        x, y = flats[0][path], flats[1][path]
        dtype_a, dtype_b = (str(t.dtype).removeprefix("torch.") for t in (x, y))
        entry = {"path": path, "shape_a": list(x.shape), "shape_b": list(y.shape),
                 "l2": None, "relative": None, "dtype_a": dtype_a, "dtype_b": dtype_b}  # fmt: skip
        if x.shape != y.shape:
            changed[path] = entry
            continue
        fx, fy = _as_float(x), _as_float(y)
        if str(x.dtype) == str(y.dtype) and np.array_equal(fx, fy, equal_nan=True):
            continue  # the same values of the same type (a tensor is not an array)
        l2, norm = float(np.linalg.norm((fy - fx).ravel())), float(np.linalg.norm(fx.ravel()))
        entry.update(l2=l2, relative=l2 / norm if norm > 0 else None)
        changed[path] = entry
    return changed


@pytest.mark.parametrize("a, b", [("v0001", "v0002"), ("v0002", "v0001")])
def test_diff_without_torch_gives_the_torch_paths_norms_for_every_dtype(
    dtype_store: Path, a: str, b: str
) -> None:
    out, heavy = _run_fresh(["diff", str(dtype_store), a, b, "--json"])
    assert heavy == []
    d = json.loads(out)
    with Store.open(dtype_store) as store:
        expected = _torch_changes(store, a, b)
    changed = {c["path"]: c for c in d["tensors"]["changed"]}
    assert {f"/t/{n}" for n in STATE_DTYPES} | {f"model/{n}" for n in WEIGHT_DTYPES} <= set(changed)
    assert {"/to_ndarray", "/grown"} <= set(changed) and not {"/nan", "/signed_zero"} & set(changed)
    assert changed["/to_ndarray"]["l2"] == 0.0  # equal values, but a tensor became an array
    assert changed == expected  # the same floats, bit for bit
    assert d["tensors"]["added"] == d["tensors"]["removed"] == []
    entered, left = ([4], [0]) if a == "v0001" else ([0], [4])
    assert d["replay"] == [{"path": "/slots", "entered": entered, "left": left, "kept": 3}]
    assert d["values"] == [{"path": "/clock/experience", "a": int(a[-1]) - 1, "b": int(b[-1]) - 1}]

    text, heavy = _run_fresh(["diff", str(dtype_store), a, b])
    assert heavy == []
    for path in ("/t/bfloat16", "/t/float8_e4m3fn", "/t/complex32", "model/float8_e8m0fnu"):
        row = next(line.split() for line in text.splitlines() if line.split()[:1] == [path])
        assert row[2:] == [f"{expected[path]['l2']:.4g}", f"{expected[path]['relative']:.4g}"]


# ------------------------------------------------------------------ scikit-learn

RNG = np.random.default_rng(3)
X = RNG.random((60, 8)).astype(np.float32)
Y = RNG.integers(0, 3, 60)


def _skops_arrays(estimator: Any) -> dict[str, np.ndarray]:
    """The fitted arrays diff compared when it loaded the estimator through skops."""
    out = {}
    for step, est in getattr(estimator, "steps", None) or [("", estimator)]:
        prefix = f"model/{step}/" if step else "model/"
        for name, value in vars(est).items():
            if not name.endswith("_") or name.startswith("_"):
                continue
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                if isinstance(v, np.ndarray) and v.dtype.kind in "fiub":
                    out[f"{prefix}{name}{f'/{i}' if isinstance(value, list) else ''}"] = v
    return out


@pytest.mark.parametrize("name", ["sgd_pipeline", "mlp_classifier"])  # steps; lists of arrays
def test_an_estimators_arrays_are_read_without_skops(tmp_path: Path, name: str) -> None:
    est = build_estimator({"name": name, "args": {"params": spec_params(name, {}, 0)}})
    path = tmp_path / "store"
    meta = {"sklearn": {"versions": persist.library_versions()}}
    with Store.open(path, mode="c") as store:
        for start in (0, 30):
            partial_fit(est, X[start : start + 30], Y[start : start + 30], np.arange(3))
            store.commit(artifact=Artifact("skops", persist.dumps(est)), meta=meta)
        data = store.load("v0002", state=False).artifact
    expected = _skops_arrays(persist.loads(data))
    got = _estimator_arrays(data, "here")
    assert got.keys() == expected.keys() and len(got) >= 4
    for key, array in expected.items():
        assert got[key].dtype == array.dtype and np.array_equal(got[key], array), key

    out, heavy = _run_fresh(["diff", str(path), "v0001", "v0002", "--json"])
    assert heavy == []
    changed = {c["path"] for c in json.loads(out)["tensors"]["changed"]}
    assert changed and changed <= expected.keys()


def test_a_skops_file_that_cannot_be_read_is_one_line(tmp_path: Path, capsys) -> None:
    """A zip of allowed types whose schema is not what skops writes (an object's
    attributes a list): one line, as skops' own refusal was."""
    import io
    import zipfile

    from engram.cli import main

    attributes = {"__class__": "dict", "__module__": "builtins", "content": [1]}
    schema = {"__class__": "SGDClassifier", "__loader__": "ObjectNode", "content": attributes,
              "__module__": "sklearn.linear_model._stochastic_gradient"}  # fmt: skip
    data = io.BytesIO()
    with zipfile.ZipFile(data, "w") as z:
        z.writestr("schema.json", json.dumps(schema))
    with Store.open(tmp_path / "store", mode="c") as store:
        for _ in range(2):
            store.commit(artifact=Artifact("skops", data.getvalue()))
    assert main(["diff", str(tmp_path / "store"), "v0001", "v0002"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "skops file cannot be read" in err
