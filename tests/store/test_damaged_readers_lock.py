"""A long-lived reader whose store's lock table (``memory.lmdb/lock.mdb``) is deleted
under it: the next writer makes a new one that lacks the reader, so it reuses pages
the reader still reads. The reader must notice (its lock file is not the one on disk
any more) and reopen, so that the writer sees its transactions again, and it must not
report what it read meanwhile as corruption."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from children import LINUX_ONLY

from engram.store import Store

pytestmark = LINUX_ONLY

N_COMMITS = 40

READER = """
from engram.errors import CorruptionError, EngramError
path = sys.argv[1]
counts = {"loads": 0, "corruption": 0, "other": 0}
last = -1
with Store.open(path, mode="r") as reader:
    print("ready", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not os.path.exists(sys.argv[2]):
        try:
            snap = reader.load()
            for v in reader.versions():
                reader.manifest(v.id)
            i = snap.version.meta["i"]
            assert bool((snap.state["big"] == i).all()) and snap.state["i"] == i, i
            last = max(last, i)
            counts["loads"] += 1
        except CorruptionError as e:
            counts["corruption"] += 1
            counts["example"] = str(e)
        except EngramError as e:  # e.g. LockTableReplacedError: run again
            counts["other"] += 1
            counts["other_example"] = f"{type(e).__name__}: {e}"
    # the newest version, read once the writer is done
    counts["last"], counts["final"] = last, reader.load().version.meta["i"]
    print("counts", json.dumps(counts), flush=True)
    with reader.env.read() as txn:  # held while the writer looks at its reader table
        print("holding", txn.id(), os.getpid(), flush=True)
        sys.stdin.readline()
"""


def _commit(store: Store, i: int) -> None:
    state = {"big": torch.full((1 << 16,), float(i)), "i": i}  # 256 KiB: pages get reused
    # manifests on overflow pages (a long read), tags moved in tiny transactions: the
    # writer frees and reuses LMDB pages quickly
    info = store.commit(state, model={"w": torch.full((64,), float(i))}, meta={"i": i},
                 message=f"{i}" * 6000)  # fmt: skip
    for _ in range(10):
        store.tag("moving", info.id)


def test_a_reader_reopens_when_the_lock_table_is_deleted(spawn, tmp_path: Path) -> None:
    path, stop = tmp_path / "s", tmp_path / "stop"
    with Store.open(path, mode="c") as store:
        for i in range(3):
            _commit(store, i)
    reader = spawn(READER, path, stop)
    reader.expect("ready")
    (path / "memory.lmdb" / "lock.mdb").unlink()  # e.g. a clean-up script, an rsync
    with Store.open(path, mode="w") as store:  # makes a new lock table
        for i in range(3, 3 + N_COMMITS):
            _commit(store, i)
            if i % 5 == 0:
                store.gc(keep_last=2)  # frees (and so reuses) more pages
        stop.touch()
        counts = json.loads(reader.expect("counts").split(" ", 1)[1])
        _, snapshot, pid = reader.expect("holding").split()
        # The writer's lock table lists the reader's transaction (so the pages it reads
        # are not reused), and that is the newest snapshot: without the reopen the
        # reader stays registered in the deleted lock file, with a stale id.
        readers = store.env.checked().readers()
        last_txnid = store.env.last_txnid()
        reader.send("")
    reader.finish()
    assert counts["corruption"] == 0, counts
    assert counts["loads"] > 0, counts
    assert counts["final"] == 2 + N_COMMITS, counts  # it sees the writer's commits
    assert any(line.split()[:1] == [pid] for line in readers.splitlines()[1:]), readers
    assert int(snapshot) == last_txnid
