"""Model artifact files (format 4): written, hashed, loaded, verified and collected like
checkpoints, never parsed by the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engram.errors import CorruptionError, EncodingError, EngramError, StoreFormatError
from engram.store import Artifact, Store
from engram.store import format as fmt
from engram.store.records import seal

DATA = b"PK\x03\x04 not parsed by the store " * 50


def test_artifact_round_trips_beside_the_state(store: Store) -> None:
    v = store.commit({"n": torch.arange(3)}, artifact=Artifact("skops", DATA),
                     meta={"experience": 2})  # fmt: skip
    assert v.artifact == "model-v0001-exp2.skops" and v.checkpoint is None
    assert store.artifact_path() == store.path / "checkpoints" / "model-v0001-exp2.skops"
    assert store.artifact_path().read_bytes() == DATA
    snap = store.load()
    assert snap.artifact == DATA and snap.model is None
    assert torch.equal(snap.state["n"], torch.arange(3))
    assert store.load(verify=True).artifact == DATA
    assert store.info().artifact == v.artifact and v.nbytes == len(DATA) + 3 * 8
    manifest = store.manifest()
    assert manifest["format_version"] == fmt.ARTIFACT_FORMAT_VERSION
    assert manifest["artifact"]["format"] == "skops" and manifest["artifact"]["nbytes"] == len(DATA)


def test_the_store_format_rises_to_4_only_with_the_first_artifact(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", mode="c") as store:
        store.commit({"a": 1}, model=torch.nn.Linear(2, 2))
        assert store.env.format_version == fmt.SEALED_FORMAT_VERSION
        assert "artifact" not in store.manifest()  # plain manifests are unchanged
        store.commit({"a": 2}, artifact=Artifact("skops", DATA))
        assert store.env.format_version == fmt.ARTIFACT_FORMAT_VERSION
    with Store.open(tmp_path / "s") as store:  # and it stays so
        assert store.env.format_version == fmt.ARTIFACT_FORMAT_VERSION
        assert store.load(1).model is not None and store.load(2).artifact == DATA


def test_an_older_engram_refuses_a_store_with_artifacts(tmp_path: Path, monkeypatch) -> None:
    with Store.open(tmp_path / "s", mode="c") as store:
        store.commit(artifact=Artifact("skops", DATA))
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 3)  # what engram before format 4 reads
    with pytest.raises(StoreFormatError, match="format version 4.*upgrade engram"):
        Store.open(tmp_path / "s")


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: Artifact("pickle", DATA), "unknown artifact format 'pickle'"),
        (lambda: Artifact("skops", "text"), "must be bytes"),
    ],
)
def test_bad_artifacts_are_refused(bad, match: str) -> None:
    with pytest.raises(EncodingError, match=match):
        bad()


def test_weights_and_an_artifact_in_one_version_are_refused(store: Store) -> None:
    with pytest.raises(EncodingError, match="not both"):
        store.commit(model=torch.nn.Linear(2, 2), artifact=Artifact("skops", DATA))
    assert store.head is None


def test_corruption_and_loss_of_the_file_are_reported(store: Store) -> None:
    store.commit(artifact=Artifact("skops", DATA))
    path = store.artifact_path()
    path.write_bytes(DATA[:-1] + b"!")
    with pytest.raises(CorruptionError, match="does not match its recorded hash"):
        store.load()
    report = store.verify()
    assert not report.ok and "model-v0001.skops" in str(report.problems[0])
    path.write_bytes(DATA + b"more")
    with pytest.raises(CorruptionError, match="truncated or replaced"):
        store.load()
    path.unlink()
    with pytest.raises(CorruptionError, match="missing"):
        store.load()
    assert store.load(model=False).artifact is None  # the state alone still loads


def test_gc_keeps_referenced_files_and_collects_leftovers(store: Store) -> None:
    store.commit(artifact=Artifact("skops", DATA), meta={"experience": 0})
    store.commit(artifact=Artifact("skops", DATA + b"1"), meta={"experience": 1})
    ckpt = store.path / "checkpoints"
    (ckpt / "model-v0009-exp5.skops").write_bytes(b"a commit that never published")
    (ckpt / ".model-v0010.skops.tmp-123").write_bytes(b"an interrupted write")
    (ckpt / "notes.txt").write_text("not ours")
    report = store.gc()
    assert sorted(report.files) == ["checkpoints/.model-v0010.skops.tmp-123",
                                    "checkpoints/model-v0009-exp5.skops"]  # fmt: skip
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "model-v0001-exp0.skops", "model-v0002-exp1.skops", "notes.txt"]  # fmt: skip
    report = store.gc(keep_last=1)
    assert report.versions == (1,) and "checkpoints/model-v0001-exp0.skops" in report.files
    assert store.load().artifact == DATA + b"1" and store.verify(all=True).ok


def test_compaction_leaves_artifact_versions_loadable(store: Store) -> None:
    big = torch.arange(50_000, dtype=torch.float32)
    store.commit({"w": big}, artifact=Artifact("skops", DATA))
    store.commit({"w": big + 1}, artifact=Artifact("skops", DATA + b"2"))
    store.commit({"w": big + 2}, artifact=Artifact("skops", DATA + b"3"))
    store.compact()
    for vid, (delta, suffix) in enumerate([(0, b""), (1, b"2"), (2, b"3")], start=1):
        snap = store.load(vid, verify=True)
        assert snap.artifact == DATA + suffix and torch.equal(snap.state["w"], big + delta)
    assert store.verify(all=True).ok


def test_rollback_and_tags_work_on_artifact_versions(store: Store) -> None:
    store.commit(artifact=Artifact("skops", b"one"))
    store.commit(artifact=Artifact("skops", b"two"))
    store.tag("prod", 1)
    assert store.load("prod").artifact == b"one"
    store.rollback(1)
    assert store.load().artifact == b"one"
    store.commit(artifact=Artifact("skops", b"three"))
    assert store.load().artifact == b"three" and store.info().parent == 1


def test_an_unsealed_store_must_be_upgraded_first(tmp_path: Path) -> None:
    from test_compaction import write_v1_store

    path = tmp_path / "old"
    write_v1_store(path, [(torch.ones(3), {"w": torch.zeros(2)})])
    with Store.open(path, mode="w") as store:
        with pytest.raises(EngramError, match="engram upgrade"):
            store.commit(artifact=Artifact("skops", DATA))
        store.upgrade()
        store.commit(artifact=Artifact("skops", DATA))
        assert store.env.format_version == fmt.ARTIFACT_FORMAT_VERSION


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda a: a.update(file="../../etc/passwd"), "not a model file name"),
        (lambda a: a.update(file="model-v0001.safetensors"), "not a model file name"),
        (lambda a: a.update(format="joblib"), "unknown or not the file's suffix"),
        (lambda a: a.pop("sha256"), "must hold file, format"),
        (lambda a: a.update(xxh3=-1), "nbytes/xxh3 malformed"),
    ],
)
def test_malformed_artifact_entries_are_corruption(store: Store, change, why: str) -> None:
    store.commit(artifact=Artifact("skops", DATA))
    manifest = store.manifest()
    change(manifest["artifact"])
    key = (1).to_bytes(8, "big")
    payload = json.dumps(manifest).encode()
    with store.env._lmdb.begin(write=True) as txn:  # a damaged record, sealed again
        txn.put(key, seal(fmt.DB_VERSIONS, key, payload), db=store.env.dbs[fmt.DB_VERSIONS])
    with pytest.raises(CorruptionError, match=why):
        store.load()
