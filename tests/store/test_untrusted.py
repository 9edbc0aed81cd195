"""Stores from untrusted sources: malformed bytes give EngramErrors, never code or crashes."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import lmdb
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram.errors import EngramError
from engram.store import Store
from engram.store.codec import decode_tree, parse_array_record

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "dtype",
                    "shape",
                    "chunks",
                    "__tensor__",
                    "__map__",
                    "__tuple__",
                    "__ndarray__",
                    "x",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)

records = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["float32", "bool", "bfloat16", "int64", "object", "float128", 3]),
        "shape": st.lists(st.integers(-2, 2**40), max_size=4) | json_values,
        "chunks": st.lists(
            st.lists(
                st.text(alphabet="0123456789abcdef", min_size=60, max_size=66)
                | st.integers(-1, 2**65),
                max_size=4,
            ),
            max_size=3,
        )
        | json_values,
    }
)


def put_raw(store_path: Path, db: bytes, key: bytes, value: bytes) -> None:
    env = lmdb.open(str(store_path / "memory.lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(key, value, db=env.open_db(db, txn=txn))
    env.close()


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("untrusted") / "store"
    with Store.open(path, mode="c") as store:
        store.commit({"w": torch.ones(3), "n": 1}, model={"weight": torch.zeros(2)})
    return path


def load_everything(path: Path) -> None:
    with Store.open(path) as store:
        store.versions()
        store.verify(all=True)
        store.load()


@settings(max_examples=200, deadline=None)
@given(tree=json_values)
def test_decode_tree_accepts_or_rejects_cleanly(tree) -> None:
    with contextlib.suppress(EngramError):
        decode_tree(tree, lambda record, path: None)


@settings(max_examples=300, deadline=None)
@given(record=records, kind=st.sampled_from(["__tensor__", "__ndarray__"]))
def test_array_records_are_validated(record, kind) -> None:
    try:
        parsed = parse_array_record(kind, record)
    except EngramError:
        return
    # A record that passes declares a size that its chunks exactly account for.
    assert sum(c[1] for c in parsed.chunks) == parsed.nbytes


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(manifest=json_values | st.binary(max_size=64).map(lambda b: b.decode("latin-1")))
def test_hostile_manifest(tmp_path: Path, base_store: Path, manifest) -> None:
    path = tmp_path / f"s{abs(hash(json.dumps(manifest, default=str))) % 10**9}"
    if not path.exists():
        import shutil

        shutil.copytree(base_store, path)
    put_raw(path, b"versions", (1).to_bytes(8, "big"), json.dumps(manifest).encode())
    with pytest.raises(EngramError):
        load_everything(path)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m["state"]["w"]["__tensor__"].update(shape=[2**40, 2**40]),
        lambda m: m["state"]["w"]["__tensor__"]["chunks"][0].__setitem__(1, 2**24),
        lambda m: m["state"]["w"]["__tensor__"].update(dtype="object"),
        lambda m: m["state"].update(evil={"__reduce__": ["os.system", ["echo pwned"]]}),
        lambda m: m["checkpoint"].update(file="../../../etc/passwd"),
        lambda m: m["checkpoint"].update(nbytes=-1),
        lambda m: m.update(format_version=99),
        lambda m: m.update(id=7),
        lambda m: m.update(parent="v0"),
        lambda m: m.pop("state"),
        lambda m: m["state"].update(deep=json.loads("[" * 150 + "]" * 150)),
    ],
    ids=[
        "huge-shape", "chunk-size", "dtype", "reduce-tag", "path-traversal", "negative-size",
        "future-format", "wrong-id", "parent-type", "no-state", "deep-nesting",
    ],
)  # fmt: skip
def test_targeted_manifest_attacks(tmp_path: Path, base_store: Path, mutate) -> None:
    import shutil

    path = tmp_path / "s"
    shutil.copytree(base_store, path)
    with Store.open(path) as store:
        manifest = store.manifest(1)
    mutate(manifest)
    put_raw(path, b"versions", (1).to_bytes(8, "big"), json.dumps(manifest).encode())
    with pytest.raises(EngramError):
        load_everything(path)
    with Store.open(path) as store:
        assert not store.verify(all=True).ok


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(entry=st.binary(max_size=40), meta_value=st.binary(max_size=12))
def test_hostile_index_and_meta(
    tmp_path: Path, base_store: Path, entry: bytes, meta_value: bytes
) -> None:
    import shutil

    path = tmp_path / f"s{abs(hash((entry, meta_value))) % 10**9}"
    if path.exists():
        return
    shutil.copytree(base_store, path)
    with Store.open(path) as store:
        digest = bytes.fromhex(store.manifest()["state"]["w"]["__tensor__"]["chunks"][0][0])
    put_raw(path, b"blobs", digest, entry)
    with contextlib.suppress(EngramError):
        load_everything(path)
    put_raw(path, b"meta", b"format_version", meta_value)
    with contextlib.suppress(EngramError):
        load_everything(path)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=200))
def test_garbage_checkpoint_file(tmp_path: Path, base_store: Path, data: bytes) -> None:
    import shutil

    path = tmp_path / f"s{abs(hash(data)) % 10**9}"
    if path.exists():
        return
    shutil.copytree(base_store, path)
    (path / "checkpoints" / "model-v0001.safetensors").write_bytes(data)
    with pytest.raises(EngramError):
        load_everything(path)


def test_garbage_lmdb_file(tmp_path: Path, base_store: Path) -> None:
    import shutil

    path = tmp_path / "s"
    shutil.copytree(base_store, path)
    (path / "memory.lmdb" / "data.mdb").write_bytes(b"\0" * 8192)
    with pytest.raises(EngramError):
        load_everything(path)


@pytest.fixture(scope="module")
def compacted_store(tmp_path_factory) -> Path:
    """Three versions of slowly changing tensors, compacted: v1 and v2 are delta-coded."""
    path = tmp_path_factory.mktemp("compacted") / "store"
    w = torch.linspace(-1, 1, 4096)
    with Store.open(path, mode="c") as store:
        for i in range(3):
            store.commit({"w": w + i * 1e-6}, model={"weight": w * (1 + i * 1e-6)})
        store.compact()
        assert store.info(1).compacted
    return path


def load_every_version(path: Path) -> None:
    with Store.open(path) as store:
        store.verify(all=True)
        for v in store.versions():
            store.load(v.id)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    entry=st.binary(max_size=110)
    | st.tuples(
        st.sampled_from([b"D\x01\x04\x01", b"D\x01\x04\x00", b"F"]), st.binary(max_size=110)
    ).map(b"".join)
)
def test_hostile_delta_entries(tmp_path: Path, compacted_store: Path, entry: bytes) -> None:
    import shutil

    path = tmp_path / f"s{abs(hash(entry)) % 10**9}"
    if path.exists():
        return
    shutil.copytree(compacted_store, path)
    with Store.open(path) as store:
        digest = bytes.fromhex(store.manifest(1)["state"]["w"]["__tensor__"]["chunks"][0][0])
    put_raw(path, b"blobs", digest, entry)
    with contextlib.suppress(EngramError):
        load_every_version(path)


def test_cyclic_delta_chain_is_corruption(tmp_path: Path, compacted_store: Path) -> None:
    import shutil

    from engram.store.delta import EncodedBlob, decode_entry

    path = tmp_path / "s"
    shutil.copytree(compacted_store, path)
    with Store.open(path) as store:
        digest = bytes.fromhex(store.manifest(1)["state"]["w"]["__tensor__"]["chunks"][0][0])
        with store._read() as txn:
            entry = decode_entry(txn.get(digest, db=store._dbs[b"blobs"]), digest.hex())
    assert isinstance(entry, EncodedBlob) and entry.base is not None
    put_raw(path, b"blobs", digest, EncodedBlob(**{**entry.__dict__, "base": digest}).encode())
    with Store.open(path) as store:
        with pytest.raises(EngramError, match="chain"):
            store.load(1)
        assert not store.verify(all=True).ok
        store.load()  # HEAD does not depend on it
