"""Pre-encoded subtrees (codec.Encoded): a tree received as bytes, validated like a
manifest and spliced into a commit with no decode and encode again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engram.errors import CorruptionError, EncodingError
from engram.store import Store
from engram.store.codec import (
    MAX_DEPTH,
    TAG_TENSOR,
    Encoded,
    SampleIds,
    SharedArrays,
    array_from_bytes,
    decode_tree,
    encode_tree,
    encoded_tree,
)
from engram.store.format import CHUNK_BYTES


def _packed(tree: Any) -> tuple[Any, bytes]:
    """``tree`` as a JSON header and its arrays' bytes in order (as the wire sends it)."""
    encoded, pending = encode_tree(tree)
    for p in pending:
        n = len(p.raw)
        p.record["chunks"] = [["0" * 64, min(CHUNK_BYTES, n - at), 0]
                              for at in range(0, n, CHUNK_BYTES)]  # fmt: skip
    data = b"".join(p.raw.tobytes() for p in pending)
    return json.loads(json.dumps(encoded)), data


def _received(tree: Any) -> Encoded:
    header, data = _packed(tree)
    return _encoded(header, data)


def _encoded(header: Any, data: bytes) -> Encoded:
    raw, at = np.frombuffer(data, np.uint8), 0

    def view(record: Any, where: str) -> np.ndarray:
        nonlocal at
        at += record.nbytes
        return raw[at - record.nbytes : at]

    return encoded_tree(header, view)


def _round_trip(tree: Any) -> Any:
    """``tree`` encoded (Encoded values spliced in), packed and decoded back."""
    header, data = _packed(tree)
    raw, at = np.frombuffer(data, np.uint8), 0

    def read(record: Any, where: str) -> Any:
        nonlocal at
        at += record.nbytes
        piece = bytearray(raw[at - record.nbytes : at])
        chunk = (
            torch.frombuffer(piece, dtype=torch.uint8)
            if piece
            else torch.zeros(0, dtype=torch.uint8)
        )
        return array_from_bytes(record, chunk)

    out = decode_tree(header, read)
    assert at == len(raw)
    return out


def _part() -> dict[str, Any]:
    """A rank's part: tensors, a tuple, a non-str-keyed mapping, sample ids, and None
    where tensors were left out (sent as digests)."""
    return {
        "rng": {"torch": torch.arange(7, dtype=torch.uint8), "python": (3, tuple(range(625)))},
        "plugins": {
            "ewc": {"fisher": {0: None, 1: torch.ones(3)}, "anchors": [None, None]},
            "replay": {"slots": SampleIds.of([5, -1, 7]), "seen": 3},
            "numpy": np.arange(4, dtype=np.int16),
        },
    }


def test_a_received_part_splices_into_a_tree_as_it_was_sent() -> None:
    own = {"fisher": torch.full((3,), 2.0), "a0": torch.zeros(2), "a1": torch.ones(2)}
    part = _received(_part())
    part.put(["plugins", "ewc", "fisher", 0], own["fisher"])
    part.put(["plugins", "ewc", "anchors", 0], own["a0"])
    part.put(["plugins", "ewc", "anchors", 1], own["a1"])
    got = _round_trip({"own": own, "ranks": [part]})["ranks"][0]
    want = _part()
    want["plugins"]["ewc"]["fisher"][0] = own["fisher"]
    want["plugins"]["ewc"]["anchors"] = [own["a0"], own["a1"]]
    assert type(got["plugins"]["replay"]["slots"]) is SampleIds
    assert got["rng"]["python"] == want["rng"]["python"]
    assert list(got["plugins"]["ewc"]["fisher"]) == [0, 1]
    flat = [(k, v) for k, v in _leaves(got)]
    assert [k for k, _ in flat] == [k for k, _ in _leaves(want)]
    for (_, a), (_, b) in zip(flat, _leaves(want), strict=True):
        assert type(a) is type(b) and np.array_equal(np.asarray(a), np.asarray(b))


def _leaves(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in _leaves(v, f"{path}/{k}")]
    if isinstance(tree, list | tuple):
        return [x for i, v in enumerate(tree) for x in _leaves(v, f"{path}/{i}")]
    return [(path, tree)]


def test_a_place_filled_with_a_tensor_met_before_shares_its_record() -> None:
    """Rank 0's own tensor put in a part is one record of the version: its bytes are
    hashed and stored once."""
    fisher = torch.full((3,), 2.0)
    part = _received(_part())
    part.put(["plugins", "ewc", "fisher", 0], fisher)
    part.put(["plugins", "ewc", "anchors", 1], torch.zeros(1))
    shared = SharedArrays()
    tree, pending = encode_tree({"own": {"fisher": fisher}, "ranks": [part]}, shared)
    mine = tree["own"]["fisher"][TAG_TENSOR]
    theirs = tree["ranks"][0]["plugins"]["ewc"]["fisher"]["__map__"][0][1][TAG_TENSOR]
    assert theirs is mine and shared.reused_bytes == 12
    assert sum(p.record is mine for p in pending) == 1
    assert len(pending) == 1 + len(part.arrays) + 1  # rank 0's, the part's, the new zeros


def test_put_refuses_a_path_that_leads_to_no_left_out_place() -> None:
    part = _received(_part())
    for path in (["plugins", "replay", "seen"],  # a value, not None
                 ["plugins", "ewc", "fisher", 1],  # a tensor
                 ["plugins", "ewc", "fisher", "0"],  # the key is the int 0
                 ["plugins", "ewc", "anchors", 2], ["rng", "python", 0],  # inside a tuple
                 ["rng", "torch", "dtype"], ["nowhere"], []):  # fmt: skip
        with pytest.raises(CorruptionError, match="no value was left out at"):
            part.put(path, torch.zeros(1))
    assert part.holes == []


def test_a_received_tree_is_validated_as_a_manifest_is() -> None:
    header, data = _packed(_part())
    bad_record = json.loads(json.dumps(header))
    bad_record["rng"]["torch"][TAG_TENSOR]["dtype"] = "object"
    extra_key = json.loads(json.dumps(header))
    extra_key["rng"]["torch"][TAG_TENSOR]["code"] = "import os"
    deep: Any = {"leaf": None}
    for _ in range(MAX_DEPTH):
        deep = [deep, 1]
    for hostile, why in ((bad_record, "unknown dtype"), (extra_key, "expected an object"),
                         ({"__pickle__": "x"}, "unknown tagged value"),
                         ({"__tuple__": 5}, "must hold a list"), (deep, "deeper than")):  # fmt: skip
        with pytest.raises(CorruptionError, match=why):
            _encoded(hostile, data)


def test_records_of_a_received_tree_are_new_and_hold_only_validated_fields() -> None:
    header, data = _packed({"t": torch.ones(2)})
    record = header["t"][TAG_TENSOR]
    part = _encoded(header, data)
    assert part.tree["t"][TAG_TENSOR] == {"dtype": "float32", "shape": [2], "chunks": None}
    assert part.tree["t"][TAG_TENSOR] is not record


def test_a_received_tree_too_deep_for_its_place_is_refused_when_encoded() -> None:
    """Valid on its own, it would make the version's manifest deeper than a reader takes."""
    deep: Any = torch.ones(1)
    for _ in range(MAX_DEPTH - 1):
        deep = [deep, 1]
    part = _received(deep)
    assert part.depth == MAX_DEPTH - 1
    encode_tree([part])  # depth 1 + 99: the limit
    with pytest.raises(EncodingError, match="nested deeper than"):
        encode_tree({"ranks": [part]})


def test_sample_ids_of_a_received_tree_can_be_rewritten_in_place() -> None:
    part = _received(_part())
    (ids,) = part.samples
    assert ids.raw.view(np.int64).tolist() == [5, -1, 7]
    ids.raw = np.array([5, 1000, 7], np.int64).view(np.uint8)
    got = _round_trip({"ranks": [part]})["ranks"][0]["plugins"]["replay"]["slots"]
    assert type(got) is SampleIds and got.tolist() == [5, 1000, 7]


def test_with_values_puts_copies_in_the_places_and_shares_the_rest() -> None:
    fisher = torch.full((3,), 2.0)
    part = _received(_part())
    part.put(["plugins", "ewc", "fisher", 0], fisher)
    staged = part.with_values(lambda t: t.clone())
    (hole,) = staged.holes
    assert hole[3] is not fisher and torch.equal(hole[3], fisher)
    assert staged.tree is part.tree and staged.arrays is part.arrays


def test_a_store_commits_a_received_part_and_loads_it_as_tensors(tmp_path: Path) -> None:
    own = {"fisher": torch.full((3,), 2.0)}
    part = _received(_part())
    part.put(["plugins", "ewc", "fisher", 0], own["fisher"])
    with Store.open(tmp_path / "s", mode="c") as store:
        store.commit({"own": own, "ranks": [part]}, message="two ranks")
        loaded = store.load(model=False).state
    ranks = loaded["ranks"][0]
    assert torch.equal(ranks["plugins"]["ewc"]["fisher"][0], own["fisher"])
    assert ranks["plugins"]["ewc"]["anchors"] == [None, None]
    assert type(ranks["plugins"]["replay"]["slots"]) is SampleIds
    assert torch.equal(ranks["rng"]["torch"], torch.arange(7, dtype=torch.uint8))
