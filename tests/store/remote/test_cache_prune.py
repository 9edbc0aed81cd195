"""``engram cache ls`` and ``engram cache prune`` (moto's S3 server, conftest.py): the copies
of remotes listed with their sizes; fetched files or whole copies removed, never while
another process holds the copy open; what was pruned is fetched again when read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from remote_helpers import make_store

from engram.cli import main as engram_cli
from engram.store import Store
from engram.store import format as fmt
from engram.store.remote import push
from engram.store.remote.cache import cache_path

pytestmark = pytest.mark.timeout(120)

DEADLINE_S = 60.0
# A child holding a copy open (ENGRAM_CACHE from the environment) until RELEASE exists.
HOLDER = """
import os, sys, time
from pathlib import Path
from engram.store.remote.cache import RemoteStore

with RemoteStore.open_url(sys.argv[1]) as store:
    Path(os.environ["HOLDING"]).touch()
    deadline = time.monotonic() + 60
    while not Path(os.environ["RELEASE"]).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
"""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = engram_cli(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def fetched(copy: Path) -> set[str]:
    return {p.name for d in (fmt.BLOB_DIR, fmt.CHECKPOINT_DIR) for p in (copy / d).iterdir()}


def test_cache_ls_and_prune_keep_last_and_all(tmp_path, s3, remote_url, cache, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    make_store(a, 3)
    make_store(b, 1)
    push(a, remote_url)
    push(b, f"{remote_url}-b")
    copy = cache_path(remote_url)
    assert run(capsys, "cache", "ls") == (0, f"no copies of remotes in {cache}\n", "")
    for version in ("v0001", "v0002", "v0003"):  # every version's files fetched
        code, _, err = run(capsys, "verify", remote_url, version)
        assert code == 0, err
    assert run(capsys, "ls", f"{remote_url}-b")[0] == 0
    with Store.open(a) as store:
        head_files = {store.manifest(3)["checkpoint"]["file"]}
        all_files = fetched(a)
    assert fetched(copy) == all_files

    code, out, _ = run(capsys, "cache", "ls", "--json")
    listed = {c["url"]: c for c in json.loads(out)["copies"]}
    assert code == 0 and listed.keys() == {remote_url, f"{remote_url}-b"}
    mine = listed[remote_url]
    assert (mine["versions"], mine["head"], mine["files"], mine["in_use"]) == (3, 3, len(all_files),
                                                                               False)  # fmt: skip
    assert mine["path"] == str(copy) and mine["bytes"] > sum(
        (p.stat().st_size for p in a.joinpath(fmt.BLOB_DIR).iterdir()), 0
    )
    assert listed[f"{remote_url}-b"]["files"] == 0  # `ls` fetched no file
    code, out, _ = run(capsys, "cache", "ls")
    assert remote_url in out and "2 copies, " in out

    # --keep-last 0: only what HEAD needs (its checkpoint, its state's packs) stays
    code, out, err = run(capsys, "cache", "prune", remote_url, "--keep-last", "0", "--json")
    assert code == 0, err
    (report,) = json.loads(out)["pruned"]
    kept = fetched(copy)
    assert head_files <= kept < all_files and set(report["files"]) == all_files - kept
    assert report["freed_bytes"] > 0
    code, out, err = run(capsys, "verify", remote_url, "v0001")  # fetched again to be read
    assert code == 0 and "v0001: ok" in out, err
    assert len(fetched(copy)) > len(kept)

    # --all, every copy: both gone, locks too; the next read clones again
    code, out, err = run(capsys, "cache", "prune", "--all")
    assert code == 0 and out.count("removed the copy of") == 2, out + err
    assert not cache.exists() or list(cache.iterdir()) == []
    code, out, _ = run(capsys, "ls", remote_url, "--json")
    assert code == 0 and json.loads(out)["head"] == 3 and copy.is_dir()


def test_a_copy_open_in_another_process_is_never_pruned(tmp_path, s3, remote_url, cache, capsys):
    make_store(tmp_path / "a", 1)
    push(tmp_path / "a", remote_url)
    make_store(tmp_path / "b", 1)
    push(tmp_path / "b", f"{remote_url}-b")
    assert run(capsys, "ls", f"{remote_url}-b")[0] == 0
    holding, release = tmp_path / "holding", tmp_path / "release"
    env = {**os.environ, "HOLDING": str(holding), "RELEASE": str(release)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, remote_url], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not holding.exists():
            assert holder.poll() is None and time.monotonic() < deadline, holder.communicate()
            time.sleep(0.02)
        code, _, err = run(capsys, "cache", "prune", remote_url, "--all")
        assert code == 2 and err.count("\n") == 1 and "is open in a process" in err, err
        code, out, _ = run(capsys, "cache", "ls", "--json")
        in_use = {c["url"]: c["in_use"] for c in json.loads(out)["copies"]}
        assert in_use == {remote_url: True, f"{remote_url}-b": False}
        code, out, _ = run(capsys, "cache", "prune", "--all")  # every copy: skipped, said so
        assert code == 0 and "skipped" in out and "removed the copy of" in out, out
        assert cache_path(remote_url).is_dir() and not cache_path(f"{remote_url}-b").exists()
    finally:
        release.touch()
        _, err = holder.communicate(timeout=DEADLINE_S)
    assert holder.returncode == 0, err
    assert run(capsys, "cache", "prune", remote_url, "--all")[0] == 0  # released: pruned
    assert not cache_path(remote_url).exists()


def test_cache_mistakes_are_one_line_and_ls_loads_no_heavy_library(
    tmp_path, s3, remote_url, cache, capsys
):
    def one_line(argv: list[str], expected: str) -> str:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert expected in err, err
        return err

    one_line(["cache"], "required")
    one_line(["cache", "prune"], "one of the arguments --keep-last --all is required")
    one_line(["cache", "prune", "--all", "--keep-last", "1"], "not allowed with argument")
    one_line(["cache", "prune", "--keep-last", "-1"], "--keep-last must be 0 or more")
    one_line(["cache", "prune", remote_url, "--all"], f"no local copy of {remote_url}")
    one_line(["cache", "prune", f"{remote_url}@prod", "--all"], "without @prod")
    err = one_line(["cache", "prune", "s3://AKIAEXAMPLE:hunter2@bucket/p", "--all"],
                   "carries no user info")  # fmt: skip
    assert "hunter2" not in err and "AKIA" not in err
    make_store(tmp_path / "a", 1)
    push(tmp_path / "a", remote_url)
    assert run(capsys, "ls", remote_url)[0] == 0
    probe = ("import sys; from engram.cli import main; code = main(['cache', 'ls']); "
             "print(sorted(m for m in ('torch', 'obstore', 'avalanche') if m in sys.modules))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=DEADLINE_S, env={**os.environ, "ENGRAM_CACHE": str(cache)})  # fmt: skip
    assert proc.returncode == 0 and remote_url in proc.stdout, proc.stderr
    assert proc.stdout.strip().endswith("[]"), proc.stdout
