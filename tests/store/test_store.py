"""Store API: versions, refs, rollback, dedup, gc, corruption, errors, map growth."""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import pytest
import torch
from safetensors.torch import load_file, safe_open

from engram.errors import (
    CorruptionError,
    EngramError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreFormatError,
    StoreLockedError,
    StoreNotFoundError,
    VersionNotFoundError,
)
from engram.store import FORMAT_VERSION, Store
from engram.store import load as load_module
from engram.store.records import seal


def ewc_state(seed: int, n: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "plugins": {
            "ewc": {
                "fisher": {f"w{i}": torch.rand(64, 64, generator=gen) for i in range(n)},
                "ewc_lambda": 0.4,
            }
        },
        "clock": {"experience": seed, "iteration": 10 * seed},
    }


def test_commit_load_round_trip_with_model(store: Store, net: torch.nn.Module) -> None:
    v = store.commit(ewc_state(1), model=net, message="after exp 1", meta={"experience": 1})
    assert v.id == 1 and v.parent is None and v.message == "after exp 1"
    assert v.checkpoint == "model-v0001-exp1.safetensors"
    snap = store.load()
    assert snap.version == v
    assert snap.state["plugins"]["ewc"]["ewc_lambda"] == 0.4
    for key, value in net.state_dict().items():
        assert torch.equal(snap.model[key], value)
    assert torch.equal(
        snap.state["plugins"]["ewc"]["fisher"]["w0"], ewc_state(1)["plugins"]["ewc"]["fisher"]["w0"]
    )


def test_checkpoint_is_plain_safetensors_with_metadata(store: Store, net: torch.nn.Module) -> None:
    store.commit({}, model=net, meta={"experience": 3, "strategy": "ewc"})
    path = store.checkpoint_path()
    assert path.name == "model-v0001-exp3.safetensors"
    weights = load_file(path)  # safetensors alone, no engram
    assert set(weights) == set(net.state_dict())
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["version"] == "v0001" and meta["experience"] == "3" and meta["strategy"] == "ewc"
    assert meta["engram_version"]


def test_tied_weights_are_saved(store: Store) -> None:
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    store.commit({}, model=model)
    weights = store.load().model
    assert torch.equal(weights["emb.weight"], weights["head.weight"])


def test_versions_parents_tags_and_rollback(store: Store, net: torch.nn.Module) -> None:
    for i in range(3):
        store.commit(ewc_state(i), model=net, meta={"experience": i})
    assert [v.id for v in store.versions()] == [1, 2, 3]
    assert [v.parent for v in store.versions()] == [None, 1, 2]
    store.tag("good", 2)
    assert store.tags() == {"good": 2}
    assert store.info("good").tags == ("good",)
    assert store.info("HEAD~1").id == 2 and store.info("v0001").id == 1 and store.info(1).id == 1

    store.rollback("good")
    assert store.head.id == 2
    assert store.load().state["clock"]["experience"] == 1
    branch = store.commit(ewc_state(7), model=net)
    assert branch.id == 4 and branch.parent == 2  # history is a tree; 3 still exists
    assert store.info(3).parent == 2
    store.untag("good")
    assert store.tags() == {}
    with pytest.raises(VersionNotFoundError, match="no tag"):
        store.untag("good")


@pytest.mark.parametrize("bad", ["v0099", 99, "nope", "HEAD~5"])
def test_unknown_versions_give_clear_errors(store: Store, bad) -> None:
    store.commit({"x": 1})
    with pytest.raises(VersionNotFoundError) as err:
        store.load(bad)
    assert str(bad).replace("~5", "") in str(err.value) or "parent" in str(err.value)


def test_empty_store_has_no_head(store: Store) -> None:
    assert store.head is None and store.versions() == []
    with pytest.raises(VersionNotFoundError, match="no versions yet"):
        store.load()


@pytest.mark.parametrize("name", ["HEAD", "v0003", "12", "a/b", "", "-x"])
def test_invalid_tag_names(store: Store, name: str) -> None:
    store.commit({"x": 1})
    with pytest.raises(ValueError, match="invalid tag name"):
        store.tag(name)


def test_unchanged_tensors_are_stored_once(store: Store, net: torch.nn.Module) -> None:
    state = ewc_state(0, n=10)
    first = store.commit(state, model=net)
    state["plugins"]["ewc"]["fisher"]["w3"] = torch.zeros(64, 64)  # 1 of 10 changes
    second = store.commit(state, model=net)
    assert second.checkpoint == first.checkpoint  # same weights: the file is shared
    assert second.new_bytes == 64 * 64 * 4
    assert second.new_bytes <= 0.15 * first.new_bytes
    third = store.commit(state, model=net)
    assert third.new_bytes == 0
    with torch.no_grad():
        net[0].weight.add_(1)
    fourth = store.commit(state, model=net)
    assert fourth.checkpoint == "model-v0004.safetensors"
    assert torch.equal(store.load(4).model["0.weight"], net[0].weight)
    assert not torch.equal(store.load(1).model["0.weight"], net[0].weight)


def test_gc_keeps_head_tags_and_references(store: Store, net: torch.nn.Module) -> None:
    for i in range(5):
        with torch.no_grad():
            net[0].bias.fill_(i)
        store.commit(ewc_state(i), model=net, meta={"experience": i})
    store.tag("keep", 2)
    report = store.gc(keep_last=1)
    assert report.versions == (1, 3, 4)
    assert [v.id for v in store.versions()] == [2, 5]
    assert store.verify(all=True).ok
    assert store.load("keep").state["clock"]["experience"] == 1
    assert store.load().model["0.bias"].eq(4).all()
    files = sorted(p.name for p in (store.path / "checkpoints").iterdir())
    assert files == ["model-v0002-exp1.safetensors", "model-v0005-exp4.safetensors"]


def test_gc_rewrites_mostly_dead_packs(store: Store) -> None:
    big = {"a": torch.ones(1 << 20), "b": torch.full((1 << 20,), 2.0)}
    store.commit(big)
    store.commit({"a": big["a"], "small": torch.zeros(10)})
    store.gc(keep_last=1)  # "b" (half of pack 1) is garbage
    packs = sorted(p.name for p in (store.path / "blobs").iterdir())
    assert "pack-00000001.bin" not in packs
    assert torch.equal(store.load().state["a"], big["a"])
    assert store.verify(all=True).ok
    store.commit({"c": torch.ones(3)})  # a new pack id, no clash with the rewritten one
    assert store.verify(all=True).ok


def test_gc_collects_leftovers_of_interrupted_commits(store: Store, net: torch.nn.Module) -> None:
    store.commit(ewc_state(0), model=net)
    (store.path / "blobs" / "pack-00000009.bin").write_bytes(b"partial")
    (store.path / "checkpoints" / ".model-v0002.safetensors.tmp-123").write_bytes(b"x")
    (store.path / "checkpoints" / "model-v0002.safetensors").write_bytes(b"x")
    (store.path / "checkpoints" / ".tmpTGx8OA").write_bytes(b"x")  # safetensors' own temp
    (store.path / "checkpoints" / "notes.txt").write_text("user file: never deleted")
    report = store.gc()
    assert set(report.files) == {
        "blobs/pack-00000009.bin",
        "checkpoints/.model-v0002.safetensors.tmp-123",
        "checkpoints/model-v0002.safetensors",
        "checkpoints/.tmpTGx8OA",
    }
    assert (store.path / "checkpoints" / "notes.txt").exists()
    assert store.verify(all=True).ok


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_corrupted_blob_is_detected_by_verify_and_load(store_path: Path, net) -> None:
    with Store.open(store_path, mode="c") as store:
        store.commit(ewc_state(0), model=net)
        store.commit(ewc_state(1), model=net)
    flip_byte(store_path / "blobs" / "pack-00000002.bin", 100)
    with Store.open(store_path) as store:
        report = store.verify(all=True)
        assert not report.ok
        assert any(p.version == 2 and "fisher" in p.where for p in report.problems)
        assert store.verify(1).ok  # the older version is intact
        with pytest.raises(CorruptionError, match=r"v0002.*plugins/ewc/fisher/w0"):
            store.load(2)
        store.load(1)


def test_real_corruption_is_read_once_not_retried(
    store_path: Path, net, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retries are for a concurrent gc; with no write since the read, damage is final."""
    with Store.open(store_path, mode="c") as store:
        store.commit(ewc_state(0), model=net)
    flip_byte(store_path / "blobs" / "pack-00000001.bin", 100)
    reads = []
    real = load_module._load  # one read of Store.load, retried by load_module.load
    monkeypatch.setattr(load_module, "_load", lambda *a: reads.append(a) or real(*a))
    with Store.open(store_path) as store, pytest.raises(CorruptionError, match="v0001"):
        store.load()
    assert len(reads) == 1


def test_corrupted_checkpoint_is_detected_by_verify_and_load(store_path: Path, net) -> None:
    with Store.open(store_path, mode="c") as store:
        store.commit({}, model=net)
        path = store.checkpoint_path()
    flip_byte(path, path.stat().st_size - 3)
    with Store.open(store_path) as store:
        report = store.verify()
        assert [p.where for p in report.problems] == ["model-v0001.safetensors"]
        with pytest.raises(CorruptionError, match="v0001.*model-v0001.safetensors.*corrupted"):
            store.load()
        assert store.load(model=False).state == {}  # the state alone still loads
    path.write_bytes(path.read_bytes()[:-10])
    with Store.open(store_path) as store, pytest.raises(CorruptionError, match="truncated"):
        store.load()
    path.unlink()
    with Store.open(store_path) as store, pytest.raises(CorruptionError, match="missing"):
        store.load()


def test_truncated_pack_is_detected(store_path: Path) -> None:
    with Store.open(store_path, mode="c") as store:
        store.commit({"x": torch.ones(1000)})
    pack = store_path / "blobs" / "pack-00000001.bin"
    pack.write_bytes(pack.read_bytes()[:100])
    with Store.open(store_path) as store:
        assert not store.verify().ok
        with pytest.raises(CorruptionError, match="truncated"):
            store.load()


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="mode='c'"):
        Store.open(tmp_path / "missing")
    with pytest.raises(StoreNotFoundError):
        Store.open(tmp_path / "missing", mode="w")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotAStoreError, match="is a file"):
        Store.open(tmp_path / "file", mode="c")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "data.csv").write_text("x")
    with pytest.raises(NotAStoreError, match="not empty"):
        Store.open(tmp_path / "dir", mode="c")
    with pytest.raises(NotAStoreError, match="not an engram store"):
        Store.open(tmp_path / "dir")
    with pytest.raises(ValueError, match="mode"):
        Store.open(tmp_path / "dir", mode="x")


def test_read_only_store_refuses_writes(store_path: Path) -> None:
    with Store.open(store_path, mode="c") as store:
        store.commit({"x": 1})
    with Store.open(store_path) as store:
        for write in (
            lambda: store.commit({"x": 2}),
            lambda: store.tag("t"),
            lambda: store.rollback(1),
        ):
            with pytest.raises(ReadOnlyStoreError, match="read-only"):
                write()


def test_second_writer_in_same_process_is_refused(store: Store) -> None:
    with pytest.raises(StoreLockedError, match="this process"):
        Store.open(store.path, mode="w")
    store.close()
    with Store.open(store.path, mode="w"):
        pass


def test_newer_format_is_refused(store_path: Path) -> None:
    with Store.open(store_path, mode="c") as store:
        store.commit({"x": 1})
    env = lmdb.open(str(store_path / "memory.lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        newer = str(FORMAT_VERSION + 1).encode()
        txn.put(b"format_version", seal(b"meta", b"format_version", newer),
                db=env.open_db(b"meta", txn=txn))  # fmt: skip
    env.close()
    with pytest.raises(
        StoreFormatError, match=f"format version {FORMAT_VERSION + 1}.*upgrade engram"
    ):
        Store.open(store_path)


def test_map_grows_without_user_visible_errors(store_path: Path) -> None:
    # A 1 MiB initial map must grow for a few thousand versions and tags.
    with Store.open(store_path, mode="c", map_size=1 << 20) as store:
        for i in range(300):
            store.commit({"i": i, "t": torch.full((4,), float(i))}, message="m" * 2000)
            store.tag(f"t{i}")
        assert len(store.versions()) == 300
    with Store.open(store_path) as store:
        assert store.load("t299").state["i"] == 299


def test_store_refuses_use_after_close(store: Store) -> None:
    store.close()
    with pytest.raises(EngramError, match="closed"):
        store.load()


def test_manifest_is_plain_json_without_code(store: Store, net: torch.nn.Module) -> None:
    store.commit(ewc_state(0), model=net, meta={"config": {"lr": 0.1}})
    manifest = store.manifest()
    text = json.dumps(manifest)
    assert "pickle" not in text and manifest["meta"] == {"config": {"lr": 0.1}}
    assert manifest["format_version"] == 1 and manifest["store_id"] == store.store_id
