"""A commit's pipeline (issue 25): the state's chunks are hashed in parallel lanes that
leave the checkpoint file's hashing a core, new chunks are written before their
SHA-256 is known, and the disk starts on each file while it is written.

Whatever the schedule, a version must hold the bytes and digests a serial commit gives,
dedup must still hold, and a failure anywhere must leave no version.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import xxhash

from engram.store import Store, writeback
from engram.store import checkpoint as checkpoint_module
from engram.store import commit as commit_module
from engram.store.format import BLOB_DIR, CHECKPOINT_DIR, CHUNK_BYTES

DEADLINE_S = 10.0  # what a test waits for the other thread at most


def _state(seed: int, numel: int = (40 << 20) // 4) -> dict:
    """A state of several chunks: 40 MiB are 16 + 16 + 8 MiB, and a small tensor."""
    gen = torch.Generator().manual_seed(seed)
    return {"big": torch.randn(numel, generator=gen), "small": torch.randn(5, generator=gen)}


def _files(store: Store) -> set[str]:
    return {f"{d}/{p.name}" for d in (BLOB_DIR, CHECKPOINT_DIR) for p in (store.path / d).iterdir()}


def _pack_bytes(store: Store) -> int:
    return sum(p.stat().st_size for p in (store.path / BLOB_DIR).glob("pack-*.bin"))


def test_parallel_hashing_gives_what_serial_hashing_gives(tmp_path: Path, monkeypatch) -> None:
    state, model = _state(0), {"w": torch.randn(3 << 20)}  # the file hashed in a thread
    with Store.open(tmp_path / "parallel", mode="c") as a:
        a.commit(state, model=model)
        parallel = a.manifest()
        assert a.verify(all=True).ok
        packs_a = sorted((a.path / BLOB_DIR).glob("pack-*.bin"))
        pack_a = b"".join(p.read_bytes() for p in packs_a)
    monkeypatch.setattr(commit_module, "_INLINE_HASH_BYTES", 1 << 40)  # all in this thread
    monkeypatch.setattr(checkpoint_module, "_INLINE_HASH_BYTES", 1 << 40)
    with Store.open(tmp_path / "serial", mode="c") as b:
        b.commit(state, model=model)
        serial = b.manifest()
        packs_b = sorted((b.path / BLOB_DIR).glob("pack-*.bin"))
        pack_b = b"".join(p.read_bytes() for p in packs_b)
    assert parallel["state"] == serial["state"]
    for made, manifest in ((tmp_path / "parallel", parallel), (tmp_path / "serial", serial)):
        ckpt = manifest["checkpoint"]  # each file names its store: their hashes, not equal
        raw_file = (made / CHECKPOINT_DIR / ckpt["file"]).read_bytes()
        assert ckpt["sha256"] == hashlib.sha256(raw_file).hexdigest()
        assert ckpt["xxh3"] == xxhash.xxh3_64_intdigest(raw_file)
    assert parallel["checkpoint"]["weights"] == serial["checkpoint"]["weights"]
    assert pack_a == pack_b
    raw = state["big"].numpy().tobytes()
    chunks = parallel["state"]["big"]["__tensor__"]["chunks"]
    assert len(chunks) == 3
    for i, (digest, size, check) in enumerate(chunks):
        piece = raw[i * CHUNK_BYTES : i * CHUNK_BYTES + size]
        assert digest == hashlib.sha256(piece).hexdigest()
        assert check == xxhash.xxh3_64_intdigest(piece)


def test_new_chunks_are_written_before_their_digests_are_known(store: Store, monkeypatch) -> None:
    """The first digest waits until the pack holds every chunk: it never returns if
    the chunks are written only once hashed (then the wait gives up, and the test fails)."""
    state = _state(1)
    total = sum(t.numel() * 4 for t in state.values())
    real, seen = commit_module.chunk_digest, []

    def first_waits_for_the_pack(view):
        if not seen:
            deadline = time.monotonic() + DEADLINE_S
            while _pack_bytes(store) < total and time.monotonic() < deadline:
                time.sleep(0.001)
            seen.append(_pack_bytes(store) >= total)
        return real(view)

    monkeypatch.setattr(commit_module, "chunk_digest", first_waits_for_the_pack)
    store.commit(state)
    assert seen and all(seen)  # (two lanes may both have come first)
    assert store.verify(all=True).ok


def test_equal_chunks_in_one_commit_are_written_once(store: Store) -> None:
    big = _state(2)["big"]
    version = store.commit({"a": big, "b": big.clone(), "c": big.clone()})
    nbytes = big.numel() * 4
    assert version.new_bytes == nbytes
    assert nbytes <= _pack_bytes(store) < nbytes + 4096  # one copy, alignment padding
    loaded = store.load().state
    assert all(torch.equal(loaded[k], big) for k in "abc")


def test_a_state_committed_again_after_a_rollback_adds_nothing(store: Store) -> None:
    """Its chunks are not the parent's, so they are written ahead; their digests show
    them stored: they are not counted, and a pack holding only them is removed."""
    first = store.commit(_state(3))
    second_state = _state(4)
    store.commit(second_state)
    store.rollback(first.id)
    files = _files(store)
    again = store.commit(second_state)
    assert again.new_bytes == 0
    assert _files(store) == files
    assert torch.equal(store.load().state["big"], second_state["big"])
    assert store.verify(all=True).ok


def test_a_changed_chunk_is_written_beside_the_parents_unchanged_ones(store: Store) -> None:
    state = _state(5)
    store.commit(state)
    changed = state["big"].clone()
    changed[-1] += 1  # the third chunk only
    before = _pack_bytes(store)
    version = store.commit({**state, "big": changed})
    assert version.new_bytes == (40 << 20) - 2 * CHUNK_BYTES
    assert _pack_bytes(store) - before == version.new_bytes
    assert torch.equal(store.load().state["big"], changed)
    assert store.verify(all=True).ok


def _lane_probe(monkeypatch, *, chunks: int) -> dict:
    """Patches the chunk hashing to record how many digests run at once (each takes a
    moment, so two lanes overlap), and whether the checkpoint file was being hashed."""
    probe = {"running": 0, "most_during_file": 0, "done": 0, "file_hashing": False}
    probe["all_done"], probe["file_done"] = threading.Event(), threading.Event()
    lock, real = threading.Lock(), commit_module.chunk_digest

    def digest(view):
        with lock:
            probe["running"] += 1
            if probe["file_hashing"]:
                probe["most_during_file"] = max(probe["most_during_file"], probe["running"])
        try:
            time.sleep(0.02)
            return real(view)
        finally:
            with lock:
                probe["running"] -= 1
                probe["done"] += 1
                if probe["done"] == chunks:
                    probe["all_done"].set()

    monkeypatch.setattr(commit_module, "_hash_workers", lambda: 2)
    monkeypatch.setattr(commit_module, "chunk_digest", digest)
    return probe


def test_chunks_leave_a_core_to_the_checkpoint_file_while_it_is_hashed(
    store: Store, monkeypatch
) -> None:
    chunks = 6
    probe = _lane_probe(monkeypatch, chunks=chunks)
    real = checkpoint_module._file_hashes

    def file_hashes(header, views):  # hashing until every chunk is hashed
        probe["file_hashing"] = True
        probe["all_done"].wait(DEADLINE_S)
        try:
            return real(header, views)
        finally:
            probe["file_hashing"] = False

    monkeypatch.setattr(checkpoint_module, "_file_hashes", file_hashes)
    state = {f"t{i}": torch.randn(1 << 18) for i in range(chunks)}  # 6 MiB: in threads
    store.commit(state, model={"w": torch.randn(8)})
    assert probe["all_done"].is_set()
    assert probe["most_during_file"] == 1


def test_the_checkpoint_files_lane_goes_to_the_chunks_once_it_is_hashed(
    store: Store, monkeypatch
) -> None:
    """Two chunks meet at a barrier after the file is hashed: only two lanes let them."""
    _lane_probe(monkeypatch, chunks=6)
    file_done, meet, met = threading.Event(), threading.Barrier(2, timeout=DEADLINE_S), []
    lock, entered = threading.Lock(), []
    real_file, real_digest = checkpoint_module._file_hashes, commit_module.chunk_digest

    def file_hashes(header, views):
        try:
            return real_file(header, views)
        finally:
            file_done.set()

    def digest(view):
        file_done.wait(DEADLINE_S)
        with lock:  # the first two digests meet; the rest pass
            first_two = len(entered) < 2
            entered.append(1)
        if first_two:
            try:
                meet.wait()
                met.append(True)
            except threading.BrokenBarrierError:
                met.append(False)
        return real_digest(view)

    monkeypatch.setattr(checkpoint_module, "_file_hashes", file_hashes)
    monkeypatch.setattr(commit_module, "chunk_digest", digest)
    state = {f"t{i}": torch.randn(1 << 18) for i in range(6)}
    store.commit(state, model={"w": torch.randn(8)})
    assert met[:2] == [True, True]


def test_a_failing_chunk_hash_fails_the_commit_and_leaves_nothing(
    store: Store, monkeypatch
) -> None:
    head = store.commit({"x": torch.zeros(3)}, model={"w": torch.zeros(2)})
    files = _files(store)
    real, calls = commit_module.chunk_digest, []

    def fails_second(view):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("hash failed")
        return real(view)

    monkeypatch.setattr(commit_module, "chunk_digest", fails_second)
    with pytest.raises(RuntimeError, match="hash failed"):
        store.commit(_state(6), model={"w": torch.randn(3 << 20)})
    assert store.info("HEAD").id == head.id and len(store.versions()) == 1
    assert _files(store) == files  # the pack written ahead and the checkpoint: removed
    monkeypatch.undo()
    store.commit(_state(6))
    assert store.verify(all=True).ok


def test_a_failing_checkpoint_hash_fails_the_commit_and_leaves_no_version(
    store: Store, monkeypatch
) -> None:
    head = store.commit({"x": torch.zeros(3)})

    def fails(header, views):
        raise RuntimeError("file hash failed")

    monkeypatch.setattr(checkpoint_module, "_file_hashes", fails)
    with pytest.raises(RuntimeError, match="file hash failed"):
        store.commit(_state(7), model={"w": torch.randn(3 << 20)})
    assert store.info("HEAD").id == head.id and len(store.versions()) == 1
    assert not list((store.path / CHECKPOINT_DIR).iterdir())  # nor its temporary file
    monkeypatch.undo()
    store.commit(_state(7), model={"w": torch.randn(3 << 20)})
    assert store.verify(all=True).ok


@pytest.mark.skipif(sys.platform != "linux", reason="sync_file_range is Linux's")
def test_sync_file_range_is_found_and_accepted(tmp_path: Path) -> None:
    start = writeback._sync_file_range()
    assert start is not None
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(fd, b"x" * 8192)
        assert start(fd, 0, 8192, writeback._SYNC_FILE_RANGE_WRITE) == 0
    finally:
        os.close(fd)


def test_the_disk_starts_on_each_file_while_it_is_written(store: Store, monkeypatch) -> None:
    calls: list[tuple[int, int, int, int]] = []
    monkeypatch.setattr(writeback, "_sync_file_range", lambda: lambda *a: calls.append(a) or 0)
    store.commit(_state(8), model={"w": torch.randn(5 << 20)})  # a 20 MiB checkpoint file
    by_fd: dict[int, list[tuple[int, int]]] = {}
    for fd, offset, nbytes, flags in calls:
        assert flags == writeback._SYNC_FILE_RANGE_WRITE
        by_fd.setdefault(fd, []).append((offset, nbytes))
    assert len(by_fd) == 2  # the pack and the checkpoint file
    for ranges in by_fd.values():
        at = 0
        for offset, nbytes in ranges:  # in order, from the start, no gap
            assert offset == at and nbytes >= writeback.STEP_BYTES
            at += nbytes
        assert at >= 16 << 20
