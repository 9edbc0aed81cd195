"""The store never reaches outside its directory: no write, truncation or deletion
through a symbolic link (or a hard link) planted inside it, and no reader blocked by a
FIFO in place of one of its files. The store's own path may be a link (the user's
choice). Real links and FIFOs, no mocks; each reader that could block runs in a child
with a deadline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from test_damaged_readers import run_readers

from engram.cli import main
from engram.errors import UnsafeStoreError
from engram.models import build_model
from engram.store import Store
from engram.store.inspect import disk_usage
from engram.store.lock import WriterLock

SPEC = {"name": "mlp", "args": {"input_shape": [8], "n_classes": 3, "hidden": [16]}}
VICTIM_TEXT = b"someone else's file\n"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three versions (each its own checkpoint and pack), HEAD tagged."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("made") / "store"
    with Store.open(path, mode="c") as store:
        for i in range(3):
            store.commit({"w": torch.randn(100)}, model=build_model(SPEC),
                         meta={"experience": i, "model_spec": SPEC})  # fmt: skip
        store.tag("prod")
    return path


@pytest.fixture
def store(made: Path, tmp_path: Path) -> Path:
    shutil.copytree(made, tmp_path / "s")
    return tmp_path / "s"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside the store that nothing may write."""
    path = tmp_path / "outside" / "victim.txt"
    path.parent.mkdir()
    path.write_bytes(VICTIM_TEXT)
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def plant_link(name: Path, target: Path) -> None:
    if name.is_dir():
        shutil.rmtree(name)
    else:
        name.unlink(missing_ok=True)
    name.symlink_to(target)


# ------------------------------------------------------------ links inside the store


def test_a_linked_writer_lock_is_not_truncated(
    store: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plant_link(store / "writer.lock", victim)
    code, out = cli(capsys, "tag", store, "t")
    assert code == 2, out
    assert "writer.lock is a symbolic link" in out and out.count("\n") == 1, out
    assert victim.read_bytes() == VICTIM_TEXT


def test_the_writer_lock_itself_never_opens_a_link(tmp_path: Path, victim: Path) -> None:
    """The lock's own defence, apart from the check of the store at open."""
    (tmp_path / "writer.lock").symlink_to(victim)
    with pytest.raises(UnsafeStoreError, match="is a symbolic link"):
        WriterLock(tmp_path / "writer.lock").acquire()
    assert victim.read_bytes() == VICTIM_TEXT


def test_a_hard_linked_writer_lock_is_not_truncated(
    store: Path, victim: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (store / "writer.lock").unlink()
    os.link(victim, store / "writer.lock")
    code, out = cli(capsys, "tag", store, "t")
    assert code == 2 and "hard link" in out, out
    assert victim.read_bytes() == VICTIM_TEXT


@pytest.mark.parametrize("command", [["ls"], ["verify", "--untrusted"], ["verify"]])
def test_a_linked_lmdb_lock_file_is_not_written_by_a_reader(
    store: Path, victim: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    plant_link(store / "memory.lmdb" / "lock.mdb", victim)
    code, out = cli(capsys, *command, store)
    assert code in (1, 2), out  # verify --untrusted: exit 1, the store is unusable
    assert "lock.mdb is a symbolic link" in out and out.count("\n") == 1, out
    assert victim.read_bytes() == VICTIM_TEXT


def test_a_linked_lmdb_data_file_is_refused(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = store / "memory.lmdb" / "data.mdb"
    elsewhere = tmp_path / "outside.mdb"
    shutil.move(data, elsewhere)
    data.symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    code, out = cli(capsys, "tag", store, "t")
    assert code == 2 and "data.mdb is a symbolic link" in out, out
    assert elsewhere.read_bytes() == before


@pytest.mark.parametrize(
    ("sub", "name"),
    [("checkpoints", "model-v0099-exp9.safetensors"), ("blobs", "pack-00000099.bin")],
)
def test_gc_deletes_nothing_through_a_linked_directory(
    store: Path, tmp_path: Path, sub: str, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    shutil.copytree(store / sub, other)
    (other / name).write_bytes(b"not the store's")  # what gc would collect as an orphan
    plant_link(store / sub, other)
    before = sorted(os.listdir(other))
    code, out = cli(capsys, "gc", store)
    assert code == 2 and f"{sub} is a symbolic link" in out, out
    assert (other / name).read_bytes() == b"not the store's"
    assert sorted(os.listdir(other)) == before


def test_gc_deletes_nothing_through_a_directory_linked_after_open(
    store: Path, tmp_path: Path
) -> None:
    """The check at open is not the only one: gc unlinks relative to a descriptor of the
    directory, opened without following a link."""
    other = tmp_path / "other"
    with Store.open(store, mode="w") as opened:
        shutil.copytree(store / "checkpoints", other)
        (other / "model-v0099-exp9.safetensors").write_bytes(b"x")
        plant_link(store / "checkpoints", other)
        with pytest.raises(UnsafeStoreError, match="checkpoints is a symbolic link"):
            opened.gc()
    assert (other / "model-v0099-exp9.safetensors").exists()


def test_a_commit_does_not_write_through_a_planted_pack_link(store: Path, victim: Path) -> None:
    with Store.open(store) as opened, opened.env.read() as txn:
        next_pack = opened.env.counter(txn, b"next_pack")
    plant_link(store / "blobs" / f"pack-{next_pack:08d}.bin", victim)
    with Store.open(store, mode="w") as opened:
        opened.commit({"w": torch.randn(100)})  # a new blob: written to that name
        assert opened.verify(all=True).ok
    assert victim.read_bytes() == VICTIM_TEXT
    assert not (store / "blobs" / f"pack-{next_pack:08d}.bin").is_symlink()


def test_a_store_path_that_is_a_link_works(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "runs"
    link.symlink_to(store)  # e.g. runs -> /data/runs
    for argv in (["ls"], ["verify", "--all"], ["verify", "--untrusted"], ["tag", "t"],
                 ["gc", "--keep-last", "1"], ["compact"]):  # fmt: skip
        code, out = cli(capsys, argv[0], link, *argv[1:])
        assert code == 0, (argv, out)
    with Store.open(link) as opened:
        assert opened.verify(all=True).ok


# ------------------------------------------------------------ FIFOs


def test_a_fifo_in_place_of_a_checkpoint_blocks_no_reader(store: Path, tmp_path: Path) -> None:
    """Each reader runs in a forked child with a deadline: it must return an error, not
    block in ``open()`` waiting for a FIFO's writer."""
    head = store / "checkpoints" / "model-v0003-exp2.safetensors"
    head.unlink()
    os.mkfifo(head)
    out = tmp_path / "export"
    out.mkdir()
    s = str(store)
    readers = [
        ["verify", s],
        ["verify", "--untrusted", s],
        ["load_model", s],
        ["export", s, "--out", str(out / "m.safetensors")],
        ["compact", s],
    ]
    results = run_readers(readers, tmp_path, timeout=30)
    for argv, r in zip(readers, results, strict=True):
        assert r["exit"] is not None, f"{argv} hung on the FIFO"
        assert r["exit"] in (1, 2) and not r["traceback"], (argv, r)
        assert "is a FIFO, not a regular file" in r["output"], (argv, r)
    assert not (out / "m.safetensors").exists()


def test_a_fifo_in_place_of_a_pack_or_data_file_blocks_no_reader(
    store: Path, tmp_path: Path
) -> None:
    other = tmp_path / "t"
    shutil.copytree(store, other)
    pack = store / "blobs" / "pack-00000001.bin"  # v0001's state
    pack.unlink()
    os.mkfifo(pack)
    data = other / "memory.lmdb" / "data.mdb"
    data.unlink()
    os.mkfifo(data)
    readers = [["diff", str(store), "1", "2"], ["ls", str(other)],
               ["verify", "--untrusted", str(other)]]  # fmt: skip
    for argv, r in zip(readers, run_readers(readers, tmp_path, timeout=30), strict=True):
        assert r["exit"] in (1, 2) and not r["traceback"], (argv, r)
        assert "is a FIFO" in r["output"], (argv, r)


def test_du_does_not_walk_a_link_out_of_the_store(store: Path, tmp_path: Path) -> None:
    outside = tmp_path / "big"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"\1" * (1 << 20))
    (store / "extra").symlink_to(outside)  # e.g. a link to / would walk the whole disk
    usage = disk_usage(store)
    assert usage["other"] < 4096, usage  # the link itself, not the 1 MiB behind it
