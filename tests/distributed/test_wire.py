"""engram.distributed without torchrun: the wire format (pack/unpack), a rank's
LocalSamples, and the collective steps on a real 2-rank gloo group.

The multi-rank cases share one pair of spawned processes (each imports torch: seconds):
both ranks run every step of ``SCENARIO`` in order and report each step's outcome
(its value, or the exception it raised) to the parent, which asserts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from engram import distributed
from engram.distributed import DistributedError, PeerFailed, World, reduce, sync, wire
from engram.distributed.state import (
    LocalSamples,
    map_sample_ids,
    records_tree,
    sample_ids_in,
    split_records,
)
from engram.errors import CommitError, CorruptionError, EncodingError, StoreLockedError
from engram.store import Store
from engram.store.codec import Encoded, SampleIds, SharedArrays, encode_tree
from engram.store.format import CHUNK_BYTES
from engram.training.checkpointer import Checkpointer
from helpers import two_ranks

# A rank blocks at most this long in a collective (gloo's timeout); the parent waits at
# most RANKS_DEADLINE_S for both ranks, so a broken step fails the tests, never hangs.
GLOO_TIMEOUT_S = 60.0
RANKS_DEADLINE_S = 150.0
# How long rank 0 waits, inside a commit, for rank 1 to say its part is sent.
SENT_DEADLINE_S = 20.0


# ------------------------------------------------------------------ comparison


def _raw(t: torch.Tensor) -> bytes:
    t = t.as_subclass(torch.Tensor).detach().resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def difference(a: Any, b: Any, path: str = "/") -> str | None:
    """Where ``a`` and ``b`` first differ (types exactly, floats and arrays bit for bit),
    or None. Runs in the ranks too, so it returns a description instead of asserting."""
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        return None if _raw(a) == _raw(b) else f"{path}: values differ"
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        return None if a.tobytes() == b.tobytes() else f"{path}: values differ"
    if isinstance(a, dict):
        if [(type(k), k) for k in a] != [(type(k), k) for k in b]:  # True is not 1
            return f"{path}: keys {list(a)!r} != {list(b)!r}"
        pairs = [(a[k], b[k], f"{path}{k!r}/") for k in a]
    elif isinstance(a, list | tuple):
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}"
        pairs = [(x, y, f"{path}{i}/") for i, (x, y) in enumerate(zip(a, b, strict=True))]
    elif isinstance(a, float):  # NaN, -0.0 and the infinities compared bitwise
        return None if struct.pack("<d", a) == struct.pack("<d", b) else f"{path}: {a} != {b}"
    else:
        return None if a == b else f"{path}: {a!r} != {b!r}"
    for x, y, where in pairs:
        if (found := difference(x, y, where)) is not None:
            return found
    return None


# ------------------------------------------------------------------ trees


def make_tree() -> dict[str, Any]:
    """A state tree with every kind of leaf the wire carries (deterministic: the ranks
    build it too)."""
    deep: Any = "bottom"
    for i in range(20):
        deep = {"level": i, "inner": [deep]}
    tensors = {
        "float32": torch.tensor([[1.5, -2.0], [math.nan, math.inf]]),
        "float64": torch.tensor([-0.0, 1e-300, -math.inf], dtype=torch.float64),
        "float16": torch.tensor([0.1, 65504.0], dtype=torch.float16),
        "bfloat16": torch.tensor([1.0, -2.5, math.nan, 3e38], dtype=torch.bfloat16),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "uint8": torch.arange(256, dtype=torch.uint8),
        "int64": torch.tensor([-(2**63), 2**63 - 1]),
        "bool": torch.tensor([[True, False, True]]),
        "complex64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64).conj(),
        "transposed": torch.arange(12, dtype=torch.int32).reshape(3, 4).t(),
        "empty": torch.zeros(0, 3),
        "empty_bf16": torch.empty(2, 0, dtype=torch.bfloat16),
        "zero_d": torch.tensor(3.25, dtype=torch.float64),
        "zero_d_bool": torch.tensor(True),
    }
    if hasattr(torch, "float8_e4m3fn"):
        tensors["float8_e4m3fn"] = torch.tensor([0.5, -1.0]).to(torch.float8_e4m3fn)
    return {
        "scalars": [None, True, False, 0, -7, 2**70, 1.5, -0.0, math.nan, math.inf, -math.inf],
        "strings": ["", "épée ✓", "nul\x00byte", '"quoted" \\ back'],
        "keys": {
            7: "int",
            2.5: "float",
            None: "none",
            False: "bool",
            -math.inf: "ninf",
            "__tensor__": "a tag as a key",
            "plain": "str",
        },
        "str_keys": {"a": 1, "b": {"c": [1, 2]}},
        "tuple": (1, ("nested", []), {}, ()),
        "tensors": tensors,
        "ndarrays": [
            np.arange(6, dtype=np.int16).reshape(2, 3),
            np.array([], dtype=np.float64),
            np.array(2.0, dtype=np.float32),
            np.array([True, False]),
            np.array([[1 + 1j]], dtype=np.complex128),
            np.arange(10, dtype=np.uint64)[::3],
        ],
        "slots": SampleIds.of([3, -1, 7]),
        "no_slots": SampleIds.of([]),
        "deep": deep,
        "empty_dict": {},
        "empty_list": [],
    }


def _rank_tree(rank: int) -> dict[str, Any]:
    return {
        "rank": rank,
        "rng": {"torch": torch.arange(4, dtype=torch.uint8) + rank, "python": (3, (rank,))},
        "slots": SampleIds.of([-1 - rank, 10 + rank]),
        "loss": (rank / 3, math.nan),
        "bf16": torch.full((2, 3), rank + 0.5, dtype=torch.bfloat16),
        "none": None,
    }


def _frame(header: bytes, tail: bytes = b"") -> torch.Tensor:
    """A packed-state layout around an arbitrary header: 8-byte length, header, tail."""
    data = struct.pack("<Q", len(header)) + header + tail
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _header(packed: torch.Tensor) -> Any:
    raw = packed.numpy().tobytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def _unpack_or_corrupt(data: torch.Tensor) -> None:
    """unpack either returns a tree or raises CorruptionError: nothing else escapes."""
    with contextlib.suppress(CorruptionError):
        wire.unpack(data)


# ------------------------------------------------------------------ pack / unpack


def test_pack_unpack_round_trips_a_nested_state_tree() -> None:
    tree = make_tree()
    packed = wire.pack(tree)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert difference(wire.unpack(packed), make_tree()) is None


def test_unpacked_sample_ids_are_sample_ids_and_other_tensors_are_plain() -> None:
    out = wire.unpack(wire.pack(make_tree()))
    assert type(out["slots"]) is SampleIds and out["slots"].tolist() == [3, -1, 7]
    assert type(out["no_slots"]) is SampleIds and out["no_slots"].shape == (0,)
    assert all(type(t) is torch.Tensor for t in out["tensors"].values())
    assert type(out["tuple"]) is tuple and type(out["tuple"][1]) is tuple
    assert type(out["keys"]) is dict and list(out["keys"]) == list(make_tree()["keys"])


def test_packed_bytes_are_a_json_header_and_raw_arrays_never_a_pickle() -> None:
    packed = wire.pack({"slots": SampleIds.of([5]), "w": torch.tensor([1.0]), "t": (1,)})
    raw = packed.numpy().tobytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert _header(packed) == {
        "slots": {"__samples__": {"dtype": "int64", "shape": [1], "chunks": [["0" * 64, 8, 0]]}},
        "w": {"__tensor__": {"dtype": "float32", "shape": [1], "chunks": [["0" * 64, 4, 0]]}},
        "t": {"__tuple__": [1]},
    }
    assert raw[8 + n :] == struct.pack("<q", 5) + struct.pack("<f", 1.0)


def test_unpacked_arrays_are_writable_copies_independent_of_the_packed_bytes() -> None:
    packed = wire.pack({"t": torch.tensor([1.0, 2.0]), "a": np.array([3, 4], dtype=np.int32)})
    out = wire.unpack(packed)
    packed.fill_(0)
    assert out["t"].tolist() == [1.0, 2.0] and out["a"].tolist() == [3, 4]
    out["t"] += 1  # writable: a tensor the receiving rank may load in place
    out["a"][0] = 9
    assert out["t"].tolist() == [2.0, 3.0] and out["a"].tolist() == [9, 4]


def test_numpy_scalars_and_big_endian_arrays_come_back_as_native_values() -> None:
    out = wire.unpack(
        wire.pack({"f": np.float32(1.5), "i": np.int64(-3), "be": np.arange(4, dtype=">i4")})
    )
    assert type(out["f"]) is float and out["f"] == 1.5
    assert type(out["i"]) is int and out["i"] == -3
    assert out["be"].dtype == np.dtype("int32") and out["be"].tolist() == [0, 1, 2, 3]


def test_a_tensor_larger_than_one_chunk_round_trips() -> None:
    big = torch.arange(CHUNK_BYTES + 5, dtype=torch.int64).to(torch.uint8)
    packed = wire.pack({"big": big})
    assert len(_header(packed)["big"]["__tensor__"]["chunks"]) == 2
    assert torch.equal(wire.unpack(packed)["big"], big)


@pytest.mark.parametrize(
    "value",
    [object(), {("tuple", "key"): 1}, torch.eye(2).to_sparse(), np.array(["str"])],
    ids=["object", "tuple-key", "sparse", "str-array"],
)
def test_pack_refuses_what_the_store_codec_cannot_encode(value: Any) -> None:
    with pytest.raises(EncodingError):
        wire.pack({"x": value})


def test_unpack_refuses_every_truncation_of_a_packed_tree() -> None:
    raw = wire.pack(make_tree()).numpy().tobytes()
    for n in range(len(raw)):
        with pytest.raises(CorruptionError):
            wire.unpack(torch.frombuffer(bytearray(raw[:n]), dtype=torch.uint8) if n else
                        torch.zeros(0, dtype=torch.uint8))  # fmt: skip


@pytest.mark.parametrize("extra", [b"\x00", b" ", b"\x00" * 8, b"{}"])
def test_unpack_refuses_bytes_after_the_arrays(extra: bytes) -> None:
    raw = wire.pack(make_tree()).numpy().tobytes() + extra
    with pytest.raises(CorruptionError, match="after its arrays"):
        wire.unpack(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


def _record(kind: str, dtype: str, shape: list, chunks: list) -> bytes:
    return json.dumps({kind: {"dtype": dtype, "shape": shape, "chunks": chunks}}).encode()


_HOSTILE = {
    "shorter-than-length": torch.tensor([1, 0, 0], dtype=torch.uint8),
    "length-beyond-data": _frame(b"{}")[:9],
    "huge-length": torch.frombuffer(bytearray(b"\xff" * 8 + b"{}"), dtype=torch.uint8),
    "empty-header": _frame(b""),
    "not-json": _frame(b"{not json"),
    "not-utf8": _frame(b"\xff\xfe\x00"),
    "huge-int": _frame(b"1" * 5000),
    "unknown-tag": _frame(b'{"__pickle__": "cos\\nsystem"}'),
    "tag-beside-key": _frame(b'{"__tuple__": [], "x": 1}'),
    "tuple-not-list": _frame(b'{"__tuple__": 3}'),
    "map-pair-not-pair": _frame(b'{"__map__": [[1]]}'),
    "map-key-list": _frame(b'{"__map__": [[[1], 2]]}'),
    "bad-dtype": _frame(_record("__tensor__", "object", [1], [["0" * 64, 8, 0]]), b"\x00" * 8),
    "negative-shape": _frame(_record("__tensor__", "uint8", [-1], [])),
    "float-shape": _frame(_record("__tensor__", "uint8", [1.0], [["0" * 64, 1, 0]]), b"\x00"),
    "wrong-chunk-count": _frame(_record("__tensor__", "uint8", [4], []), b"\x00" * 4),
    "wrong-chunk-size": _frame(
        _record("__tensor__", "uint8", [4], [["0" * 64, 3, 0]]), b"\x00" * 4
    ),
    "bad-digest": _frame(_record("__tensor__", "uint8", [1], [["zz", 1, 0]]), b"\x00"),
    "array-past-end": _frame(_record("__tensor__", "float32", [4], [["0" * 64, 16, 0]]), b"\x00"),
    "samples-2d": _frame(_record("__samples__", "int64", [1, 1], [["0" * 64, 8, 0]]), b"\x00" * 8),
    "samples-float": _frame(
        _record("__samples__", "float64", [1], [["0" * 64, 8, 0]]), b"\x00" * 8
    ),
    "ndarray-bfloat16": _frame(
        _record("__ndarray__", "bfloat16", [1], [["0" * 64, 2, 0]]), b"\x00" * 2
    ),
    "too-many-dims": _frame(_record("__tensor__", "uint8", [1] * 65, [["0" * 64, 1, 0]]), b"\x00"),
    "200-deep": _frame(b"[" * 200 + b"]" * 200),
}


@pytest.mark.parametrize("data", list(_HOSTILE.values()), ids=list(_HOSTILE))
def test_unpack_of_a_malformed_state_raises_corruption_error(data: torch.Tensor) -> None:
    with pytest.raises(CorruptionError):
        wire.unpack(data)


def test_unpack_of_a_deeply_nested_header_raises_corruption_error() -> None:
    with pytest.raises(CorruptionError):
        wire.unpack(_frame(b"[" * 5000 + b"]" * 5000))


@pytest.mark.parametrize(
    "kind,shape",
    [("__tensor__", [0, 2**70]), ("__ndarray__", [0, 2**70]), ("__ndarray__", [0, 2**40, 2**40])],
)
def test_unpack_of_a_zero_size_array_with_a_huge_dimension_raises_corruption_error(
    kind: str, shape: list[int]
) -> None:
    with pytest.raises(CorruptionError):
        wire.unpack(_frame(_record(kind, "float32", shape, [])))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_unpack_of_random_bytes_raises_only_corruption_error(data: bytes) -> None:
    _unpack_or_corrupt(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else
                       torch.zeros(0, dtype=torch.uint8))  # fmt: skip


_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8)
)
_RECORDS = st.builds(
    lambda kind, dtype, shape, chunks: {kind: {"dtype": dtype, "shape": shape, "chunks": chunks}},
    st.sampled_from(["__tensor__", "__ndarray__", "__samples__"]),
    st.sampled_from(["uint8", "int64", "float32", "bfloat16", "bool", "complex64", "nope"]),
    st.lists(st.integers(0, 4), max_size=3),
    st.lists(st.tuples(st.sampled_from(["0" * 64, "x"]), st.integers(0, 64), st.integers(0, 3))
             .map(list), max_size=2),
)  # fmt: skip
_JSON = st.recursive(
    _SCALARS | _RECORDS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["a", "__tuple__", "__map__", "__tensor__"]) | st.text(max_size=4),
            inner,
            max_size=3,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(_JSON, st.binary(max_size=64))
def test_unpack_of_a_random_header_raises_only_corruption_error(header: Any, tail: bytes) -> None:
    _unpack_or_corrupt(_frame(json.dumps(header).encode(), tail))


_SMALL_PACKED = wire.pack(
    {"slots": SampleIds.of([1, -2]), "w": torch.tensor([0.5, 2.0]), "k": {3: (None, "x")}}
).numpy().tobytes()  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, len(_SMALL_PACKED) - 1), st.integers(1, 255)),
        min_size=1,
        max_size=4,
    )
)
def test_unpack_of_a_packed_tree_with_flipped_bytes_raises_only_corruption_error(
    flips: list[tuple[int, int]],
) -> None:
    data = bytearray(_SMALL_PACKED)
    for at, mask in flips:
        data[at] ^= mask
    _unpack_or_corrupt(torch.frombuffer(data, dtype=torch.uint8))


# ------------------------------------------------------------------ LocalSamples


def test_local_samples_append_gives_consecutive_negative_ids() -> None:
    samples = LocalSamples()
    assert samples.append([b"a", b"b", b"c"]) == [-1, -2, -3]
    assert samples.append([]) == []
    assert samples.append([memoryview(b"d")]) == [-4]
    assert samples.records == {-1: b"a", -2: b"b", -3: b"c", -4: b"d"}
    assert all(type(r) is bytes for r in samples.records.values())


def test_local_samples_read_returns_the_records_in_the_order_asked() -> None:
    samples = LocalSamples()
    samples.append([b"ab", b"cd", b"ef"])
    out = samples.read([-3, -1, -3], record_size=2)
    assert out.dtype == np.uint8 and out.shape == (3, 2)
    assert out.tobytes() == b"efabef"
    assert samples.read(torch.tensor([-2]), 2).tobytes() == b"cd"
    assert samples.read([], 2).shape == (0, 2)


@pytest.mark.parametrize("ids,size", [([-1, 5], 2), ([-4], 2), ([-1], 3)])
def test_local_samples_read_of_an_unknown_id_or_size_raises_corruption_error(
    ids: list[int], size: int
) -> None:
    samples = LocalSamples()
    samples.append([b"ab", b"cd"])
    with pytest.raises(CorruptionError, match="missing"):
        samples.read(ids, size)


def _replay_part(slots: list[int]) -> dict[str, Any]:
    return {"rng": {"torch": torch.tensor([1, 2, 3], dtype=torch.uint8)},
            "plugins": {"replay": {"slots": SampleIds.of(slots), "seen": len(slots)},
                        "ewc": {"fisher_diag": [torch.tensor([-1, -2])]}}}  # fmt: skip


def test_stage_sends_only_new_samples_and_translates_committed_ids() -> None:
    samples = LocalSamples()
    samples.append([b"a", b"bb", b"ccc"])
    staged, new = samples.stage(_replay_part([-3, -1]))
    assert type(staged["plugins"]["replay"]["slots"]) is SampleIds
    assert staged["plugins"]["replay"]["slots"].tolist() == [-3, -1]  # nothing committed yet
    assert split_records(new) == ([-3, -1], [b"ccc", b"a"])
    samples.committed(new["ids"], torch.tensor([1000, 1001]))
    assert samples.store_id == {-3: 1000, -1: 1001}

    samples.append([b"dddd"])  # -4
    staged, new = samples.stage(_replay_part([-1, -4, 77, -3]))
    assert staged["plugins"]["replay"]["slots"].tolist() == [1001, -4, 77, 1000]
    assert split_records(new) == ([-4], [b"dddd"])
    assert samples.read([-1], 1).tobytes() == b"a"  # committed samples stay readable


def test_stage_forgets_evicted_samples() -> None:
    samples = LocalSamples()
    samples.append([b"a", b"b", b"c"])
    _, new = samples.stage(_replay_part([-1, -3]))
    samples.committed(new["ids"], torch.tensor([10, 11]))
    samples.stage(_replay_part([-3]))  # -1 evicted after its commit, -2 before any
    assert samples.records == {-3: b"c"}
    assert samples.store_id == {-3: 11}
    with pytest.raises(CorruptionError):
        samples.read([-2], 1)


def test_stage_leaves_the_part_and_other_tensors_untouched() -> None:
    samples = LocalSamples()
    samples.append([b"a"])
    _, new = samples.stage(_replay_part([-1]))
    samples.committed(new["ids"], torch.tensor([5]))
    part = _replay_part([-1])
    staged, new = samples.stage(part)
    assert part["plugins"]["replay"]["slots"].tolist() == [-1]  # the buffer keeps its ids
    assert staged["plugins"]["replay"]["slots"].tolist() == [5]
    assert staged["plugins"]["ewc"]["fisher_diag"][0].tolist() == [-1, -2]  # not sample ids
    assert difference(staged["rng"], part["rng"]) is None
    assert split_records(new) == ([], [])


def test_committed_maps_provisional_ids_to_store_ids() -> None:
    samples = LocalSamples()
    samples.append([b"a", b"b"])
    samples.committed(torch.tensor([-2, -1]), torch.tensor([40, 41]))
    samples.committed(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64))
    assert samples.store_id == {-2: 40, -1: 41}


def test_load_replaces_the_records_with_the_store_ids_a_restored_state_references() -> None:
    samples = LocalSamples()
    samples.append([b"old"])
    samples.committed(torch.tensor([-1]), torch.tensor([3]))
    samples.load([1000, 1002], [b"xy", b"zw"])
    assert samples.records == {1000: b"xy", 1002: b"zw"}
    assert samples.store_id == {}
    assert samples.read([1002, 1000], 2).tobytes() == b"zwxy"
    with pytest.raises(CorruptionError):
        samples.read([-1], 3)
    assert samples.append([b"new"]) == [-2]  # provisional ids never reuse an earlier one


@pytest.mark.parametrize(
    "ids,records",
    [([], []), ([-1], [b""]), ([-2, 7, -9], [b"abc", b"", b"\x00" * 300])],
    ids=["none", "one-empty", "mixed"],
)
def test_records_tree_and_split_records_round_trip_over_the_wire(
    ids: list[int], records: list[bytes]
) -> None:
    tree = records_tree(ids, records)
    assert tree["ids"].dtype == tree["sizes"].dtype == torch.int64
    assert tree["bytes"].dtype == torch.uint8
    assert split_records(wire.unpack(wire.pack(tree))) == (ids, records)


def test_map_sample_ids_rewrites_only_sample_ids_and_keeps_the_structure() -> None:
    tree = {"a": [SampleIds.of([3, 1]), (SampleIds.of([2, 3]), torch.tensor([9]))], "n": 1}
    out = map_sample_ids(tree, lambda t: t * 10)
    assert type(out["a"]) is list and type(out["a"][1]) is tuple
    assert type(out["a"][0]) is SampleIds and out["a"][0].tolist() == [30, 10]
    assert out["a"][1][0].tolist() == [20, 30] and out["a"][1][1].tolist() == [9]
    assert type(out["a"][1][1]) is torch.Tensor and out["n"] == 1
    assert sample_ids_in(tree) == [1, 2, 3]
    assert sample_ids_in({"x": torch.tensor([5])}) == []


def test_map_sample_ids_keeps_sequences_of_scalars_and_finds_ids_beside_them() -> None:
    """Python's RNG state (a tuple of 625 ints) is in every part: kept as it is, not
    walked item by item; a list of scalars comes back as a new list."""
    rng = (3, tuple(range(625)), None)
    scalars = [1, 2.5, "a", None, True]
    tree = {"rng": rng, "xs": scalars, "mixed": (1, SampleIds.of([4])), "nested": [[7, 8]]}
    out = map_sample_ids(tree, lambda t: t + 1)
    assert out["rng"] == rng and type(out["rng"][1]) is tuple
    assert out["xs"] == scalars and out["xs"] is not scalars
    assert [type(v) for v in out["xs"]] == [int, float, str, type(None), bool]
    assert out["mixed"][0] == 1 and out["mixed"][1].tolist() == [5]
    assert out["nested"] == [[7, 8]] and out["nested"][0] is not tree["nested"][0]


# ------------------------------------------------------------------ a single process


def test_world_outside_a_process_group_is_one_rank() -> None:
    assert not dist.is_initialized()
    w = distributed.world()
    assert w == World(0, 1, None) and w.is_main
    assert list(w.shard(3)) == [0, 1, 2]
    assert list(World(1, 3).shard(8)) == [1, 4, 7]


@pytest.mark.parametrize("size,expected", [(None, False), ("1", False), ("2", True)])
def test_launched_reads_the_launchers_world_size(
    monkeypatch: pytest.MonkeyPatch, size: str | None, expected: bool
) -> None:
    if size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", size)
    assert distributed.launched() is expected


def test_reductions_on_one_rank_leave_values_as_they_are() -> None:
    w = World()
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, -1.0])
    grad = p.grad
    reduce.average_gradients([p], w)
    assert p.grad is grad
    t = torch.tensor([1.0, 2.0])
    assert reduce.average(t, w) is t
    assert reduce.sum_counts([1, 2], w) == [1, 2]
    assert reduce.sum_tensors({"a": t}, w)["a"] is t
    reduce.broadcast_module(torch.nn.Linear(1, 1), w)


# ------------------------------------------------------------------ two ranks
# Steps run in this order on both ranks; each returns plain values (or raises) for the
# parent. ``ctx`` carries one rank's objects from step to step (its LocalSamples, rank
# 0's sample table).


class SampleTable:
    """Rank 0's sample table interface (``append(records) -> ids``), in memory; ids
    from 1000 as a store's would continue."""

    def __init__(self) -> None:
        self.records: dict[int, bytes] = {}
        self.appends: list[list[bytes]] = []
        self.reads: list[list[int]] = []

    def append(self, records: list[bytes]) -> list[int]:
        start = 1000 + len(self.records)
        ids = list(range(start, start + len(records)))
        self.records.update(zip(ids, map(bytes, records), strict=True))
        self.appends.append([bytes(r) for r in records])
        return ids

    def read(self, ids: list[int]) -> list[bytes]:
        self.reads.append(list(ids))
        return [self.records[i] for i in ids]


class _Snapshot:
    """Not packable: only what ``agree``'s ``share`` makes of it crosses the wire."""

    def __init__(self, version: int) -> None:
        self.version = version


def _never(*args: Any) -> Any:
    raise AssertionError("called on a rank where it must not be")


def _grads(rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    return {"weight": torch.randn(3, 4, generator=gen), "bias": torch.randn(3, generator=gen),
            "unused": torch.randn(2, 2, generator=gen), "frozen": torch.randn(2, generator=gen)}  # fmt: skip


def _stored_state() -> dict[str, Any]:
    """HEAD of a 2-rank run: rank 0's state plus rank 1's part (samples from commits)."""
    return {"rng": {"torch": torch.tensor([0], dtype=torch.uint8)},
            "plugins": {"replay": {"slots": SampleIds.of([7])}},
            "clock": {"iteration": 12}, "model_spec": ("mlp", 3),
            "ranks": [{"rng": {"torch": torch.tensor([1], dtype=torch.uint8)},
                       "plugins": {"replay": {"slots": SampleIds.of([1002, 1000])}}}]}  # fmt: skip


def _stored_weights() -> dict[str, torch.Tensor]:
    return {"0.weight": torch.arange(6.0).reshape(2, 3),
            "0.bias": torch.tensor([0.5, -1], dtype=torch.bfloat16)}  # fmt: skip


def _part_of(state: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in state.items() if k != "ranks"}, **part}


def _step_world(w: World, ctx: dict) -> Any:
    return {"rank": w.rank, "size": w.size, "is_main": w.is_main, "shard": list(w.shard(5)),
            "group": w.group, "cached": distributed.world() is w}  # fmt: skip


def _step_broadcast(w: World, ctx: dict) -> Any:
    tree = make_tree()
    got = wire.broadcast(tree if w.is_main else None, 0, w.group)
    return got is tree if w.is_main else difference(got, make_tree())


def _step_broadcast_without_waiting(w: World, ctx: dict) -> Any:
    """Two broadcasts rank 0 does not wait for (one over a frame), then a send: rank 1
    gets all three in order; rank 0 has nothing in flight afterwards."""
    big = {"x": torch.arange(wire.FRAME, dtype=torch.uint8)}
    if w.is_main:
        wire.broadcast({"n": 1}, 0, w.group, wait=False)
        wire.broadcast(big, 0, w.group, wait=False)
        in_flight = len(wire._in_flight)
        wire.send({"n": 3}, 1, w.group)
        return {"in_flight": in_flight, "after": len(wire._in_flight)}
    got = [wire.broadcast(None, 0, w.group), wire.broadcast(None, 0, w.group),
           wire.recv(0, w.group)]  # fmt: skip
    return [got[0], difference(got[1], big), got[2]]


def _step_broadcast_from_rank_1(w: World, ctx: dict) -> Any:
    tree = _rank_tree(1)
    got = wire.broadcast(tree if w.rank == 1 else None, 1, w.group)
    return got is tree if w.rank == 1 else difference(got, _rank_tree(1))


def _step_gather(w: World, ctx: dict) -> Any:
    got = wire.gather(_rank_tree(w.rank), w.group)
    if got is None:
        return None
    return {"n": len(got), "diffs": [difference(g, _rank_tree(r)) for r, g in enumerate(got)],
            "slots_types": [type(g["slots"]).__name__ for g in got]}  # fmt: skip


def _sized_tree(total: int, rank: int) -> dict[str, Any]:
    """A tree that packs to exactly ``total`` bytes (a uint8 array filled with ``rank``)."""
    n = total
    while (size := wire.pack({"x": torch.full((n,), rank, dtype=torch.uint8)}).numel()) != total:
        n -= size - total
    return {"x": torch.full((n,), rank, dtype=torch.uint8)}


#: Payload sizes around the first message's end, and one of several messages' worth.
FRAME_SIZES = (wire.FRAME - 8, wire.FRAME - 7, 3 * wire.FRAME + 5)


def _step_framing(w: World, ctx: dict) -> Any:
    """Broadcast from rank 0 and send to rank 0, at each of FRAME_SIZES."""
    out = []
    for total in FRAME_SIZES:
        got = wire.broadcast(_sized_tree(total, 0) if w.is_main else None, 0, w.group)
        out.append(difference(got, _sized_tree(total, 0)))
        gathered = wire.gather(_sized_tree(total, w.rank), w.group)
        if gathered is not None:
            out.append([difference(g, _sized_tree(total, r)) for r, g in enumerate(gathered)])
    return out


def _step_all_gather_bytes(w: World, ctx: dict) -> Any:
    return wire.all_gather_bytes([b"sha256:ab", b"\x00\x01\x00\x00"][w.rank], w.group)


def _step_all_gather_one_empty(w: World, ctx: dict) -> Any:
    return wire.all_gather_bytes([b"", b"xyz"][w.rank], w.group)


def _step_all_gather_all_empty(w: World, ctx: dict) -> Any:
    return wire.all_gather_bytes(b"", w.group)


def _step_sum_counts(w: World, ctx: dict) -> Any:
    return reduce.sum_counts([[3, 2**40 + 1, -7, 0], [4, 2**40, 7, 0]][w.rank], w)


def _step_sum_tensors(w: World, ctx: dict) -> Any:
    tensors = {"b": torch.tensor([1.0 + w.rank, 0.25], dtype=torch.float64),
               "a": torch.tensor([w.rank, 10])}  # fmt: skip
    before = dict(tensors)
    out = reduce.sum_tensors(tensors, w)
    return {"same_dict": out is tensors, "in_place": all(out[k] is before[k] for k in out),
            "a": out["a"].tolist(), "b": out["b"].tolist()}  # fmt: skip


def _step_average(w: World, ctx: dict) -> Any:
    t = torch.tensor([float(w.rank), 2.0 * w.rank + 1.0])
    out = reduce.average(t, w)
    return {"out": out.tolist(), "input": t.tolist(), "new": out is not t}


def _step_average_gradients(w: World, ctx: dict) -> Any:
    grads = _grads(w.rank)
    params = {k: torch.nn.Parameter(torch.zeros_like(g), requires_grad=k != "frozen")
              for k, g in grads.items()}  # fmt: skip
    for k, p in params.items():
        p.grad = None if (k == "unused" and w.rank == 1) else grads[k].clone()
    reduce.average_gradients(params.values(), w)
    return {k: None if p.grad is None else (p.grad.dtype == p.dtype, _raw(p.grad))
            for k, p in params.items()}  # fmt: skip


def _step_average_gradients_mixed_dtypes(w: World, ctx: dict) -> Any:
    params = [torch.nn.Parameter(torch.zeros(2)),
              torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]  # fmt: skip
    for p in params:
        p.grad = torch.full_like(p, 1.0 + w.rank)
    reduce.average_gradients(params, w)
    return [(str(p.grad.dtype), p.grad.tolist()) for p in params]


def _step_broadcast_module(w: World, ctx: dict) -> Any:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        for i, t in enumerate([*module.parameters(), *module.buffers()]):
            t.copy_(torch.arange(t.numel()).reshape(t.shape) * (1 + w.rank) + i)
    before = {k: v.tolist() for k, v in module.state_dict().items()}
    reduce.broadcast_module(module, w)
    return {"before": before, "after": {k: v.tolist() for k, v in module.state_dict().items()}}


def _step_agree(w: World, ctx: dict) -> Any:
    def read_head() -> Any:
        if not w.is_main:
            raise AssertionError("fn ran on rank 1")
        return {"head": "v3", "slots": SampleIds.of([4, 2])}

    got = sync.agree(w, "read the store's HEAD", read_head)
    return difference(got, {"head": "v3", "slots": SampleIds.of([4, 2])})


def _step_agree_share(w: World, ctx: dict) -> Any:
    got = sync.agree(w, "open the store", lambda: _Snapshot(7), share=lambda s: {"v": s.version})
    return [type(got).__name__, got.version if isinstance(got, _Snapshot) else got]


def _step_agree_fails(w: World, ctx: dict) -> Any:
    def open_store() -> Any:
        if not w.is_main:
            raise AssertionError("fn ran on rank 1")
        raise StoreLockedError("store runs/a is locked by pid 4121 on host x; stop that run")

    return sync.agree(w, "open the store", open_store)


def _step_same_config(w: World, ctx: dict) -> Any:
    return sync.same_config(w, "d" * 64)


def _step_same_config_differs(w: World, ctx: dict) -> Any:
    return sync.same_config(w, ["a" * 64, "b" * 64][w.rank])


def _commit(w: World, ctx: dict, slots: list[int], new_records: list[bytes],
            do_commit: Callable[[list | None], Any], gather: bool = True) -> Any:  # fmt: skip
    """One commit: rank 1 appends ``new_records`` and references ``slots``; rank 0
    commits with its table and ``do_commit`` (given the parts, or None without
    ``gather``: a commit that fails before it receives them)."""
    if w.is_main:
        table = ctx.setdefault("table", SampleTable())
        got: list = []
        appended = len(table.appends)

        def commit_parts(receive: Callable[[], list]) -> Any:
            if not gather:
                return do_commit(None)
            got.append(receive())
            return do_commit(got[-1])

        result = sync.commit(w, {"ignored": "rank 0's part is its own state"}, None, table,
                             commit_parts)  # fmt: skip
        (parts,) = got
        (part,) = [_decoded(p) for p in parts]
        slots_out = part["plugins"]["replay"]["slots"]
        return {"result": result, "appends": table.appends[appended:],
                "slots_type": type(slots_out).__name__, "slots": slots_out.tolist(),
                "rest": difference(part, _replay_part(slots_out.tolist()))}  # fmt: skip
    samples = ctx.setdefault("samples", LocalSamples())
    ids = samples.append(new_records)
    part = _replay_part(slots)
    ctx["last"] = {"ids": ids, "part": part}
    result = sync.commit(w, part, samples, None, _never)
    return {"result": result, "ids": ids, "store_id": dict(samples.store_id),
            "records": sorted(samples.records), "part_slots": part["plugins"]["replay"]["slots"].tolist()}  # fmt: skip


def _decoded(part: Encoded) -> Any:
    """A gathered part (encoded records) as the tree a version's reader gets."""
    return wire.unpack(wire.pack(part))


def _step_commit_first(w: World, ctx: dict) -> Any:
    return _commit(w, ctx, [-3, -1], [b"r1-a", b"r1-bb", b"r1-ccc"], lambda parts: "v1")


def _step_commit_second(w: World, ctx: dict) -> Any:
    return _commit(w, ctx, [-1, -4, -3], [b"r1-dddd"], lambda parts: "v2")


def _step_commit_fails(w: World, ctx: dict) -> Any:
    def disk_full(parts: list) -> Any:
        raise CommitError("no space left on device; free space and resume")

    try:
        return _commit(w, ctx, [-5, -1], [b"r1-e"], disk_full)
    finally:
        if not w.is_main:
            ctx["after_failed_commit"] = dict(ctx["samples"].store_id)


def _step_commit_state_after_failure(w: World, ctx: dict) -> Any:
    return ctx.get("after_failed_commit")


def _step_commit_fails_before_gathering(w: World, ctx: dict) -> Any:
    def locked(parts: list | None) -> Any:
        assert parts is None
        raise CommitError("the store is locked")

    return _commit(w, ctx, [-1], [b"r1-f"], locked, gather=False)


def _shared_part(rank: int) -> dict[str, Any]:
    """A part whose ``fisher`` is the same on both ranks (all-reduced), ``anchor`` and
    the RNG stream each rank's own, and ``extra`` only on rank 1."""
    part = {"rng": {"torch": torch.tensor([rank, 7], dtype=torch.uint8)},
            "plugins": {"ewc": {"fisher": torch.arange(3000, dtype=torch.float32),
                                "anchor": torch.full((3000,), float(rank))},
                        "replay": {"slots": SampleIds.of([])}}}  # fmt: skip
    if rank == 1:
        part["plugins"]["extra"] = [torch.ones(5, dtype=torch.float64)]
    return part


def _commit_shared(w: World, ctx: dict, do_commit: Callable[[list], Any]) -> Any:
    if w.is_main:
        own = _shared_part(0)
        got: list = []

        def commit_parts(receive: Callable[[], list]) -> Any:
            got.append(receive())
            return do_commit(got[-1])

        result = sync.commit(w, own, None, SampleTable(), commit_parts)
        ((part,),) = got
        # encoded as a store encodes a version: rank 0's own tensor, one record
        tree, _ = encode_tree({"own": own, "ranks": [part]}, SharedArrays())
        fisher = [
            t["plugins"]["ewc"]["fisher"]["__tensor__"] for t in (tree["own"], tree["ranks"][0])
        ]
        return {"result": result, "fisher_is_rank_0s": fisher[0] is fisher[1],
                "rest": difference(_decoded(part), _shared_part(1))}  # fmt: skip
    samples = ctx.setdefault("shared samples", LocalSamples())  # not the replay steps' own
    part = _shared_part(1)
    sends, send = [], wire.send
    wire.send = lambda tree, *args, **kwargs: (sends.append(tree), send(tree, *args, **kwargs))
    try:
        result = sync.commit(w, part, samples, None, _never)
    finally:
        wire.send = send
    return {"result": result, "unchanged": difference(part, _shared_part(1)),
            "sends": len(sends), "whole": sorted(samples.whole)}  # fmt: skip


def _step_commit_shared_first(w: World, ctx: dict) -> Any:
    return _commit_shared(w, ctx, lambda parts: "v-first")


def _step_commit_shared_again(w: World, ctx: dict) -> Any:
    return _commit_shared(w, ctx, lambda parts: "v-again")


def _step_commit_shared_fails(w: World, ctx: dict) -> Any:
    ctx["shared samples"] = LocalSamples()  # a new process: a second round again

    def disk_full(parts: list) -> Any:
        raise CommitError("no space left on device")

    return _commit_shared(w, ctx, disk_full)


def _step_commit_after_failures(w: World, ctx: dict) -> Any:
    """The group is still in step: rank 1's parts of the failed commits were drained."""
    return _commit(w, ctx, [-1], [b"r1-g"], lambda parts: "v3")


def _wait_for(path: Path, deadline_s: float) -> bool:
    """Whether ``path`` appears within ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while not path.exists():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def _step_commit_part_sent_before_the_gather(w: World, ctx: dict) -> Any:
    """Rank 0 asks for the parts only after a while in its commit (as ``Store.commit``
    does, after encoding its own state): rank 1's send has completed by then, because
    rank 0 posted the receive as the commit began. Rank 1 says so with a file."""
    sent = ctx["dir"] / "rank 1 sent its part"
    if w.is_main:
        before: list[bool] = []

        def commit_parts(receive: Callable[[], list]) -> Any:
            before.append(_wait_for(sent, SENT_DEADLINE_S))
            return len(receive())

        return {"result": sync.commit(w, {}, None, SampleTable(), commit_parts),
                "sent before the gather": before}  # fmt: skip
    send = wire.send

    def send_and_say(tree: Any, *args: Any, **kwargs: Any) -> None:
        send(tree, *args, **kwargs)
        sent.touch()

    wire.send = send_and_say
    try:
        return sync.commit(w, _replay_part([]), LocalSamples(), None, _never)
    finally:
        wire.send = send


def _step_commit_hostile_part(w: World, ctx: dict) -> Any:
    """Rank 1 sends its own message: a digest whose path leads to no place it left out
    (a 5 where a tensor was), or a part that is no mapping. Rank 0 refuses it
    (CorruptionError, the commit not called) and rank 1 learns the failure."""
    fisher = torch.arange(4, dtype=torch.float32)
    digests = {'["plugins", "fisher"]': sync._digest(fisher)}
    messages = [{"part": {"plugins": {"fisher": 5}}, "new": records_tree([], []),
                 "digests": digests}, [1, 2]]  # fmt: skip
    if w.is_main:
        called: list[bool] = []
        for _ in messages:
            with contextlib.suppress(CorruptionError):
                sync.commit(w, {"plugins": {"fisher": fisher}}, None, SampleTable(),
                            lambda receive: called.append(receive()))  # fmt: skip
        return {"called": called}
    replies = []
    for message in messages:
        wire.send(message, 0, w.group)
        replies.append(wire.broadcast(None, 0, w.group))
    return replies


class _Held:
    """A Stateful whose state is its own live tensors (as a plugin's often is)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def _step_commit_in_the_background(w: World, ctx: dict) -> Any:
    """A background collective commit holds rank 1's all-reduced tensor as it was at the
    commit, though rank 0 puts its own live tensor in the part and changes it in place
    before the background thread encodes the version (held back until then)."""
    fisher = torch.arange(6, dtype=torch.float32)  # the same on both ranks
    app = {"rng": _Held({"torch": torch.tensor([w.rank], dtype=torch.uint8)}),
           "plugins": _Held({"ewc": {"fisher": fisher}})}  # fmt: skip
    if not w.is_main:
        ckpt = Checkpointer(None, app, world=w, local_samples=LocalSamples())
        return ckpt.commit({}, background=True)
    store = Store.open(ctx["dir"] / "background", mode="c")
    try:
        held_back, commit = threading.Event(), store.commit
        store.commit = lambda *a, **k: (held_back.wait(SENT_DEADLINE_S), commit(*a, **k))[1]
        ckpt = Checkpointer(store, app, world=w, background=True)
        ckpt.commit({"kind": "mid-experience"}, background=True)
        fisher.add_(100.0)  # training goes on while the version is written
        held_back.set()
        ckpt.close()
        state = store.load(model=False).state
        return {"rank 0": state["plugins"]["ewc"]["fisher"].tolist(),
                "rank 1": state["ranks"][0]["plugins"]["ewc"]["fisher"].tolist(),
                "rank 1 rng": state["ranks"][0]["rng"]["torch"].tolist()}  # fmt: skip
    finally:
        store.close()


def _step_restore(w: World, ctx: dict) -> Any:
    if w.is_main:
        table = ctx["table"]
        reads = len(table.reads)
        state, weights = _stored_state(), _stored_weights()
        got = sync.restore(w, lambda: (state, weights), table.read, None, _never)
        return {"state": difference(got[0], _part_of(state, {})),
                "weights_same": got[1] is weights, "reads": table.reads[reads:]}  # fmt: skip
    samples = ctx["samples"]
    got = sync.restore(w, _never, _never, samples, _never)
    stored = _stored_state()
    return {"state": difference(got[0], _part_of(stored, stored["ranks"][0])),
            "weights": difference(got[1], _stored_weights()),
            "records": dict(samples.records), "store_id": dict(samples.store_id),
            "read": samples.read([1002], 7).tobytes()}  # fmt: skip


def _step_restore_empty_store(w: World, ctx: dict) -> Any:
    if w.is_main:
        return sync.restore(w, lambda: None, _never, None, _never)
    before = dict(ctx["samples"].records)
    got = sync.restore(w, _never, _never, ctx["samples"], _never)
    return {"got": got, "records_kept": ctx["samples"].records == before}


def _step_restore_repartition(w: World, ctx: dict) -> Any:
    one_rank = {k: v for k, v in _stored_state().items() if k != "ranks"}
    one_rank["plugins"] = {"replay": {"slots": SampleIds.of([1001, 1003])}}
    calls: list = []

    def repartition(parts: list, size: int) -> list:
        calls.append([len(parts), size])
        return [{"rng": parts[0]["rng"], "plugins": {"replay": {"slots": SampleIds.of([1001])}}},
                {"rng": {"torch": torch.tensor([9], dtype=torch.uint8)},
                 "plugins": {"replay": {"slots": SampleIds.of([1003])}}}]  # fmt: skip

    if w.is_main:
        state, _ = sync.restore(w, lambda: (one_rank, {}), ctx["table"].read, None, repartition)
        return {"calls": calls, "slots": state["plugins"]["replay"]["slots"].tolist()}
    state, weights = sync.restore(w, _never, _never, ctx["samples"], _never)
    return {"rng": state["rng"]["torch"].tolist(), "clock": state["clock"], "weights": weights,
            "slots": state["plugins"]["replay"]["slots"].tolist(),
            "records": dict(ctx["samples"].records)}  # fmt: skip


SCENARIO: list[tuple[str, Callable[[World, dict], Any]]] = [
    ("world", _step_world),
    ("broadcast", _step_broadcast),
    ("broadcast from rank 1", _step_broadcast_from_rank_1),
    ("broadcast without waiting", _step_broadcast_without_waiting),
    ("gather", _step_gather),
    ("framing", _step_framing),
    ("all_gather_bytes", _step_all_gather_bytes),
    ("all_gather_bytes one empty", _step_all_gather_one_empty),
    ("all_gather_bytes all empty", _step_all_gather_all_empty),
    ("sum_counts", _step_sum_counts),
    ("sum_tensors", _step_sum_tensors),
    ("average", _step_average),
    ("average_gradients", _step_average_gradients),
    ("average_gradients mixed dtypes", _step_average_gradients_mixed_dtypes),
    ("broadcast_module", _step_broadcast_module),
    ("agree", _step_agree),
    ("agree share", _step_agree_share),
    ("agree fails", _step_agree_fails),
    ("same_config", _step_same_config),
    ("same_config differs", _step_same_config_differs),
    ("commit first", _step_commit_first),
    ("commit second", _step_commit_second),
    ("commit fails", _step_commit_fails),
    ("after failed commit", _step_commit_state_after_failure),
    ("commit fails before gathering", _step_commit_fails_before_gathering),
    ("commit shared first", _step_commit_shared_first),
    ("commit shared again", _step_commit_shared_again),
    ("commit shared fails", _step_commit_shared_fails),
    ("commit after failures", _step_commit_after_failures),
    ("commit part sent before the gather", _step_commit_part_sent_before_the_gather),
    ("commit hostile part", _step_commit_hostile_part),
    ("commit in the background", _step_commit_in_the_background),
    ("restore", _step_restore),
    ("restore empty store", _step_restore_empty_store),
    ("restore repartition", _step_restore_repartition),
]


def _outcome(step: Callable[[World, dict], Any], w: World, ctx: dict) -> tuple:
    try:
        return ("ok", step(w, ctx))
    except Exception as e:
        return ("raised", f"{type(e).__module__}.{type(e).__qualname__}", str(e))


def _rank_main(rank: int, rendezvous: str, results: Any) -> None:
    """One rank (a spawned process): run SCENARIO on a real gloo group, report outcomes."""
    out: dict[str, Any] = {}
    try:
        torch.set_num_threads(1)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)  # this process's environment only: no launcher here
        out["before init"] = (distributed.launched(), distributed.world() == World())
        out["init_from_env without a launcher"] = _outcome(
            lambda w, ctx: distributed.init_from_env("cpu", timeout_s=5), World(), {}
        )
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                                world_size=2, timeout=timedelta(seconds=GLOO_TIMEOUT_S))  # fmt: skip
        w = distributed.world()
        ctx: dict[str, Any] = {"dir": Path(rendezvous).parent}
        for name, step in SCENARIO:
            out[name] = _outcome(step, w, ctx)
        distributed.shutdown()
        out["after shutdown"] = (dist.is_initialized(), distributed.world() == World())
    except BaseException:
        out["crash"] = traceback.format_exc()
    results.put((rank, out))
    if "crash" in out:
        sys.exit(1)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Both ranks' outcomes of SCENARIO, from one 2-process gloo group."""
    rendezvous = Path(tmp_path_factory.mktemp("gloo")) / "rendezvous"
    outcomes = two_ranks(_rank_main, str(rendezvous), RANKS_DEADLINE_S)
    for r, (_, exitcode) in enumerate(outcomes):
        assert exitcode == 0, f"rank {r} exited with {exitcode}"
    return [outcome for outcome, _ in outcomes]


def ok(outcome: tuple) -> Any:
    assert outcome[0] == "ok", f"the step raised {outcome[1]}: {outcome[2]}"
    return outcome[1]


def raised(outcome: tuple) -> tuple[str, str]:
    assert outcome[0] == "raised", f"the step returned {outcome[1]!r} instead of raising"
    return outcome[1], outcome[2]


def test_ranks_join_a_group_and_see_their_world(ranks: list[dict[str, Any]]) -> None:
    for r, out in enumerate(ranks):
        assert out["before init"] == (False, True)
        assert ok(out["world"]) == {"rank": r, "size": 2, "is_main": r == 0,
                                    "shard": [r, r + 2, r + 4][: 3 - r], "group": None,
                                    "cached": True}  # fmt: skip
        assert out["after shutdown"] == (False, True)


def test_init_from_env_without_a_launcher_raises_distributed_error(
    ranks: list[dict[str, Any]],
) -> None:
    for out in ranks:
        kind, message = raised(out["init_from_env without a launcher"])
        assert kind == "engram.distributed.DistributedError"
        assert message.startswith("rank ? cannot join the job at ?:?: ")


def test_broadcast_delivers_the_sources_tree_to_every_rank(ranks: list[dict[str, Any]]) -> None:
    assert ok(ranks[0]["broadcast"]) is True  # the source keeps its own object
    assert ok(ranks[1]["broadcast"]) is None  # no difference from make_tree()
    assert ok(ranks[1]["broadcast from rank 1"]) is True
    assert ok(ranks[0]["broadcast from rank 1"]) is None


def test_a_broadcast_rank_0_does_not_wait_for_arrives_before_what_it_sends_next(
    ranks: list[dict[str, Any]],
) -> None:
    assert ok(ranks[0]["broadcast without waiting"]) == {"in_flight": 2, "after": 0}  # 2 messages
    assert ok(ranks[1]["broadcast without waiting"]) == [{"n": 1}, None, {"n": 3}]


def test_gather_brings_every_ranks_tree_to_rank_0_in_rank_order(
    ranks: list[dict[str, Any]],
) -> None:
    assert ok(ranks[0]["gather"]) == {"n": 2, "diffs": [None, None],
                                      "slots_types": ["SampleIds", "SampleIds"]}  # fmt: skip
    assert ok(ranks[1]["gather"]) is None


def test_payloads_longer_than_the_first_message_arrive_whole(
    ranks: list[dict[str, Any]],
) -> None:
    assert ok(ranks[0]["framing"]) == [None, [None, None]] * len(FRAME_SIZES)
    assert ok(ranks[1]["framing"]) == [None] * len(FRAME_SIZES)


def test_all_gather_bytes_gives_every_ranks_bytes_exactly(ranks: list[dict[str, Any]]) -> None:
    for out in ranks:
        assert ok(out["all_gather_bytes"]) == [b"sha256:ab", b"\x00\x01\x00\x00"]
        assert ok(out["all_gather_bytes one empty"]) == [b"", b"xyz"]
        assert ok(out["all_gather_bytes all empty"]) == [b"", b""]


def test_sum_counts_and_sum_tensors_are_exact_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for out in ranks:
        assert ok(out["sum_counts"]) == [7, 2**41 + 1, 0, 0]
        assert ok(out["sum_tensors"]) == {"same_dict": True, "in_place": True,
                                          "a": [1, 20], "b": [3.0, 0.5]}  # fmt: skip
    assert ok(ranks[0]["average"]) == {"out": [0.5, 2.0], "input": [0.0, 1.0], "new": True}
    assert ok(ranks[1]["average"]) == {"out": [0.5, 2.0], "input": [1.0, 3.0], "new": True}


def test_average_gradients_gives_the_mean_with_identical_bits_on_both_ranks(
    ranks: list[dict[str, Any]],
) -> None:
    g0, g1 = _grads(0), _grads(1)
    expected = {"weight": (g0["weight"] + g1["weight"]) / 2, "bias": (g0["bias"] + g1["bias"]) / 2,
                "unused": g0["unused"] / 2}  # a missing gradient counts as zeros  # fmt: skip
    per_rank = [ok(out["average_gradients"]) for out in ranks]
    for name, mean in expected.items():
        assert per_rank[0][name] == per_rank[1][name], f"{name}: ranks differ"
        same_dtype, raw = per_rank[0][name]
        assert same_dtype and raw == _raw(mean), name
    for r in range(2):  # a frozen parameter is not reduced: each rank keeps its own
        assert per_rank[r]["frozen"] == (True, _raw(_grads(r)["frozen"]))


def test_average_gradients_keeps_each_parameters_dtype(ranks: list[dict[str, Any]]) -> None:
    for out in ranks:
        assert ok(out["average_gradients mixed dtypes"]) == [
            ("torch.float32", [1.5, 1.5]),
            ("torch.float64", [1.5, 1.5]),
        ]


def test_broadcast_module_gives_every_rank_rank_0s_parameters_and_buffers(
    ranks: list[dict[str, Any]],
) -> None:
    rank0, rank1 = ok(ranks[0]["broadcast_module"]), ok(ranks[1]["broadcast_module"])
    assert rank0["after"] == rank0["before"]
    assert rank1["before"] != rank0["before"]
    assert rank1["after"] == rank0["before"]


def test_agree_returns_rank_0s_result_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for out in ranks:
        assert ok(out["agree"]) is None  # no difference from rank 0's result
    assert ok(ranks[0]["agree share"]) == ["_Snapshot", 7]  # rank 0 keeps its own object
    assert ok(ranks[1]["agree share"]) == ["dict", {"v": 7}]  # the others get share(result)


def test_agree_failure_reraises_on_rank_0_and_is_peer_failed_on_rank_1(
    ranks: list[dict[str, Any]],
) -> None:
    assert issubclass(PeerFailed, DistributedError)
    message = "store runs/a is locked by pid 4121 on host x; stop that run"
    assert raised(ranks[0]["agree fails"]) == ("engram.errors.StoreLockedError", message)
    assert raised(ranks[1]["agree fails"]) == (
        "engram.distributed.PeerFailed",
        f"rank 1: rank 0 failed to open the store: StoreLockedError: {message}",
    )


def test_same_config_with_different_digests_raises_on_every_rank_naming_rank_1(
    ranks: list[dict[str, Any]],
) -> None:
    for out in ranks:
        assert ok(out["same_config"]) is None
        kind, message = raised(out["same_config differs"])
        assert kind == "engram.distributed.DistributedError"
        assert re.search(r"\branks 1 were given a configuration that differs", message)
        assert "give every rank the same overrides" in message


def test_commit_translates_rank_1s_provisional_ids_and_tells_it_the_store_ids(
    ranks: list[dict[str, Any]],
) -> None:
    rank0, rank1 = ok(ranks[0]["commit first"]), ok(ranks[1]["commit first"])
    # rank 0: only referenced samples are appended (-2 was evicted), in slot order
    assert rank0 == {"result": "v1", "appends": [[b"r1-ccc", b"r1-a"]],
                     "slots_type": "SampleIds", "slots": [1000, 1001], "rest": None}  # fmt: skip
    assert rank1 == {"result": None, "ids": [-1, -2, -3], "store_id": {-3: 1000, -1: 1001},
                     "records": [-3, -1], "part_slots": [-3, -1]}  # fmt: skip

    rank0, rank1 = ok(ranks[0]["commit second"]), ok(ranks[1]["commit second"])
    # committed samples travel as store ids; only the new one is appended
    assert rank0 == {"result": "v2", "appends": [[b"r1-dddd"]],
                     "slots_type": "SampleIds", "slots": [1001, 1002, 1000], "rest": None}  # fmt: skip
    assert rank1["store_id"] == {-3: 1000, -1: 1001, -4: 1002}
    assert rank1["ids"] == [-4] and rank1["part_slots"] == [-1, -4, -3]


def test_a_failed_commit_reraises_on_rank_0_and_rank_1_learns_no_ids(
    ranks: list[dict[str, Any]],
) -> None:
    message = "no space left on device; free space and resume"
    assert raised(ranks[0]["commit fails"]) == ("engram.errors.CommitError", message)
    assert raised(ranks[1]["commit fails"]) == (
        "engram.distributed.PeerFailed",
        f"rank 1: rank 0's commit failed: CommitError: {message}",
    )
    assert ok(ranks[1]["after failed commit"]) == {-1: 1001}  # -5 has no store id


def test_tensors_rank_0_holds_the_same_are_its_own_the_others_come_whole(
    ranks: list[dict[str, Any]],
) -> None:
    """Rank 1 sends digests: the all-reduced tensor is rank 0's own object in the
    gathered part; the ones rank 0 lacks or holds otherwise are asked for in a second
    round, then sent whole at every later commit (one message)."""
    whole = ['["plugins", "ewc", "anchor"]', '["plugins", "extra", 0]', '["rng", "torch"]']
    for step, result, sends in (("first", "v-first", 2), ("again", "v-again", 1)):
        assert ok(ranks[0][f"commit shared {step}"]) == {
            "result": result, "fisher_is_rank_0s": True, "rest": None}  # fmt: skip
        assert ok(ranks[1][f"commit shared {step}"]) == {
            "result": None, "unchanged": None, "sends": sends, "whole": whole}  # fmt: skip
    assert raised(ranks[0]["commit shared fails"]) == (
        "engram.errors.CommitError", "no space left on device")  # fmt: skip
    assert raised(ranks[1]["commit shared fails"])[0] == "engram.distributed.PeerFailed"


def test_a_part_whose_digests_name_no_left_out_place_is_refused_on_rank_0(
    ranks: list[dict[str, Any]],
) -> None:
    assert ok(ranks[0]["commit hostile part"]) == {"called": []}
    replies = ok(ranks[1]["commit hostile part"])
    assert [r["ok"] for r in replies] == [False, False]
    assert replies[0]["error"] == (
        "CorruptionError: no value was left out at ['plugins', 'fisher'] to fill"
    )
    assert replies[1]["error"] == (
        "CorruptionError: a rank's part is not a packed mapping with its part"
    )


def test_a_background_commit_holds_the_parts_as_they_were_at_the_commit(
    ranks: list[dict[str, Any]],
) -> None:
    assert ok(ranks[1]["commit in the background"]) is None
    assert ok(ranks[0]["commit in the background"]) == {
        "rank 0": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        "rank 1": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        "rank 1 rng": [1],
    }


def test_a_commit_failing_before_it_gathers_still_receives_rank_1s_part(
    ranks: list[dict[str, Any]],
) -> None:
    """Rank 0 fails before asking for the parts (a locked store): rank 1's send is
    received anyway, so rank 1 learns the failure and the next commit works."""
    assert raised(ranks[0]["commit fails before gathering"]) == (
        "engram.errors.CommitError", "the store is locked")  # fmt: skip
    assert raised(ranks[1]["commit fails before gathering"]) == (
        "engram.distributed.PeerFailed",
        "rank 1: rank 0's commit failed: CommitError: the store is locked",
    )
    after = ok(ranks[0]["commit after failures"])
    assert (after["result"], after["slots"], after["appends"]) == ("v3", [1001], [])
    assert ok(ranks[1]["commit after failures"])["result"] is None


def test_rank_1s_part_travels_before_rank_0_asks_for_it(ranks: list[dict[str, Any]]) -> None:
    """Rank 0 posts the receive of the parts as its commit begins, so the transfer (a
    gloo rendezvous: the sender waits for the posted receive) is done while rank 0
    encodes its own state and writes the weights, not when it asks for the parts."""
    assert ok(ranks[0]["commit part sent before the gather"]) == {
        "result": 1, "sent before the gather": [True]}  # fmt: skip
    assert ok(ranks[1]["commit part sent before the gather"]) is None


def test_restore_delivers_rank_1_its_part_the_weights_and_its_samples(
    ranks: list[dict[str, Any]],
) -> None:
    rank0 = ok(ranks[0]["restore"])
    assert rank0 == {"state": None, "weights_same": True, "reads": [[1000, 1002]]}
    rank1 = ok(ranks[1]["restore"])
    assert rank1 == {"state": None, "weights": None,
                     "records": {1000: b"r1-ccc", 1002: b"r1-dddd"}, "store_id": {},
                     "read": b"r1-dddd"}  # fmt: skip


def test_restore_of_an_empty_store_is_none_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    assert ok(ranks[0]["restore empty store"]) is None
    assert ok(ranks[1]["restore empty store"]) == {"got": None, "records_kept": True}


def test_restore_repartitions_a_store_of_another_world_size(ranks: list[dict[str, Any]]) -> None:
    assert ok(ranks[0]["restore repartition"]) == {"calls": [[1, 2]], "slots": [1001]}
    assert ok(ranks[1]["restore repartition"]) == {
        "rng": [9], "clock": {"iteration": 12}, "weights": {}, "slots": [1003],
        "records": {1003: b"r1-e"},
    }  # fmt: skip


def test_an_empty_buffer_from_numpy_has_a_digest() -> None:
    """A replay buffer admitting at the experience's end is empty at experience 0's
    mid-experience commits: its slot table comes from numpy with stride 0."""
    import numpy as np
    import torch

    from engram.distributed.sync import _digest

    empty = torch.from_numpy(np.zeros(0, dtype=np.int64))
    assert empty.stride() == (0,)
    assert _digest(empty) != _digest(torch.zeros(0))  # dtype is in the digest
