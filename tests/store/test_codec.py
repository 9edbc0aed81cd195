"""The tensor/state codec: every dtype and shape round-trips; the bytes are pinned."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from engram.errors import CorruptionError, EncodingError
from engram.store import Store
from engram.store.codec import TORCH_DTYPES, checksum, encode_tree
from engram.store.format import (
    ARTIFACT_FORMAT_VERSION,
    CHUNK_BYTES,
    FORMAT_VERSION,
    PLAIN_FORMAT_VERSION,
    SEALED_FORMAT_VERSION,
)
from trees import assert_same_tree as assert_same


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs, denormals, -0.0 included) of any dtype."""
    gen = torch.Generator().manual_seed(seed)
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES.values(), key=str), ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 4)], ids=str)
def test_every_dtype_and_shape_round_trips(store: Store, dtype: torch.dtype, shape) -> None:
    tensor = random_tensor(dtype, shape, seed=len(shape))
    store.commit({"t": tensor, "nested": {"again": tensor}})
    loaded = store.load(verify=True).state
    assert_same(loaded, {"t": tensor, "nested": {"again": tensor}})


def test_non_contiguous_and_views_round_trip(store: Store) -> None:
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    state = {
        "transposed": base.t(),
        "strided": base[:, ::2],
        "offset": base[1:, 2:],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "conj": torch.tensor([1 + 2j, 3 - 4j]).conj(),
        "param": torch.nn.Parameter(torch.ones(2)),
    }
    store.commit(state)
    loaded = store.load().state
    for key in ("transposed", "strided", "offset", "expanded"):
        assert torch.equal(loaded[key], state[key]) and loaded[key].is_contiguous()
    assert torch.equal(loaded["conj"], state["conj"].resolve_conj())
    assert type(loaded["param"]) is torch.Tensor and torch.equal(loaded["param"], state["param"])


def test_python_values_keep_their_types(store: Store) -> None:
    state = {
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "momentum_buffer": torch.ones(2)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "nesterov": False}],
        },
        "rng": {
            "python": (3, tuple(range(5)), None),
            "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0),
        },
        "__dunder": 1,
        "floats": [float("inf"), -0.0, 1e-310, float("nan")],
        "big": 2**70,
        "np_scalar": np.float32(0.5),
        "empty": {},
    }
    store.commit(state)
    loaded = store.load().state
    expected = dict(state, np_scalar=0.5)
    assert_same(loaded, expected)


@settings(max_examples=60, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from(
            ["float32", "float64", "int64", "uint8", "bool", "float16", "int16", "complex64"]
        ),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    )
)
def test_hypothesis_numpy_arrays_round_trip(tmp_path_factory, arr: np.ndarray) -> None:
    path = tmp_path_factory.mktemp("s") / "store"
    with Store.open(path, mode="c") as store:
        store.commit({"array": arr, "tensor": torch.from_numpy(arr.copy())})
        loaded = store.load(verify=True).state
    assert_same(loaded["array"], arr)
    assert_same(loaded["tensor"], torch.from_numpy(arr.copy()))


def test_large_tensor_is_chunked(store: Store) -> None:
    n = CHUNK_BYTES // 4 * 2 + 5  # two full chunks and a short one
    tensor = torch.arange(n, dtype=torch.int32)
    store.commit({"big": tensor})
    record = store.manifest()["state"]["big"]["__tensor__"]
    assert [c[1] for c in record["chunks"]] == [CHUNK_BYTES, CHUNK_BYTES, 20]
    assert torch.equal(store.load().state["big"], tensor)


@pytest.mark.parametrize(
    "bad",
    [
        object(),
        {"k": {1, 2}},
        {"k": torch.ones(2).to_sparse()},
        {(1, 2): 3},
        {"k": np.array(["a"])},
    ],
    ids=["object", "set", "sparse", "tuple-key", "str-array"],
)
def test_unstorable_values_are_refused_with_their_path(store: Store, bad) -> None:
    state = bad if isinstance(bad, dict) else {"x": bad}
    with pytest.raises(EncodingError, match="cannot store"):
        store.commit(state)
    assert store.head is None


def test_golden_bytes() -> None:
    """Pins the format (version 3: sealed records; plain manifests are version 1,
    compacted ones 2; version 4 adds model artifact files and nothing else, so a store
    without one stays version 3): a change here breaks every existing store."""
    assert FORMAT_VERSION == 4 and PLAIN_FORMAT_VERSION == 1
    assert SEALED_FORMAT_VERSION == 3 and ARTIFACT_FORMAT_VERSION == 4
    assert CHUNK_BYTES == 16 * 2**20
    state = {
        "fisher": torch.tensor([1.0, -2.0]),
        "step": 3,
        "betas": (0.9, 0.999),
        "opt": {0: torch.tensor([True, False])},
        "h": torch.tensor([1.5], dtype=torch.bfloat16),
    }
    tree, pending = encode_tree(state)
    assert json.dumps(tree) == (
        '{"fisher": {"__tensor__": {"dtype": "float32", "shape": [2], "chunks": null}}, '
        '"step": 3, "betas": {"__tuple__": [0.9, 0.999]}, '
        '"opt": {"__map__": [[0, {"__tensor__": {"dtype": "bool", "shape": [2], "chunks": null}}]]}, '
        '"h": {"__tensor__": {"dtype": "bfloat16", "shape": [1], "chunks": null}}}'
    )
    raws = [bytes(p.raw) for p in pending]
    assert raws == [b"\x00\x00\x80?\x00\x00\x00\xc0", b"\x01\x00", b"\xc0?"]
    assert hashlib.sha256(raws[0]).hexdigest() == (
        "ee4ac73c2bd27756ab82780f27c73a7bc4d3f0bb6acb37e008bc27eccd7e588b"
    )
    assert [checksum(r) for r in raws] == [
        2927544937847011107,
        12363696039452112576,
        1366641732153415224,
    ]


def test_golden_record_seal() -> None:
    """Pins format 3's seal: payload, then XXH3-64(db NUL key payload), little-endian."""
    from engram.store.records import seal

    assert seal(b"refs", b"HEAD", b"7") == b"7" + bytes.fromhex("de7d40ea77dca884")


def test_golden_store_layout(store: Store) -> None:
    """The committed manifest names chunks by SHA-256 and the index entry is 32 bytes."""
    store.commit({"fisher": torch.tensor([1.0, -2.0])})
    chunks = store.manifest()["state"]["fisher"]["__tensor__"]["chunks"]
    assert chunks == [
        ["ee4ac73c2bd27756ab82780f27c73a7bc4d3f0bb6acb37e008bc27eccd7e588b", 8, 2927544937847011107]
    ]
    pack = store.path / "blobs" / "pack-00000001.bin"
    assert pack.read_bytes() == b"\x00\x00\x80?\x00\x00\x00\xc0"


def test_unknown_tag_in_manifest_is_corruption() -> None:
    from engram.store.codec import decode_tree

    with pytest.raises(CorruptionError, match="unknown tagged value"):
        decode_tree({"x": {"__pickle__": "cos\nsystem\n"}}, lambda r, p: None)


def test_golden_delta_coding() -> None:
    """Pins format version 2's encoded blobs: index entries and the delta transform."""
    import zstandard

    from engram.store.blobs import EncodedBlob, FileBlob, decode_entry
    from engram.store.delta import decode, encode

    base = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32).tobytes()
    target = bytes.fromhex("0100803f000000c00100003f00004040")  # last-place steps of 2 floats
    frame = encode(target, base, 4)
    # zigzag(target - base) per uint32 (+1 -> 2), then the 4 byte planes, low byte first
    assert zstandard.ZstdDecompressor().decompress(frame) == bytes([2, 0, 2, 0]) + bytes(12)
    golden = bytes.fromhex("28b52ffd2010550000200200020001001c2002")  # zstd may vary: pin decode
    assert decode(golden, base, 4, 16, "golden") == target
    keyframe = bytes.fromhex("28b52ffd20108100000100010000000000800000403fc03f40")
    assert decode(keyframe, None, 4, 16, "golden") == target
    entry = EncodedBlob(1, 4, hashlib.sha256(base).digest(), 3, 128, len(golden), 42, 16)
    raw = entry.encode()
    assert raw.hex() == (
        "44010401"  # "D", codec zstd, itemsize 4, has a base
        "0300000000000000" "8000000000000000" "1300000000000000"  # pack, offset, stored size
        "2a00000000000000" "1000000000000000"  # stored xxh3, decoded size
        "f8788ce138a2b6e54302c09bd3d5274cb2fc3ceca6425b02c788181d332edc6d"  # base SHA-256
    )  # fmt: skip
    assert decode_entry(raw, "x" * 64) == entry
    served = FileBlob("model-v0002.safetensors", 96, 16, 7)
    assert served.encode() == (
        b"F" + (96).to_bytes(8, "little") + (16).to_bytes(8, "little")
        + (7).to_bytes(8, "little") + b"model-v0002.safetensors"
    )  # fmt: skip
    assert decode_entry(served.encode(), "x" * 64) == served
    with pytest.raises(CorruptionError):
        decode_entry(b"F" + bytes(24) + b"../../etc/passwd", "x" * 64)
