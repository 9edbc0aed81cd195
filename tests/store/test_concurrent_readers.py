"""Readers (here and in other processes) while a writer process commits: never a torn
state, never an error, also while the LMDB map grows."""

from __future__ import annotations

from pathlib import Path

import torch
from children import LINUX_ONLY

from engram.store import Store
from engram.store.format import LMDB_DIR

pytestmark = LINUX_ONLY


WRITER = """
path, n = sys.argv[1], int(sys.argv[2])
wait = "wait" in sys.argv[3:]  # after step 0, wait for a line on stdin (readers get ready)
# "grow": a 1 MiB LMDB map to start with and 1 MiB manifests: data.mdb grows by 1 MiB
# per commit, past the map of any reader opened before
grow = "grow" in sys.argv[3:]
with Store.open(path, mode="c", **({"map_size": 1 << 20} if grow else {})) as store:
    model = torch.nn.Linear(64, 32)
    for i in range(n):
        size = (1 << 18) * (1 + i % 4)  # 1-4 MiB, so some versions take a while
        state = {
            "big": torch.full((size,), float(i)),
            "nested": {"a": torch.full((3, 4), i, dtype=torch.int64),
                       "list": [torch.full((7,), float(i), dtype=torch.float64)]},
            "i": i,
        }
        with torch.no_grad():
            model.weight.fill_(float(i))
            model.bias.fill_(float(i))
        meta = {"i": i, "pad": "p" * (1 << 20)} if grow else {"i": i}
        info = store.commit(state, model=model, meta=meta)
        print("committed", info.id, i, flush=True)
        if wait and i == 0:
            sys.stdin.readline()
        time.sleep(0.01)
"""


def _check_consistent(snap) -> int:
    i = snap.version.meta["i"]
    assert snap.version.id == i + 1
    state = snap.state
    assert state["i"] == i
    assert state["big"].numel() == (1 << 18) * (1 + i % 4)
    assert bool((state["big"] == i).all())
    assert bool((state["nested"]["a"] == i).all())
    assert bool((state["nested"]["list"][0] == i).all())
    assert set(snap.model) == {"weight", "bias"}
    assert bool((snap.model["weight"] == i).all()) and bool((snap.model["bias"] == i).all())
    return i


READER = """
path, n = sys.argv[1], int(sys.argv[2])
with Store.open(path, mode="r") as reader:
    print("ready", flush=True)
    last, loads, seen = -1, 0, set()
    deadline = time.monotonic() + 90
    while last < n - 1 and time.monotonic() < deadline:
        snap = reader.load()
        i = snap.version.meta["i"]
        assert snap.version.id == i + 1 and i >= last, (i, last)
        assert snap.state["i"] == i and bool((snap.state["big"] == i).all())
        assert bool((snap.state["nested"]["a"] == i).all())
        assert bool((snap.state["nested"]["list"][0] == i).all())
        assert bool((snap.model["weight"] == i).all()) and bool((snap.model["bias"] == i).all())
        last, loads = i, loads + 1
        seen.add(i)
        time.sleep(0.002)
    print("done", last, loads, len(seen), flush=True)
"""


def test_readers_never_see_a_torn_state(spawn, tmp_path: Path) -> None:
    """Readers, here and in another process, load HEAD while a writer process commits."""
    path = tmp_path / "store"
    n = 30
    writer = spawn(WRITER, path, n, "wait")  # it waits after step 0, until readers are on
    writer.expect("committed")
    other = spawn(READER, path, n)
    other.expect("ready")
    seen: list[int] = []
    loads = 0
    with Store.open(path, mode="r") as reader:
        writer.send("go")
        while writer.proc.poll() is None:
            snap = reader.load(verify=loads % 5 == 0)  # must never raise
            i = _check_consistent(snap)
            assert not seen or i >= seen[-1], (seen[-1], i)  # HEAD never goes back
            if not seen or i != seen[-1]:
                seen.append(i)
            loads += 1
        lines = writer.finish()
        assert writer.proc.returncode == 0, writer.stderr()
        assert sum(line.startswith("committed") for line in lines) == n
        final = reader.load(verify=True)  # the finished writer's last version
        assert _check_consistent(final) == n - 1
        assert [v.id for v in reader.versions()] == list(range(1, n + 1))
        for v in (1, n // 2, n):  # older versions are intact too
            assert _check_consistent(reader.load(v)) == v - 1
    assert loads >= 10, loads
    assert len(seen) >= 3, seen  # the reader really ran while versions were published
    line = other.expect("done")
    other.finish()
    assert other.proc.returncode == 0, other.stderr()
    _, last, other_loads, other_seen = line.split()
    assert int(last) == n - 1 and int(other_loads) >= 10 and int(other_seen) >= 3, line


def test_reader_follows_a_growing_lmdb_map(spawn, tmp_path: Path) -> None:
    """LMDB's data grows, commit by commit, past the map of readers opened with a small
    ``map_size``: they adopt the new size (MDB_MAP_RESIZED is handled), nothing tears.

    A reopen that races a commit can also hit the bug that
    ``test_reader_opening_while_the_writer_grows_the_data`` shows deterministically.
    """
    path = tmp_path / "store"
    n = 30
    writer = spawn(WRITER, path, n, "wait", "grow")
    writer.expect("committed")
    seen: list[int] = []
    reader = Store.open(path, mode="r", map_size=1 << 20)
    try:
        writer.send("go")
        loads = 0
        while writer.proc.poll() is None:
            if loads % 4 == 3:  # a fresh reader starts with a map smaller than the data
                reader.close()
                reader = Store.open(path, mode="r", map_size=1 << 20)
            snap = reader.load()
            i = _check_consistent(snap)
            assert snap.version.meta["pad"] == "p" * (1 << 20)
            assert not seen or i >= seen[-1], (seen[-1], i)
            if not seen or i != seen[-1]:
                seen.append(i)
            loads += 1
        writer.finish()
        assert writer.proc.returncode == 0, writer.stderr()
        assert _check_consistent(reader.load()) == n - 1
        assert reader.verify().ok
    finally:
        reader.close()
    assert len(seen) >= 3, seen
    # the data grew far past the 1 MiB map every reader asked for
    assert (path / LMDB_DIR / "data.mdb").stat().st_size > 24 << 20
    with Store.open(path, mode="w") as store:
        assert store.verify(all=True).ok


PAUSED_READER_OPEN = """
import linecache

path = sys.argv[1]
paused = []


def local(frame, event, arg):
    # pause once, on the line that opens the named databases of a read-only store
    if event == "line" and not paused:
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        if "open_db(" in line and "create=False" in line:
            paused.append(True)
            print("paused", flush=True)
            sys.stdin.readline()
    return local


def tracer(frame, event, arg):
    if frame.f_code.co_filename.endswith(os.path.join("store", "env.py")) and (
        frame.f_code.co_name in ("_open", "<dictcomp>")  # Env._open, where it opens the dbs
    ):
        return local
    return None


sys.settrace(tracer)
try:
    store = Store.open(path, mode="r", map_size=1 << 20)
finally:
    sys.settrace(None)
print("opened", store.head.id, flush=True)
snap = store.load(verify=True)
print("loaded", snap.version.id, len(snap.version.meta["pad"]), flush=True)
"""


def test_reader_opening_while_the_writer_grows_the_data(spawn, tmp_path: Path) -> None:
    """A reader's ``Store.open`` that races a commit growing LMDB's data file past the
    reader's map (MDB_MAP_RESIZED) must not fail: readers may open during commits.

    The reader child is paused, deterministically, between opening the LMDB
    environment and opening its named databases; the writer (here) commits meanwhile.
    """
    path = tmp_path / "store"
    with Store.open(path, mode="c") as writer:
        writer.commit({"x": torch.arange(3)}, meta={"pad": ""})
        reader = spawn(PAUSED_READER_OPEN, path)
        reader.expect("paused")
        # 4 MiB of manifest: data.mdb grows past the size the reader mapped at open
        writer.commit({"x": torch.arange(4)}, meta={"pad": "p" * (4 << 20)})
        reader.send("go")
        lines = reader.finish()
    assert reader.proc.returncode == 0, reader.stderr()
    assert lines[-2:] == ["opened 2", f"loaded 2 {4 << 20}"], lines
