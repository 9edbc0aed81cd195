"""A large commit's guess of the chunks already stored (its parent's) comes from the
commit before it in this process, not from parsing the parent's manifest again."""

from __future__ import annotations

from pathlib import Path

import torch

from engram.store import Store
from engram.store import commit as store_commit
from engram.store.codec import iter_array_records


def _parsed_chunks(store: Store, version: int) -> frozenset[tuple[int, int]]:
    with store.env.read() as txn:
        tree = store._history.manifest(txn, version)["state"]
    return frozenset((check, size) for r in iter_array_records(tree) for _, size, check in r.chunks)


def test_a_large_commit_remembers_its_chunks_for_the_next_commit(tmp_path: Path) -> None:
    big = {"fisher": torch.arange(3 << 20, dtype=torch.float32), "small": torch.ones(3)}
    with Store.open(tmp_path / "s", mode="c") as store:
        first = store.commit(big, message="large")
        remembered = store_commit._LAST_CHUNKS[store.env.store_id]
        assert remembered == (first.id, _parsed_chunks(store, first.id))
        guess = store_commit._parent_chunks(store.env, store._history, first.id)
        assert guess is remembered[1]  # no manifest parsed
        small = store.commit({"small": torch.zeros(3)}, message="small: hashed inline, no guess")
        assert store_commit._LAST_CHUNKS[store.env.store_id] == remembered
        # another parent than the one remembered is read from its manifest
        second = store.commit({**big, "small": torch.zeros(3)}, message="large again")
        parsed = store_commit._parent_chunks(store.env, store._history, small.id)
        assert parsed == _parsed_chunks(store, small.id) != remembered[1]
        assert store_commit._LAST_CHUNKS[store.env.store_id][0] == second.id
