"""Pruning the versions a writer made since a fence (engram.store.gc.prune), and the
training policy that prunes mid-experience versions with it: it deletes what only the
dropped versions referenced, reads only the versions made since the fence, and leaves
the rest to a full gc."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lmdb
import pytest
import torch

from engram.errors import CorruptionError, VersionNotFoundError
from engram.store import Store
from engram.store import format as fmt
from engram.store.codec import SampleIds
from engram.store.gc import Fence, prune
from engram.store.history import History
from engram.store.packs import pack_name
from engram.training.policy import CommitPolicy


def weights(seed: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((8, 8), seed), "b": torch.full((8,), seed)}


def tensor(seed: float) -> torch.Tensor:
    return torch.full((64,), seed)


def mid(experience: int) -> dict[str, Any]:
    return {"kind": "mid-experience", "experience": experience}


def end(experience: int) -> dict[str, Any]:
    return {"kind": "experience", "experience": experience}


def contents(s: Store) -> dict[str, Any]:
    """What a store holds: versions with their parents, index keys, sample ids, files."""
    with s.env.read() as txn:
        index = {bytes(k) for k in s.env.keys(txn, fmt.DB_BLOBS)}
        samples = {int.from_bytes(k, "big") for k in s.env.keys(txn, fmt.DB_SAMPLES)}
    versions = {v.id: v.parent for v in s.versions()}
    files = {f"{d}/{p.name}" for d in (fmt.BLOB_DIR, fmt.CHECKPOINT_DIR)
             for p in (s.path / d).iterdir()}  # fmt: skip
    return {"versions": versions, "index": index, "samples": samples, "files": files}


def older_history(s: Store) -> list[int]:
    """Experiences 0 and 1 ended before the fence; ids of four samples: 1 and 2
    referenced by both versions, 3 by v2 only, 4 flushed but referenced by none."""
    ids = s.samples.append([b"a" * 16, b"b" * 16, b"c" * 16, b"d" * 16])
    s.commit({"anchor": tensor(1), "slots": SampleIds.of(ids[:2])}, model=weights(1), meta=end(0))
    s.commit({"anchor": tensor(1), "prev": tensor(7), "slots": SampleIds.of(ids[:3])},
             model=weights(2), meta=end(1))  # fmt: skip
    s.samples.flush()
    return ids


def experience_two(s: Store, old: list[int]) -> tuple[list[int], list[int]]:
    """Two mid-experience versions and the experience's end; returns their ids and the
    new samples' ids. What each references:

    - m1: v2's tensors, a tensor of its own, samples old[2] (v2's), old[3] (no
      version's) and new[0:2], v2's weights (so v2's checkpoint file);
    - m2: a tensor the end version shares, samples new[1:3], new weights (its own file);
    - end: the anchor, m2's tensor, samples old[0], new[2:4], new weights.
    """
    new = s.samples.append([b"e" * 16, b"f" * 16, b"g" * 16, b"h" * 16])
    m1 = s.commit({"anchor": tensor(1), "prev": tensor(7), "own": tensor(3),
                   "slots": SampleIds.of(old[2:] + new[:2])}, model=weights(2), meta=mid(2))  # fmt: skip
    m2 = s.commit({"anchor": tensor(1), "own": tensor(4), "slots": SampleIds.of(new[1:3])},
                  model=weights(3), meta=mid(2))  # fmt: skip
    e = s.commit({"anchor": tensor(1), "own": tensor(4), "slots": SampleIds.of(old[:1] + new[2:])},
                 model=weights(5), meta=end(2))  # fmt: skip
    assert m1.checkpoint == s.info(2).checkpoint != m2.checkpoint
    return [m1.id, m2.id, e.id], new


def test_prune_deletes_what_only_the_dropped_versions_made_and_matches_a_full_gc(
    tmp_path: Path,
) -> None:
    path, copy = tmp_path / "s", tmp_path / "copy"
    with Store.open(path, mode="c") as s:
        old = older_history(s)
        fence = Fence.take(s)
        (m1, m2, e), new = experience_two(s, old)
        shutil.copytree(path, copy)
        report = prune(s, [m1, m2], fence)
        assert report is not None and report.versions == (m1, m2)
        assert s.verify(all=True).ok and s.load().state["slots"].tolist() == old[:1] + new[2:]
        assert [(v.id, v.parent) for v in s.versions()] == [(1, None), (2, 1), (e, 2)]
        pruned = contents(s)
    with Store.open(copy, mode="w") as s:
        s.gc(drop=[m1, m2])
        collected = contents(s)
    # m1's pack (its tensor, its slot table) and m2's checkpoint file went; m2's pack
    # stays: it holds the end version's tensor (and held m2's slot table)
    assert set(report.files) == {
        f"blobs/{pack_name(fence.next_pack)}",
        f"checkpoints/model-v{m2:04d}-exp2.safetensors",
    }
    assert report.blobs == 3 and report.samples == 2  # samples new[0] and new[1]
    # The same result as a full gc, except sample old[3]: flushed before the fence and
    # referenced only by m1, it is older than the fence and stays for a full gc.
    assert collected["samples"] == pruned["samples"] - {old[3]}
    assert {k: v for k, v in pruned.items() if k != "samples"} == {
        k: v for k, v in collected.items() if k != "samples"
    }
    with Store.open(path, mode="w") as s:
        assert s.gc().samples == 1
        assert contents(s) == collected


def test_prune_reads_only_the_versions_made_since_the_fence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(tmp_path / "s", mode="c") as s:
        for i in range(20):  # a longer history before the fence
            s.commit({"step": i, "t": tensor(i)}, model=weights(i), meta=end(i))
        fence = Fence.take(s)
        first = fence.next_version
        ids = [s.commit({"t": tensor(100 + i)}, model=weights(100 + i), meta=mid(20)).id
               for i in range(3)]  # fmt: skip
        s.commit({"t": tensor(200)}, model=weights(200), meta=end(20))
        read: list[int] = []
        manifest = History.manifest
        monkeypatch.setattr(
            History, "manifest", lambda self, txn, vid: read.append(vid) or manifest(self, txn, vid)
        )
        assert prune(s, ids, fence) is not None
        monkeypatch.undo()
        assert read and min(read) >= first
        assert s.verify(all=True).ok and len(s.versions()) == 21


def test_a_fence_no_longer_holds_after_a_full_collection_or_in_another_store(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s"
    with Store.open(path, mode="c") as s:
        s.commit({"t": tensor(0)}, meta=end(0))
        fence = Fence.take(s)
        m = s.commit({"t": tensor(1)}, meta=mid(1)).id
        s.commit({"t": tensor(2)}, meta=end(1))
        assert fence.holds(s)
        s.compact()  # moves and rewrites what older versions reference
        assert not fence.holds(s)
        assert prune(s, [m], fence) is None and m in {v.id for v in s.versions()}
        fence = Fence.take(s)
        s.gc()
        assert prune(s, [m], fence) is None
        fence = Fence.take(s)
    with Store.open(path, mode="w") as s:  # another writer could have run in between
        assert not fence.holds(s) and prune(s, [m], fence) is None
        assert m in {v.id for v in s.versions()}


def test_prune_refuses_what_it_cannot_drop(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", mode="c") as s:
        old = s.commit({"t": tensor(0)}, meta=mid(0)).id
        fence = Fence.take(s)
        m = s.commit({"t": tensor(1)}, meta=mid(0)).id
        s.tag("keep", m)
        head = s.commit({"t": tensor(2)}, meta=end(0)).id
        assert prune(s, [old], fence) is None  # older than the fence: a full gc's job
        with pytest.raises(ValueError, match="HEAD and tagged versions are kept"):
            prune(s, [head], fence)
        with pytest.raises(ValueError, match="v0002"):
            prune(s, [m], fence)
        with pytest.raises(VersionNotFoundError):
            prune(s, [head + 1], fence)
        assert [v.id for v in s.versions()] == [old, m, head]


def spoil(s: Store, vid: int, record: bytes | None = None) -> bytes:
    """Damage version ``vid``'s manifest record (it then fails its checksum), or put
    ``record`` back; returns the record as it was."""
    key, db = vid.to_bytes(8, "big"), s.env.dbs[fmt.DB_VERSIONS]

    def work(txn: lmdb.Transaction) -> bytes:
        raw = bytes(txn.get(key, db=db))
        txn.put(key, record if record is not None else b"#" + raw[1:], db=db)
        return raw

    return s.env.write(work)


def test_a_damaged_manifest_since_the_fence_stops_it_an_older_one_does_not(
    tmp_path: Path,
) -> None:
    with Store.open(tmp_path / "s", mode="c") as s:
        s.commit({"t": tensor(0)}, model=weights(0), meta=end(0))
        s.commit({"t": tensor(1)}, model=weights(1), meta=end(1))
        fence = Fence.take(s)
        m1 = s.commit({"t": tensor(2)}, model=weights(2), meta=mid(2)).id
        m2 = s.commit({"t": tensor(3)}, model=weights(3), meta=mid(2)).id
        e = s.commit({"t": tensor(4)}, model=weights(4), meta=end(2)).id
        record = spoil(s, m2)
        before = contents(s)
        with pytest.raises(CorruptionError, match="v0004"):
            prune(s, [m1], fence)
        assert contents(s) == before  # nothing deleted
        spoil(s, m2, record)
        spoil(s, 1)  # older than the fence: never read
        assert prune(s, [m1, m2], fence) is not None
        assert [(v.id, v.parent) for v in s.versions()] == [(2, 1), (e, 2)]
        assert [vid for vid, _ in s.damaged()] == [1]
        assert s.verify().ok


class Spy:
    """Counts full gc calls and records which manifests are read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.full_gcs, self.read = 0, []
        gc, manifest = Store.gc, History.manifest

        def full_gc(store: Store, **kwargs: Any) -> Any:
            self.full_gcs += 1
            return gc(store, **kwargs)

        def read(history: History, txn: Any, vid: int) -> Any:
            self.read.append(vid)
            return manifest(history, txn, vid)

        monkeypatch.setattr(Store, "gc", full_gc)
        monkeypatch.setattr(History, "manifest", read)

    def reset(self) -> None:
        self.full_gcs, self.read = 0, []


def experience(s: Store, policy: CommitPolicy, index: int, spy: Spy | None = None) -> int:
    """What the template does for one experience: mid-experience commits (each with
    replay samples of its own), the experience's version, then the policy's prune
    (``spy`` reset just before it)."""
    for i in range(3):
        ids = s.samples.append([bytes([index, i]) * 8])
        s.commit({"t": tensor(100 * index + i), "slots": SampleIds.of(ids)},
                 model=weights(100 * index + i), meta=mid(index))  # fmt: skip
    with s.env.read() as txn:
        before = set(History(s.env).ids(txn))
    version = s.commit({"t": tensor(100 * index + 99)}, model=weights(100 * index + 99),
                       meta=end(index))  # fmt: skip
    if spy is not None:
        spy.reset()
    policy.prune(s, before, index)
    return version.id


def test_the_policy_prunes_later_experiences_reading_only_what_they_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(tmp_path / "s", mode="c") as s:
        for i in range(10):  # an older history
            s.commit({"t": tensor(-i)}, model=weights(-i), meta=end(i))
        policy, spy = CommitPolicy(every_iterations=1), Spy(monkeypatch)
        ends = [experience(s, policy, 10, spy)]
        assert spy.full_gcs == 1  # the first prune of a process lists and collects all
        for index in (11, 12):
            ends.append(experience(s, policy, index, spy))
            assert spy.full_gcs == 0 and min(spy.read) == ends[-2] + 1  # its own versions
        monkeypatch.undo()
        assert [v.id for v in s.versions()][-3:] == ends
        assert all(v.meta["kind"] == "experience" for v in s.versions())
        assert s.verify(all=True).ok
        report = s.gc()  # nothing the prunes left behind
        assert (report.blobs, report.files, report.samples) == (0, (), 0)


def test_the_policy_still_prunes_mid_experience_versions_older_than_its_fence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(tmp_path / "s", mode="c") as s:
        s.commit({"t": tensor(0)}, meta=end(0))
        stray = s.commit({"t": tensor(1)}, meta=mid(2)).id  # e.g. a run rolled back
        tagged = s.commit({"t": tensor(2)}, meta=mid(2)).id
        s.tag("look", tagged)
        s.rollback(1)
        policy, spy = CommitPolicy(every_iterations=1), Spy(monkeypatch)
        experience(s, policy, 1)  # the fence is taken after this prune
        assert {stray, tagged} <= {v.id for v in s.versions()}
        s.untag("look")
        experience(s, policy, 2, spy)
        assert spy.full_gcs == 1  # versions older than the fence: a full gc drops them
        monkeypatch.undo()
        assert all(v.meta["kind"] == "experience" for v in s.versions())
        assert s.verify(all=True).ok


def test_after_a_compaction_the_policy_collects_in_full_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(tmp_path / "s", mode="c") as s:
        policy, spy = CommitPolicy(every_iterations=1), Spy(monkeypatch)
        experience(s, policy, 0)
        s.compact()  # e.g. a plugin compacting after each experience
        experience(s, policy, 1, spy)
        assert spy.full_gcs == 1
        experience(s, policy, 2, spy)
        assert spy.full_gcs == 0
        monkeypatch.undo()
        assert [v.meta["kind"] for v in s.versions()] == ["experience"] * 3
        assert s.verify(all=True).ok


def test_watching_the_store_first_makes_even_the_first_prune_read_only_its_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store.open(tmp_path / "s", mode="c") as s:
        for i in range(5):
            s.commit({"t": tensor(-i)}, meta=end(i))
        stray = s.commit({"t": tensor(-9)}, meta=mid(5)).id  # an interrupted run's
        policy, spy = CommitPolicy(every_iterations=1), Spy(monkeypatch)
        policy.watch(s)
        first = experience(s, policy, 5, spy)
        assert spy.full_gcs == 1  # the interrupted run's version is older than the fence
        experience(s, policy, 6, spy)
        assert spy.full_gcs == 0 and min(spy.read) == first + 1
        monkeypatch.undo()
        assert stray not in {v.id for v in s.versions()}
        assert all(v.meta["kind"] == "experience" for v in s.versions())
        assert s.verify(all=True).ok
    with Store.open(tmp_path / "s", mode="w") as s:  # another process
        policy, spy = CommitPolicy(every_iterations=1), Spy(monkeypatch)
        policy.watch(s)
        experience(s, policy, 7, spy)
        assert spy.full_gcs == 0 and spy.read and min(spy.read) > first
