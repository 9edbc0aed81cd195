"""History compaction: every version of a compacted lineage restores bit-exactly.

Real stores in temporary directories; lineages of a small MLP fine-tuned with SGD, so
every weight changes a few units in its last place per version, as in real training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engram.errors import CorruptionError, StoreFormatError
from engram.store import Store
from engram.store import compact as compact_module
from engram.store.blobs import EncodedBlob, FileBlob, decode_entry
from engram.store.checkpoint import weights_digest
from engram.store.codec import checksum, iter_array_records
from engram.store.format import (
    CHECKPOINT_DIR,
    DB_BLOBS,
    DB_META,
    FORMAT_VERSION,
    LMDB_DIR,
    SEALED_FORMAT_VERSION,
)
from engram.store.records import seal
from trees import assert_same_tree as assert_same


def lineage(n: int, *, frozen_backbone: bool = False, seed: int = 0):
    """(state, weights) of ``n`` versions of a fine-tuning run, as they were committed."""
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU()
    )
    head = torch.nn.Linear(128, 10)
    with torch.no_grad():
        for p in [*net.parameters(), *head.parameters()]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    params = list(head.parameters()) + ([] if frozen_backbone else list(net.parameters()))
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    x = torch.randn(256, 32, generator=gen)
    y = torch.randint(0, 10, (256,), generator=gen)
    out = []
    for i in range(n):
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(net(x)), y).backward()
            opt.step()
        weights = {
            k: v.detach().clone()
            for k, v in {
                **net.state_dict(),
                **{f"head.{k}": v for k, v in head.state_dict().items()},
            }.items()
        }
        state = {
            "optimizer": copy.deepcopy(opt.state_dict()),
            "fisher": torch.rand(64, 64, generator=gen) if i % 2 else torch.ones(64, 64),
            "odd": {
                "bf16": torch.randn(33, generator=gen).to(torch.bfloat16),
                "nan_payloads": torch.from_numpy(
                    np.array([0x7FC00001, 0xFFFFFFFF, 0x80000000, i], dtype=np.uint32)
                ).view(torch.float32),
                "mask": torch.arange(17) % (i + 2) == 0,
                "f64": np.linspace(0, i, 9),
            },
            "clock": {"experience": i},
        }
        out.append((state, weights))
    return out


def commit_lineage(store: Store, versions) -> list[dict]:
    """Commit each version; returns what a plain load gave back (the reference)."""
    for i, (state, weights) in enumerate(versions):
        store.commit(state, model=weights, meta={"experience": i})
    return [store.load(v.id) for v in store.versions()]


def assert_restores(store: Store, reference) -> None:
    for snap in reference:
        got = store.load(snap.version.id, verify=True)
        assert_same(got.state, snap.state)
        assert_same(got.model, snap.model)  # same tensors, bits, and key order


def index_entries(store: Store) -> dict[bytes, object]:
    """The blob index, decoded (read through the store's own LMDB handle)."""
    with store.env.read() as txn:
        return {k: decode_entry(v, k.hex()) for k, v in store.env.items(txn, DB_BLOBS)}


def chain_depths(entries: dict) -> list[int]:
    depths = []
    for digest in entries:
        d, entry = 0, entries[digest]
        while isinstance(entry, EncodedBlob) and entry.base is not None:
            d, entry = d + 1, entries[entry.base]
        depths.append(d)
    return depths


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and LMDB_DIR not in f.parts)


def test_every_version_of_a_compacted_lineage_restores_bit_exactly(store: Store) -> None:
    reference = commit_lineage(store, lineage(8))
    head_manifest = store.manifest()
    before = disk_bytes(store.path)
    report = store.compact()
    assert report.versions == tuple(range(1, 8))
    assert store.verify(all=True).ok
    assert_restores(store, reference)
    # HEAD is untouched: its plain file, its manifest; old versions' files are gone
    assert store.manifest() == head_manifest
    assert os.listdir(store.path / CHECKPOINT_DIR) == ["model-v0008-exp7.safetensors"]
    assert_same(load_file(store.checkpoint_path()), reference[-1].model)
    old = store.info(3)
    assert old.compacted and old.checkpoint is None and store.checkpoint_path(3) is None
    assert not store.info().compacted
    # weights are delta-coded, and it paid off
    assert any(isinstance(e, EncodedBlob) and e.base for e in index_entries(store).values())
    assert disk_bytes(store.path) < 0.7 * before
    assert store.compact().versions == ()  # nothing new to do
    assert_restores(store, reference)


def test_exported_checkpoint_holds_the_original_tensors_and_metadata(store: Store) -> None:
    commit_lineage(store, lineage(3))
    original = store.path / CHECKPOINT_DIR / "model-v0002-exp1.safetensors"
    expected = load_file(original)
    with safe_open(original, framework="pt") as f:
        metadata = f.metadata()
    store.compact()
    assert not original.exists()
    out = store.path.parent / "exported.safetensors"
    info = store.export_checkpoint(2, out)
    assert_same(load_file(out), expected)
    with safe_open(out, framework="pt") as f:
        assert f.metadata() == metadata and metadata["version"] == "v0002"
    assert info.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()


def test_frozen_backbone_is_shared_and_tags_stay_plain(store: Store) -> None:
    reference = commit_lineage(store, lineage(6, frozen_backbone=True))
    store.tag("release", 3)
    store.compact()
    assert sorted(os.listdir(store.path / CHECKPOINT_DIR)) == [
        "model-v0003-exp2.safetensors",
        "model-v0006-exp5.safetensors",
    ]
    assert not store.info("release").compacted
    assert_restores(store, reference)
    # the backbone's chunks are the same blobs in every version: served from HEAD's file
    entries = index_entries(store)
    backbone = store.manifest(1)["model"]["tensors"]["__map__"]
    for name, record in backbone:
        if not name.startswith("head."):
            digest = bytes.fromhex(record["__tensor__"]["chunks"][0][0])
            assert isinstance(entries[digest], FileBlob), name
    store.compact(tagged=True)
    assert os.listdir(store.path / CHECKPOINT_DIR) == ["model-v0006-exp5.safetensors"]
    assert store.verify(all=True).ok
    assert_restores(store, reference)


def test_chains_are_cut_by_keyframes(store: Store, monkeypatch) -> None:
    """Compacting after every commit lengthens chains; none grows past MAX_CHAIN."""
    # compaction's own limit (the read path keeps 16): unpatched, 9 versions compacted
    # one by one build chains of 8, so the assert below fails if the patch missed
    monkeypatch.setattr(compact_module, "MAX_CHAIN", 3)
    versions = lineage(9)
    reference = []
    for i, (state, weights) in enumerate(versions):
        store.commit(state, model=weights, meta={"experience": i})
        reference.append(store.load())
        store.compact()
    depths = chain_depths(index_entries(store))
    assert max(depths) == 3
    assert store.verify(all=True).ok
    assert_restores(store, reference)


def test_rollback_to_a_compacted_version_then_commit(store: Store) -> None:
    reference = commit_lineage(store, lineage(5))
    store.compact()
    store.rollback(2)
    snap = store.load()
    assert_same(snap.model, reference[1].model)
    branch = store.commit(snap.state, model=snap.model, meta={"experience": 9})
    assert branch.parent == 2 and branch.checkpoint == "model-v0006-exp9.safetensors"
    assert_same(store.load().model, reference[1].model)
    store.compact()  # HEAD's state blobs (shared with v0002) become plain again
    entries = index_entries(store)
    for record in iter_array_records(store.manifest()["state"]):
        for digest, *_ in record.chunks:
            assert not isinstance(entries[bytes.fromhex(digest)], EncodedBlob)
    assert store.verify(all=True).ok
    assert_restores(store, reference)
    assert_same(store.load().state, reference[1].state)


def test_gc_drops_versions_others_are_coded_against(store: Store) -> None:
    reference = commit_lineage(store, lineage(6))
    store.compact()
    # v0004 is the base of v0003; v0006 (HEAD) of v0005, served from its file
    store.gc(drop=[4])
    assert [v.id for v in store.versions()] == [1, 2, 3, 5, 6]
    assert store.verify(all=True).ok
    assert_restores(store, [s for s in reference if s.version.id != 4])
    # HEAD moves back: v0005 and v0006, whose file v0001..v0005 hang off, are dropped
    store.rollback(2)
    store.gc(drop=[5, 6])
    assert os.listdir(store.path / CHECKPOINT_DIR) == []  # weights moved into a pack
    assert store.verify(all=True).ok
    assert_restores(store, reference[:3])
    store.commit({"x": torch.ones(2)}, model=reference[0].model)
    store.compact()
    assert store.verify(all=True).ok
    assert_restores(store, reference[:3])


def test_corrupted_delta_is_detected(store_path: Path) -> None:
    with Store.open(store_path, mode="c") as store:
        reference = commit_lineage(store, lineage(4))
        store.compact()
        entries = index_entries(store)
    encoded = [e for e in entries.values() if isinstance(e, EncodedBlob)]
    target = max(encoded, key=lambda e: e.stored_nbytes)
    pack = store_path / "blobs" / f"pack-{target.pack:08d}.bin"
    data = bytearray(pack.read_bytes())
    data[target.offset + target.stored_nbytes // 2] ^= 0x10
    pack.write_bytes(bytes(data))
    with Store.open(store_path) as store:
        report = store.verify(all=True)
        assert not report.ok
        bad = {p.version for p in report.problems if p.version is not None}
        assert bad and 4 not in bad
        with pytest.raises(CorruptionError):
            for v in sorted(bad):
                store.load(v)
        assert_same(store.load().model, reference[-1].model)  # HEAD is intact


def write_v1_store(path: Path, versions) -> None:
    """A format-1 store written from its spec (format.py), without engram's Store."""
    (path / "blobs").mkdir(parents=True)
    (path / "checkpoints").mkdir()
    env = lmdb.open(str(path / "memory.lmdb"), max_dbs=8, map_size=1 << 26)
    with env.begin(write=True) as txn:
        dbs = {
            n: env.open_db(n, txn=txn)
            for n in (b"meta", b"blobs", b"versions", b"refs", b"samples")
        }
        for k, v in {
            "format_version": "1",
            "store_id": "ab" * 16,
            "created_at": "2026-01-01T00:00:00.000000Z",
            "next_version": str(len(versions) + 1),
            "next_pack": str(len(versions) + 1),
        }.items():
            txn.put(k.encode(), v.encode(), db=dbs[b"meta"])
        for vid, (fisher, weights) in enumerate(versions, start=1):
            raw = fisher.numpy().tobytes()
            digest = hashlib.sha256(raw).digest()
            check = checksum(raw)
            (path / "blobs" / f"pack-{vid:08d}.bin").write_bytes(raw)
            txn.put(
                digest, np.array([vid, 0, len(raw), check], dtype="<u8").tobytes(), db=dbs[b"blobs"]
            )
            file = path / "checkpoints" / f"model-v{vid:04d}.safetensors"
            save_file(weights, file, metadata={"version": f"v{vid:04d}"})
            body = file.read_bytes()
            manifest = {
                "format_version": 1, "engram_version": "0.1.0", "store_id": "ab" * 16, "id": vid,
                "parent": vid - 1 or None, "created_at": "2026-01-01T00:00:00.000000Z",
                "message": "", "meta": {},
                "state": {"fisher": {"__tensor__": {"dtype": "float32", "shape": list(fisher.shape), "chunks": [[digest.hex(), len(raw), check]]}}},
                "checkpoint": {"file": file.name, "sha256": hashlib.sha256(body).hexdigest(), "nbytes": len(body), "xxh3": checksum(body), "weights": weights_digest(weights)},
                "nbytes": len(raw) + len(body), "new_bytes": len(raw) + len(body),
            }  # fmt: skip
            txn.put(vid.to_bytes(8, "big"), json.dumps(manifest).encode(), db=dbs[b"versions"])
        txn.put(b"HEAD", str(len(versions)).encode(), db=dbs[b"refs"])
    env.close()


def test_a_format_1_store_is_read_compacted_and_marked_format_2(tmp_path: Path) -> None:
    path = tmp_path / "v1"
    versions = [(state["fisher"], weights) for state, weights in lineage(4)]
    write_v1_store(path, versions)
    with Store.open(path, mode="w") as store:
        assert store.verify(all=True).ok
        for vid, (fisher, _weights) in enumerate(versions, start=1):
            snap = store.load(vid, verify=True)
            assert_same(snap.state, {"fisher": fisher})
            assert_same(
                dict(snap.model),
                dict(load_file(path / "checkpoints" / f"model-v{vid:04d}.safetensors")),
            )
        store.commit({"fisher": versions[0][0]}, model=versions[0][1])  # still format 1
        assert store.manifest()["format_version"] == 1
        assert _meta_format(store) == b"1"
        reference = [store.load(v.id) for v in store.versions()]
        store.compact()
        assert _meta_format(store) == b"2"  # compacted, its records not sealed yet
        assert store.manifest(1)["format_version"] == 2 and store.manifest()["format_version"] == 1
        report = store.verify(all=True)
        assert report.ok and "predate checksums (format 2)" in report.notes[0]
        assert_restores(store, reference)
    # an engram that reads only format 1 would refuse it; ours reads it read-only too
    with Store.open(path) as store:
        assert_restores(store, reference)
    # upgrading seals every record: format 3, every version as it was
    with Store.open(path, mode="w") as store:
        assert store.upgrade() > 0 and store.upgrade() == 0
        assert _meta_format(store) == str(SEALED_FORMAT_VERSION).encode()
        report = store.verify(all=True)
        assert report.ok and report.notes == []
        assert_restores(store, reference)
        store.commit({"fisher": versions[1][0]}, model=versions[1][1])
    with Store.open(path) as store:
        assert store.verify(all=True).ok and store.load().state["fisher"].shape


def _meta_format(store: Store) -> bytes:
    with store.env.read() as txn:
        return bytes(store.env.get(txn, DB_META, b"format_version"))


def test_manifest_of_a_newer_format_is_refused(store: Store) -> None:
    commit_lineage(store, lineage(2))
    store.compact()
    manifest = store.manifest(1)
    manifest["format_version"] = FORMAT_VERSION + 1
    store.close()
    env = lmdb.open(str(store.path / LMDB_DIR), max_dbs=8)
    with env.begin(write=True) as txn:
        key = (1).to_bytes(8, "big")
        txn.put(key, seal(b"versions", key, json.dumps(manifest).encode()),
                db=env.open_db(b"versions", txn=txn))  # fmt: skip
    env.close()
    with Store.open(store.path) as reader, pytest.raises(StoreFormatError, match="upgrade"):
        reader.load(1)


def test_compacting_an_empty_or_single_version_store(store: Store) -> None:
    assert store.compact().versions == ()
    store.commit({"x": torch.ones(3)}, model={"w": torch.ones(4)})
    assert store.compact().versions == ()
    assert os.listdir(store.path / CHECKPOINT_DIR) == ["model-v0001.safetensors"]
