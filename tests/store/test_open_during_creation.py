"""A reader opening a store while another process creates it: "not yet", never a crash
or a wrong diagnosis (found by the scikit-learn agent example, which polls for prod)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import lmdb
import pytest

from engram.errors import NotAStoreError, StoreNotFoundError
from engram.store import Store


def test_an_lmdb_directory_without_its_first_transaction_is_not_yet_a_store(tmp_path) -> None:
    (tmp_path / "s").mkdir()  # the writer made the store's directory
    with pytest.raises(StoreNotFoundError, match="being created"):
        Store.open(tmp_path / "s")
    (tmp_path / "s" / "memory.lmdb").mkdir()  # and the LMDB one
    with pytest.raises(StoreNotFoundError, match="being created"):
        Store.open(tmp_path / "s")
    lmdb.open(str(tmp_path / "s" / "memory.lmdb"), max_dbs=8).close()  # and the environment
    with pytest.raises(StoreNotFoundError, match="being created"):
        Store.open(tmp_path / "s")
    with Store.open(tmp_path / "s", mode="c") as store:  # a creation cut short completes
        store.commit({"a": 1})
    assert Store.open(tmp_path / "s").head.id == 1


def test_a_foreign_lmdb_environment_is_still_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "s" / "memory.lmdb").mkdir(parents=True)
    env = lmdb.open(str(tmp_path / "s" / "memory.lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"someone", b"else's")
    env.close()
    with pytest.raises(NotAStoreError):
        Store.open(tmp_path / "s")


def test_polling_a_store_while_another_process_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "s"
    creator = subprocess.Popen([sys.executable, "-c", f"""
import time
from engram.store import Store
for i in range(40):
    with Store.open({str(path / "x")!r} + str(i), mode="c") as store:
        store.commit({{"i": i}})
print("done", flush=True)
"""], stdout=subprocess.PIPE, text=True)  # fmt: skip
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 120
    opened = 0
    try:
        while creator.poll() is None and time.monotonic() < deadline:
            for i in range(40):
                try:
                    with Store.open(f"{path / 'x'}{i}"):
                        opened += 1
                except StoreNotFoundError:
                    seen["not yet"] = seen.get("not yet", 0) + 1
                except Exception as e:  # anything else is the bug this test is about
                    seen[repr(e)] = seen.get(repr(e), 0) + 1
    finally:
        out, _ = creator.communicate(timeout=60)
    assert creator.returncode == 0 and "done" in out
    assert set(seen) <= {"not yet"}, seen
    assert opened > 0
