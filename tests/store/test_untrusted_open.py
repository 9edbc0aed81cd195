"""Damaged stores at open: a truncated data.mdb is refused before LMDB maps it,
``engram verify --untrusted`` survives LMDB crashing, and one damaged old version does
not hide the others (``ls``, ``du``, ``versions()``, resuming a run)."""

from __future__ import annotations

import json
import random
import re
import shlex
import shutil
import struct
from pathlib import Path

import lmdb
import pytest
import torch

from engram.cli import main
from engram.errors import CorruptionError
from engram.store import Store
from engram.store.meta import check_not_truncated
from engram.store.untrusted import verify_in_child

SAMPLE_BYTES = 3000  # more than half a page: LMDB keeps each on overflow pages


def data_file(store: Path) -> Path:
    return store / "memory.lmdb" / "data.mdb"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four versions with replay samples; the same layout every run (seeded)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("made") / "store"
    with Store.open(path, mode="c") as store:
        for i in range(4):
            store.samples.append([bytes([i]) * SAMPLE_BYTES for _ in range(12)])
            store.commit({"w": torch.randn(500), "i": i}, model={"weight": torch.randn(32, 32)},
                         message="x" * 3000, meta={"experience": i})  # fmt: skip
        store.tag("keep", 3)
    return path


@pytest.fixture
def store(made: Path, tmp_path: Path) -> Path:
    shutil.copytree(made, tmp_path / "s")
    return tmp_path / "s"


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def lmdb_needs(store: Path) -> int:
    """What LMDB itself says its last transaction uses (the oracle for the meta parser)."""
    env = lmdb.open(str(store / "memory.lmdb"), readonly=True, max_dbs=8)
    try:
        return (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    finally:
        env.close()


# ------------------------------------------------------------------ truncation


def test_a_complete_or_new_data_file_passes(store: Path, tmp_path: Path) -> None:
    check_not_truncated(store / "memory.lmdb")
    (tmp_path / "new" / "memory.lmdb").mkdir(parents=True)  # a creation cut short
    check_not_truncated(tmp_path / "new" / "memory.lmdb")
    (tmp_path / "new" / "memory.lmdb" / "data.mdb").touch()
    check_not_truncated(tmp_path / "new" / "memory.lmdb")


@pytest.mark.parametrize("keep", ["all but a page", "60%", "5000 bytes", "100 bytes", "0 bytes"])
def test_a_truncated_data_file_is_refused(store: Path, keep: str) -> None:
    needs, f = lmdb_needs(store), data_file(store)
    size = {"all but a page": needs - 4096, "60%": int(needs * 0.6), "5000 bytes": 5000,
            "100 bytes": 100, "0 bytes": 0}[keep]  # fmt: skip
    with open(f, "r+b") as handle:
        handle.truncate(size)
    with pytest.raises(CorruptionError, match=f"store {re.escape(str(store))} is truncated") as e:
        check_not_truncated(store / "memory.lmdb")
    message = str(e.value)
    assert "restore it from a complete copy" in message
    if size >= 5000:
        assert (
            f"data.mdb has {size} bytes, LMDB's last committed transaction needs {needs}" in message
        )
    elif size:
        assert f"data.mdb has {size} bytes, less than LMDB's two meta pages" in message
    else:  # LMDB would start it afresh and orphan every pack and checkpoint
        assert "data.mdb is empty or missing but the store has data files" in message


def test_the_newest_valid_meta_page_decides(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.open(path, mode="c") as s:
        s.commit({"n": 0})
        s.commit({"n": 1}, message="x" * 50_000)  # one transaction that grows the file
    f = data_file(path)
    raw = bytearray(f.read_bytes())
    # mm_last_pg and mm_txnid of each meta page (mdb.c's MDB_meta, 64-bit)
    metas = [struct.unpack_from("<QQ", raw, page * 4096 + 136) for page in (0, 1)]
    last_pg, txnid = [m[0] for m in metas], [m[1] for m in metas]
    newest = txnid.index(max(txnid))
    assert (last_pg[newest] + 1) * 4096 == lmdb_needs(path)
    older_needs = (last_pg[1 - newest] + 1) * 4096
    assert older_needs < lmdb_needs(path)
    del raw[older_needs:]
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptionError, match="needs"):
        check_not_truncated(path / "memory.lmdb")
    newest *= 4096
    raw[newest + 16 : newest + 20] = b"\0\0\0\0"  # its magic: not a meta page any more
    f.write_bytes(bytes(raw))
    check_not_truncated(path / "memory.lmdb")  # the older transaction is all there
    other = 4096 - newest
    raw[other + 16 : other + 20] = b"\0\0\0\0"
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptionError, match="no valid LMDB meta page"):
        check_not_truncated(path / "memory.lmdb")


# ------------------------------------------------------------- verify --untrusted


def test_untrusted_verify_of_a_good_store(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = cli(capsys, "verify", "--untrusted", store, "--all")
    assert code == 0, out
    assert out.startswith("all versions: ok")


def test_untrusted_verify_of_a_truncated_store(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with open(data_file(store), "r+b") as handle:
        handle.truncate(data_file(store).stat().st_size * 6 // 10)
    code, out = cli(capsys, "verify", "--untrusted", store)
    assert code == 1
    assert out.count("\n") == 1 and re.fullmatch(
        rf"store {re.escape(str(store))} is truncated: data\.mdb has \d+ bytes, LMDB's last "
        r"committed transaction needs \d+; restore it from a complete copy\n",
        out,
    ), out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_untrusted_verify_of_flipped_bytes(
    store: Path, seed: int, capsys: pytest.CaptureFixture[str]
) -> None:
    f = data_file(store)
    raw, rng = bytearray(f.read_bytes()), random.Random(seed)
    for _ in range(8):  # in the middle pages: the two meta pages stay intact
        raw[rng.randrange(2 * 4096, len(raw))] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(raw))
    code, out = cli(capsys, "verify", "--untrusted", store, "--all")
    assert code == 1, out
    assert "Traceback" not in out and "internal error" not in out
    assert "problem(s)" in out or out.count("\n") == 1


def oversize_record(data: Path, db_key: bytes, size: int) -> int:
    """Give every leaf node of key ``db_key`` with an overflow value a huge length, as
    one flipped byte in a node header would: LMDB hands Python a view that runs past
    the end of the file. Returns how many nodes were changed."""
    raw, page_size, changed = bytearray(data.read_bytes()), 4096, 0
    for start in range(2 * page_size, len(raw), page_size):
        pgno, _, flags, lower, upper = struct.unpack_from("<QHHHH", raw, start)
        if pgno != start // page_size or flags & ~0x10 != 0x02 or not 16 <= lower <= upper:
            continue  # not a leaf page (an overflow page's continuation has no header)
        for i in range((lower - 16) // 2):
            (offset,) = struct.unpack_from("<H", raw, start + 16 + 2 * i)
            node = start + offset
            _, _, node_flags, key_size = struct.unpack_from("<HHHH", raw, node)
            if node_flags & 0x01 and raw[node + 8 : node + 8 + key_size] == db_key:  # F_BIGDATA
                struct.pack_into("<HH", raw, node, size & 0xFFFF, size >> 16)
                changed += 1
    data.write_bytes(bytes(raw))
    return changed


def test_untrusted_verify_reports_a_crash_of_the_reader(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert oversize_record(data_file(store), (1).to_bytes(8, "big"), 0x7FFFFFF0) >= 1
    code, out = cli(capsys, "verify", "--untrusted", store, "--all")  # we are alive: no mmap here
    assert code == 1
    assert re.fullmatch(
        rf"store {re.escape(str(store))} is corrupt: the reader crashed \(signal (7|11), "
        r"SIG(BUS|SEGV)\) while verifying it\n",
        out,
    ), out


def test_untrusted_verify_is_bounded_by_its_timeout(store: Path) -> None:
    report = verify_in_child(store, timeout=0.005)  # the child cannot even start Python
    assert not report.ok
    assert report.fatal.startswith(f"store {store} could not be verified: the reader did not "
                                   "finish within 0.005 s")  # fmt: skip


def test_untrusted_verify_of_an_unknown_version_is_a_usage_error(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = cli(capsys, "verify", "--untrusted", store, "v0042")
    assert code == 2
    assert out == f"engram: error: version v0042 is not in store {store}\n"


# ------------------------------------------------------------- damaged versions


def damage_manifests(store: Path, *ids: int) -> None:
    """Spoil version manifests as stored: the JSON no longer parses, and a sealed
    record fails its checksum; either way the version is damaged."""
    env = lmdb.open(str(store / "memory.lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        db = env.open_db(b"versions", txn=txn)
        for vid in ids:
            key = vid.to_bytes(8, "big")
            txn.put(key, b"#" + bytes(txn.get(key, db=db))[1:], db=db)
    env.close()


def test_versions_skip_a_damaged_manifest(store: Path) -> None:
    damage_manifests(store, 1)
    with Store.open(store) as s:
        assert [v.id for v in s.versions()] == [2, 3, 4]
        [(vid, reason)] = s.damaged()
        assert vid == 1 and "v0001" in reason
        assert s.head.id == 4 and s.verify().ok  # HEAD's ancestry names v0001: it is there
        usage = s.inspect.usage()
        assert usage.versions == 3 and [vid for vid, _ in usage.damaged] == [1]


def test_ls_and_du_list_a_damaged_version_and_the_repair_they_name_works(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage_manifests(store, 1)
    code, out = cli(capsys, "ls", store)
    assert code == 0, out
    assert re.search(r"^\*\s+v0004", out, re.M) and "v0002" in out and "v0003" in out
    [line] = [line for line in out.splitlines() if line.startswith("v0001")]
    assert line.startswith("v0001: damaged manifest, left out (")
    repair = re.search(r"`(engram gc [^`]+)`", line).group(1)
    assert repair == f"engram gc {store} --keep-last 3"
    code, out = cli(capsys, "du", store)
    assert code == 0 and "3 versions" in out and repair in out, out
    code, out = cli(capsys, *shlex.split(repair)[1:])
    assert code == 0 and "dropped versions: v0001" in out, out
    code, out = cli(capsys, "ls", store)
    assert code == 0 and "damaged" not in out and "v0001" not in out.split("\n", 2)[1]
    assert cli(capsys, "verify", store, "--all")[0] == 0


def test_a_damaged_head_or_tagged_version_says_what_to_move_first(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage_manifests(store, 3, 4)
    code, out = cli(capsys, "ls", store, "--json")
    assert code == 0
    listing = json.loads(out)
    assert listing["head"] == 4 and [v["id"] for v in listing["versions"]] == [1, 2]
    repairs = {d["name"]: d["repair"] for d in listing["damaged"]}
    assert f"`engram tag {store} keep --delete`" in repairs["v0003"]
    assert f"`engram rollback {store} v0002`" in repairs["v0004"]


def test_a_run_resumes_with_a_damaged_old_version(tmp_path: Path) -> None:
    from torch import nn

    from engram.strategies import EWCPlugin
    from engram.streams.digits import split_digits
    from engram.training.template import DurableTemplate

    bench = split_digits(5)
    train, test = bench.train_stream[:2], bench.test_stream[:2]

    def template() -> DurableTemplate:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        return DurableTemplate(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            store=tmp_path / "s", plugins=[EWCPlugin(ewc_lambda=1.0)], name="ewc",
            commit_every_iterations=3, keep_mid_experience=True,
        )  # fmt: skip

    with template() as t:
        t.fit(train, test, max_experiences=1)
    damage_manifests(tmp_path / "s", 1)  # a mid-experience version, not HEAD
    with template() as t:
        matrix = t.fit(train, test)  # restores HEAD, lists versions at the experience's end
    assert len(matrix) == 2
    with Store.open(tmp_path / "s") as s:
        assert [vid for vid, _ in s.damaged()] == [1]
        assert s.head.meta["experience"] == 1 and s.verify().ok


def test_pruning_with_a_damaged_old_version_warns_and_training_goes_on(tmp_path: Path) -> None:
    """Pruning mid-experience versions is housekeeping: while a kept old version is
    damaged gc deletes nothing, so the run says so once and keeps training."""
    from torch import nn

    from engram.strategies import EWCPlugin
    from engram.streams.digits import split_digits
    from engram.training.template import DurableTemplate

    bench = split_digits(5)
    train, test = bench.train_stream[:3], bench.test_stream[:3]

    def template(keep: bool) -> DurableTemplate:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
        return DurableTemplate(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            store=tmp_path / "s", plugins=[EWCPlugin(ewc_lambda=1.0)], name="ewc",
            commit_every_iterations=3, keep_mid_experience=keep,
        )  # fmt: skip

    with template(keep=True) as t:
        t.fit(train, test, max_experiences=1)
    damage_manifests(tmp_path / "s", 1)  # a kept mid-experience version of experience 0
    with (
        pytest.warns(UserWarning, match=r"were not pruned: .*v0001") as caught,
        template(keep=False) as t,
    ):
        matrix = t.fit(train, test)
    assert len(matrix) == 3
    assert len([w for w in caught if "not pruned" in str(w.message)]) == 2  # one per experience
    with Store.open(tmp_path / "s") as s:
        assert [vid for vid, _ in s.damaged()] == [1]
        assert s.head.meta["experience"] == 2 and s.verify().ok
        mid = [v.id for v in s.versions() if v.meta.get("kind") == "mid-experience"]
        assert any(s.info(v).meta["experience"] == 2 for v in mid)  # kept, not lost
