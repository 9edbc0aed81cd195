"""Format 3: every LMDB record is sealed, so bit rot in a manifest, a ref, the meta, a
blob-index entry or a replay sample is reported with its database and key, never used."""

from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from engram.errors import CorruptionError, StoreFormatError
from engram.store import SampleIds, Store
from engram.store.format import LMDB_DIR

RECORD = 16


def make_store(path: Path) -> list[int]:
    with Store.open(path, mode="c") as store:
        ids = store.samples.append([bytes([i]) * RECORD for i in range(4)])
        store.commit({"slots": SampleIds(torch.tensor(ids)), "w": torch.ones(3)},
                     meta={"metrics": {"average_accuracy": 0.991}})  # fmt: skip
        store.commit({"slots": SampleIds(torch.tensor(ids)), "w": torch.ones(3) * 2})
        store.tag("prod", 1)
    return ids


def rot(path: Path, db: bytes, key: bytes, where: int = 0) -> None:
    """Flip one bit of a stored value in place, leaving its seal as it was (bit rot)."""
    env = lmdb.open(str(path / LMDB_DIR), max_dbs=8)
    with env.begin(write=True) as txn:
        handle = env.open_db(db, txn=txn)
        value = bytearray(txn.get(key, db=handle))
        value[where] ^= 0x04
        txn.put(key, bytes(value), db=handle)
    env.close()


def test_the_measured_case_a_digit_of_an_accuracy_in_data_mdb(tmp_path: Path) -> None:
    """0.991 -> 0.995 inside data.mdb itself used to pass verify and show in `engram ls`."""
    path = tmp_path / "s"
    make_store(path)
    data = path / LMDB_DIR / "data.mdb"
    raw = data.read_bytes()
    assert b"0.991" in raw
    data.write_bytes(raw.replace(b"0.991", b"0.995"))  # the live page and any stale copy
    with Store.open(path) as store:
        report = store.verify(all=True)
        assert not report.ok
        assert any(p.version == 1 and "versions/v0001" in p.message and "checksum" in p.message
                   for p in report.problems), report.problems  # fmt: skip
        with pytest.raises(CorruptionError, match="versions/v0001.*checksum"):
            store.info(1)
        assert store.load().state["w"].tolist() == [2.0, 2.0, 2.0]  # HEAD is intact


@pytest.mark.parametrize(
    ("db", "key", "read"),
    [
        (b"versions", (2).to_bytes(8, "big"), lambda s: s.load(2)),
        (b"refs", b"HEAD", lambda s: s.head),
        (b"refs", b"tag/prod", lambda s: s.load("prod")),
        (b"blobs", None, lambda s: s.load(2)),
    ],
    ids=["manifest", "HEAD", "tag", "blob-index"],
)
def test_a_rotten_record_is_corruption_naming_it(tmp_path: Path, db, key, read) -> None:
    path = tmp_path / "s"
    make_store(path)
    if key is None:  # the index entry of HEAD's tensor
        with Store.open(path) as store:
            digest = store.manifest(2)["state"]["w"]["__tensor__"]["chunks"][0][0]
        key = bytes.fromhex(digest)
    rot(path, db, key)
    with Store.open(path) as store:
        with pytest.raises(CorruptionError, match=f"{db.decode()}/.*checksum"):
            read(store)
        report = store.verify(all=True)
        assert any(f"record {db.decode()}" == p.where for p in report.problems), report.problems


def test_a_rotten_replay_sample_is_never_returned(tmp_path: Path) -> None:
    path = tmp_path / "s"
    ids = make_store(path)
    rot(path, b"samples", ids[2].to_bytes(8, "big"), where=3)
    with Store.open(path) as store:
        assert np.array_equal(store.samples.read(ids[:2], RECORD)[1], np.full(RECORD, 1, np.uint8))
        with pytest.raises(CorruptionError, match=f"samples/sample {ids[2]}.*checksum"):
            store.samples.read(ids, RECORD)
        report = store.verify(all=True)
        assert "record samples" in [p.where for p in report.problems]
        assert any(p.version == 2 and "fail their checksum" in p.message for p in report.problems)


def test_rotten_store_metadata_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "s"
    make_store(path)
    rot(path, b"meta", b"store_id")
    with pytest.raises((CorruptionError, StoreFormatError), match="meta/store_id"):
        Store.open(path)


def test_a_new_store_is_sealed_and_says_format_3(tmp_path: Path) -> None:
    make_store(tmp_path / "s")
    env = lmdb.open(str(tmp_path / "s" / LMDB_DIR), max_dbs=8, readonly=True)
    with env.begin() as txn:
        meta = env.open_db(b"meta", txn=txn)
        assert txn.get(b"format_version", db=meta)[:-8] == b"3"
        assert txn.get(b"records", db=meta)[:-8] == b"sealed-xxh3-64"
    env.close()
    with Store.open(tmp_path / "s") as store:
        report = store.verify(all=True)
        assert report.ok and report.notes == []


def unseal_store(path: Path) -> None:
    """Turn a store back into what an older engram wrote (format 1: no seals)."""
    env = lmdb.open(str(path / LMDB_DIR), max_dbs=8)
    with env.begin(write=True) as txn:
        for name in (b"meta", b"blobs", b"versions", b"refs", b"samples"):
            db = env.open_db(name, txn=txn)
            for key, value in list(txn.cursor(db=db)):
                txn.put(key, value[:-8], db=db)
        meta = env.open_db(b"meta", txn=txn)
        txn.delete(b"records", db=meta)
        txn.put(b"format_version", b"1", db=meta)
    env.close()


def test_an_older_store_is_read_noted_and_upgraded_by_the_cli(tmp_path: Path, capsys) -> None:
    from engram.cli import main

    path = tmp_path / "s"
    ids = make_store(path)
    unseal_store(path)
    with Store.open(path) as store:
        report = store.verify(all=True)
        assert report.ok and "predate checksums (format 1)" in report.notes[0]
        assert store.load().state["w"].tolist() == [2.0, 2.0, 2.0]
    assert main(["verify", str(path), "--all"]) == 0
    assert f"engram upgrade {path}" in capsys.readouterr().out
    assert main(["upgrade", str(path)]) == 0
    assert "sealed with checksums; format 3" in capsys.readouterr().out
    rot(path, b"samples", ids[0].to_bytes(8, "big"), where=0)  # now rot is caught
    with Store.open(path) as store:
        report = store.verify(all=True)
        assert "record samples" in [p.where for p in report.problems] and report.notes == []


def put_sealed(path: Path, db: bytes, key: bytes, payload: bytes) -> None:
    """A hostile record with a valid seal: what is tested is the validation behind it."""
    from engram.store.records import seal

    env = lmdb.open(str(path / LMDB_DIR), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(key, seal(db, key, payload), db=env.open_db(db, txn=txn))
    env.close()


def test_a_tag_key_that_is_not_text_is_corruption_not_a_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "s"
    make_store(path)
    put_sealed(path, b"refs", b"tag/\xff\xfe", b"1")
    with Store.open(path) as store:
        with pytest.raises(CorruptionError, match="a tag key is not a tag name"):
            store.versions()
        with pytest.raises(CorruptionError, match="refs database is damaged"):
            store.tags()


def test_a_compacted_manifest_claiming_a_huge_tensor_is_refused_before_allocating(
    tmp_path: Path,
) -> None:
    import json

    from engram.errors import EngramError

    path = tmp_path / "s"
    with Store.open(path, mode="c") as store:
        for i in range(3):
            store.commit({"i": i}, model={"w": torch.full((64,), float(i))})
        store.compact()
        manifest = store.manifest(1)
    record = manifest["model"]["tensors"]["__map__"][0][1]["__tensor__"]
    record["shape"] = [2**40]  # 4 TiB of float32
    put_sealed(path, b"versions", (1).to_bytes(8, "big"), json.dumps(manifest).encode())
    refused = "malformed tensor record|memory available"  # either way: before allocating
    with Store.open(path) as store, pytest.raises(EngramError, match=refused):
        store.load(1)
