"""Stores from untrusted sources: malformed bytes give EngramErrors, never code or crashes."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram.errors import CorruptionError, EngramError, StoreFormatError
from engram.store import FORMAT_VERSION, Store
from engram.store.codec import (
    TAG_MAP,
    TAG_NDARRAY,
    TAG_SAMPLES,
    TAG_TENSOR,
    TAG_TUPLE,
    ArrayRecord,
    decode_tree,
    parse_array_record,
)
from engram.store.records import seal

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
    """Write a record as a hostile tool would: with a valid seal (XXH3 is no secret), so
    what is checked is the validation behind the checksum."""
    env = lmdb.open(str(store_path / "memory.lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        sealed = txn.get(b"records", db=env.open_db(b"meta", txn=txn)) is not None
        txn.put(key, seal(db, key, value) if sealed else value, db=env.open_db(db, txn=txn))
    env.close()


@contextmanager
def fresh_copy(store: Path, under: Path) -> Iterator[Path]:
    """A copy of ``store`` in a directory of its own, removed afterwards: hypothesis runs
    many examples in one test call, and each must start from the pristine store."""
    directory = Path(tempfile.mkdtemp(dir=under))
    try:
        shutil.copytree(store, directory / "store")
        yield directory / "store"
    finally:
        shutil.rmtree(directory)


def same(a: Any, b: Any) -> bool:
    """Exact equality of loaded values: types, dtypes, shapes, bits (NaN equals NaN)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a, b))  # fmt: skip
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return (type(b) is dict and len(a) == len(b)
                and all(same(ka, kb) and same(va, vb)
                        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)))  # fmt: skip
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def base_committed() -> tuple[dict, dict]:
    return {"w": torch.ones(3), "n": 1}, {"weight": torch.zeros(2)}


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("untrusted") / "store"
    with Store.open(path, mode="c") as store:
        state, model = base_committed()
        store.commit(state, model=model)
    return path


def detected_or_intact(path: Path, committed: dict[int, tuple[dict, dict]]) -> bool:
    """Read every version of a tampered store: each either fails with CorruptionError or
    gives back exactly what was committed, and verify flags the store iff one failed.
    Returns whether the damage was detected."""
    with Store.open(path) as store:
        assert [v.id for v in store.versions()] == sorted(committed)
        report = store.verify(all=True)
        detected = False
        for vid, (state, model) in committed.items():
            try:
                loaded = store.load(vid)
            except CorruptionError:
                detected = True
                continue
            assert same(loaded.state, state), f"v{vid}'s state silently changed"
            assert same(loaded.model, model), f"v{vid}'s model silently changed"
    assert report.ok != detected, report
    return detected


def load_everything(path: Path) -> None:
    with Store.open(path) as store:
        store.versions()
        store.verify(all=True)
        store.load()


def faithful(tree: Any, out: Any) -> bool:
    """Whether ``out`` is what ``tree`` encodes: tagged nodes turned into the values they
    tag (arrays into the record they were read from), all else exactly as in the JSON."""
    if isinstance(tree, list):
        return type(out) is list and len(out) == len(tree) and all(map(faithful, tree, out))
    if isinstance(tree, dict) and any(k.startswith("__") for k in tree):
        ((tag, body),) = tree.items()  # a tagged node holds its tag alone
        if tag in (TAG_TENSOR, TAG_NDARRAY, TAG_SAMPLES):
            return isinstance(out, ArrayRecord) and out == parse_array_record(tag, body)
        if tag == TAG_TUPLE:
            return type(out) is tuple and faithful(body, list(out))
        assert tag == TAG_MAP
        pairs = {}  # a repeated key keeps its first place and its last value, as in JSON
        for key, value in body:
            pairs[key] = value
        return type(out) is dict and faithful(
            [[k, v] for k, v in pairs.items()], [[k, v] for k, v in out.items()]
        )
    if isinstance(tree, dict):
        return (
            type(out) is dict
            and list(out) == list(tree)
            and all(map(faithful, tree.values(), out.values()))
        )
    return same(tree, out)


@settings(max_examples=200, deadline=None)
@given(tree=json_values)
def test_decode_tree_accepts_exactly_or_rejects_as_corruption(tree) -> None:
    try:
        decoded = decode_tree(tree, lambda record, path: record)
    except CorruptionError:
        return
    assert faithful(tree, decoded), (tree, decoded)


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
    with fresh_copy(base_store, tmp_path) as path:
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
@given(entry=st.binary(max_size=40))
def test_hostile_index_entry_never_reads_as_other_data(
    tmp_path: Path, base_store: Path, entry: bytes
) -> None:
    with fresh_copy(base_store, tmp_path) as path:
        with Store.open(path) as store:
            digest = bytes.fromhex(store.manifest()["state"]["w"]["__tensor__"]["chunks"][0][0])
        put_raw(path, b"blobs", digest, entry)
        detected_or_intact(path, {1: base_committed()})


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(meta_value=st.binary(max_size=12) | st.integers(-3, 10**6).map(lambda n: b"%d" % n))
def test_hostile_format_version_is_refused_or_harmless(
    tmp_path: Path, base_store: Path, meta_value: bytes
) -> None:
    with fresh_copy(base_store, tmp_path) as path:
        put_raw(path, b"meta", b"format_version", meta_value)
        try:
            int(meta_value.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            with pytest.raises(StoreFormatError, match="malformed store metadata"):
                Store.open(path)
            return
        if int(meta_value.decode("ascii")) > FORMAT_VERSION:  # newer than this engram reads
            with pytest.raises(StoreFormatError, match="newer than"):
                Store.open(path)
            return
        if int(meta_value.decode("ascii")) < FORMAT_VERSION:  # but its records are sealed
            with pytest.raises(StoreFormatError, match="malformed store metadata"):
                Store.open(path)
            return
        # a number this engram reads: the data is untouched by it
        assert not detected_or_intact(path, {1: base_committed()})


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=200))
def test_garbage_checkpoint_file(tmp_path: Path, base_store: Path, data: bytes) -> None:
    with fresh_copy(base_store, tmp_path) as path:
        (path / "checkpoints" / "model-v0001.safetensors").write_bytes(data)
        with pytest.raises(CorruptionError):
            load_everything(path)


def test_garbage_lmdb_file(tmp_path: Path, base_store: Path) -> None:
    path = tmp_path / "s"
    shutil.copytree(base_store, path)
    (path / "memory.lmdb" / "data.mdb").write_bytes(b"\0" * 8192)
    with pytest.raises(EngramError):
        load_everything(path)


def slowly_changing(i: int) -> tuple[dict, dict]:
    """What version i + 1 of the compacted store commits."""
    w = torch.linspace(-1, 1, 4096)
    return {"w": w + i * 1e-6}, {"weight": w * (1 + i * 1e-6)}


@pytest.fixture(scope="module")
def compacted_store(tmp_path_factory) -> Path:
    """Three versions of slowly changing tensors, compacted: v1 and v2 are delta-coded."""
    path = tmp_path_factory.mktemp("compacted") / "store"
    with Store.open(path, mode="c") as store:
        for i in range(3):
            state, model = slowly_changing(i)
            store.commit(state, model=model)
        store.compact()
        assert store.info(1).compacted
    return path


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
    with fresh_copy(compacted_store, tmp_path) as path:
        with Store.open(path) as store:
            digest = bytes.fromhex(store.manifest(1)["state"]["w"]["__tensor__"]["chunks"][0][0])
        put_raw(path, b"blobs", digest, entry)
        detected_or_intact(path, {i + 1: slowly_changing(i) for i in range(3)})


def test_cyclic_delta_chain_is_corruption(tmp_path: Path, compacted_store: Path) -> None:
    from engram.store.blobs import EncodedBlob, decode_entry

    path = tmp_path / "s"
    shutil.copytree(compacted_store, path)
    with Store.open(path) as store:
        digest = bytes.fromhex(store.manifest(1)["state"]["w"]["__tensor__"]["chunks"][0][0])
        with store.env.read() as txn:
            entry = decode_entry(store.env.get(txn, b"blobs", digest), digest.hex())
    assert isinstance(entry, EncodedBlob) and entry.base is not None
    put_raw(path, b"blobs", digest, EncodedBlob(**{**entry.__dict__, "base": digest}).encode())
    with Store.open(path) as store:
        with pytest.raises(EngramError, match="chain"):
            store.load(1)
        assert not store.verify(all=True).ok
        store.load()  # HEAD does not depend on it


# ------------------------------------------------------- random byte flips in real data


def flipped(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    """``data`` with the byte at each ``position % len`` XORed with a non-zero mask."""
    out = bytearray(data)
    masks = {}  # one mask per position: two flips of one byte could cancel out
    for position, mask in flips:
        masks.setdefault(position % len(out), mask)
    for position, mask in masks.items():
        out[position] ^= mask
    return bytes(out)


byte_flips = st.lists(st.tuples(st.integers(0, 2**20), st.integers(1, 255)), min_size=1,
                      max_size=3)  # fmt: skip


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(flips=byte_flips, which=st.integers(0, 10**6))
def test_flipped_bytes_in_delta_entries(
    tmp_path: Path, compacted_store: Path, flips: list[tuple[int, int]], which: int
) -> None:
    """Real delta index entries, bytes flipped and re-sealed (so what is tested is the
    entry's own validation): every version reads back exactly or fails as corruption."""
    from engram.store.blobs import EncodedBlob, decode_entry

    with Store.open(compacted_store) as store, store.env.read() as txn:
        coded = sorted(store._blobs.encoded_digests(txn))
        digest = coded[which % len(coded)]
        entry = bytes(store.env.get(txn, b"blobs", digest))
    assert isinstance(decode_entry(entry, digest.hex()), EncodedBlob)
    with fresh_copy(compacted_store, tmp_path) as path:
        put_raw(path, b"blobs", digest, flipped(entry, flips))
        detected_or_intact(path, {i + 1: slowly_changing(i) for i in range(3)})


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(flips=byte_flips, which=st.integers(0, 10**6))
def test_flipped_bytes_in_delta_frames(
    tmp_path: Path, compacted_store: Path, flips: list[tuple[int, int]], which: int
) -> None:
    """The zstd frames themselves, flipped in the pack file on disk: always detected."""
    from engram.store.blobs import decode_entry
    from engram.store.packs import pack_name

    with Store.open(compacted_store) as store, store.env.read() as txn:
        coded = sorted(store._blobs.encoded_digests(txn))
        digest = coded[which % len(coded)]
        entry = decode_entry(store.env.get(txn, b"blobs", digest), digest.hex())
    with fresh_copy(compacted_store, tmp_path) as path:
        pack = path / "blobs" / pack_name(entry.pack)
        data = bytearray(pack.read_bytes())
        frame = data[entry.offset : entry.offset + entry.stored_nbytes]
        data[entry.offset : entry.offset + entry.stored_nbytes] = flipped(bytes(frame), flips)
        pack.write_bytes(bytes(data))
        assert detected_or_intact(path, {i + 1: slowly_changing(i) for i in range(3)})


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(flips=st.lists(st.tuples(st.integers(0, 2**12), st.integers(1, 255)), min_size=1,
                      max_size=3))  # fmt: skip
def test_flipped_bytes_in_checkpoint_headers(
    tmp_path: Path, base_store: Path, flips: list[tuple[int, int]]
) -> None:
    """A checkpoint's safetensors header, flipped: loads fail on the file's hash, and the
    header parser compaction and export use (which runs before any hash) either refuses
    it or returns spans that satisfy safetensors' invariants."""
    from engram.store.checkpoint import checkpoint_spans

    with fresh_copy(base_store, tmp_path) as path:
        file = path / "checkpoints" / "model-v0001.safetensors"
        data = file.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = flipped(data[: 8 + n], flips)  # the length and the JSON header
        file.write_bytes(header + data[8 + n :])
        assert detected_or_intact(path, {1: base_committed()})
        try:
            spans, metadata = checkpoint_spans(file)
        except CorruptionError:
            return
        at = 8 + int.from_bytes(file.read_bytes()[:8], "little")
        for span in spans:  # they tile the data section, each as big as its shape says
            assert span.offset == at
            assert span.nbytes == math.prod(span.shape) * getattr(torch, span.dtype).itemsize
            at += span.nbytes
        assert at == file.stat().st_size
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())


def _header_file(path: Path, header: dict, data: bytes, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "length", "match"),
    [
        ({}, b"", 2**63, "exceeds the 100 MB cap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), None,
         "overlaps another or leaves a gap"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), None,
         "overlaps another or leaves a gap"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), None,
         "4 bytes after the last tensor"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), None,
         "its shape needs 12"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), None,
         "cannot compact tensor 'a'"),
        ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8), None,
         "cannot compact tensor 'a'"),
        ({"__metadata__": {"k": 1}}, b"", None, "not a map of strings"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 2**70]}}, bytes(8), None,
         "lies outside the file"),
    ],
)  # fmt: skip
def test_checkpoint_header_parser_applies_safetensors_checks(
    tmp_path: Path, header: dict, data: bytes, length: int | None, match: str
) -> None:
    from engram.store.checkpoint import checkpoint_spans

    with pytest.raises(CorruptionError, match=match):
        checkpoint_spans(_header_file(tmp_path / "x.safetensors", header, data, length))


def test_checkpoint_header_parser_reads_what_torch_writes(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from engram.store.checkpoint import checkpoint_spans

    weights = {"w": torch.ones(3, 2), "e": torch.zeros(0), "b": torch.ones(5, dtype=torch.bfloat16)}
    save_file(weights, tmp_path / "m.safetensors", metadata={"k": "v"})
    spans, metadata = checkpoint_spans(tmp_path / "m.safetensors")
    assert {s.name: (s.dtype, s.shape) for s in spans} == {
        "w": ("float32", (3, 2)), "e": ("float32", (0,)), "b": ("bfloat16", (5,))
    }  # fmt: skip
    assert metadata == {"k": "v"}


def test_compaction_refuses_a_damaged_checkpoint_instead_of_laundering_it(
    tmp_path: Path,
) -> None:
    """Compaction re-hashes the weights it moves into blobs: a checkpoint damaged on disk
    must be reported, not turned into blobs that verify while its file is deleted."""
    path = tmp_path / "s"
    with Store.open(path, mode="c") as store:
        for i in range(3):
            state, model = slowly_changing(i)
            store.commit(state, model=model)
    victim = path / "checkpoints" / "model-v0001.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x40  # a weight's last byte: the header still parses
    victim.write_bytes(bytes(data))
    with Store.open(path, mode="w") as store:
        with pytest.raises(CorruptionError, match="v0001.*does not match its recorded hash"):
            store.compact()
        assert victim.exists()
        assert not store.info(1).compacted
        assert [p.message for p in store.verify(all=True).problems if p.version == 1]
        state, model = slowly_changing(2)
        assert same(store.load().model, model)
