"""Pushes as real processes: SIGKILL at each step of the protocol, and two writers.

A child runs ``engram push`` with one step of :mod:`engram.store.remote.push` wrapped
(as tests/store/children.py's ``crash_at`` does for commits): right after the step
returns it prints ``at <step>`` and then kills itself (SIGKILL) or waits for the
parent. The parent checks it died exactly there, then looks at the remote through a
fresh pull: the previous version, verifiable and loadable; a re-run completes the push.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from remote_helpers import assert_same_store, commit, make_store

from engram.errors import RemoteConflictError
from engram.store import Store
from engram.store.remote import pull, push

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL semantics are Linux's"),
    pytest.mark.timeout(180),
]
WAIT_S = 90.0  # bounds every wait on a child

CHILD = textwrap.dedent("""
    import importlib, os, signal, sys
    from engram.cli import main

    steps = importlib.import_module("engram.store.remote.push")  # the module, not push()

    step, then, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if step != "-":
        original = getattr(steps, step)

        def after(*a, **k):
            result = original(*a, **k)
            print("at", step, flush=True)
            if then == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            sys.stdin.readline()  # "wait": until the parent says go
            return result

        setattr(steps, step, after)
    sys.exit(main(["push", *args]))
""")


def start(step: str, then: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, step, then, *map(str, args)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(child: subprocess.Popen) -> tuple[int, str, str]:
    out, err = child.communicate(timeout=WAIT_S)
    return child.returncode, out, err


def remote_head(url: str, into: Path) -> int:
    """The remote's HEAD as a fresh clone sees it, verified."""
    report = pull(url, into)
    with Store.open(into) as store:
        assert store.verify(all=True).ok
        store.load()
    return report.head


STEPS = ["_upload_files", "_upload_segment", "_create_marker", "_move_head"]


@pytest.mark.parametrize("step", STEPS)
def test_a_push_killed_after_any_step_leaves_the_remote_whole(tmp_path, s3, remote_url, step):
    a = tmp_path / "a"
    make_store(a, 1)
    push(a, remote_url)
    with Store.open(a, mode="w") as store:
        commit(store, 1)

    code, out, _ = finish(start(step, "kill", a))
    assert code == -signal.SIGKILL and out == f"at {step}\n"  # killed where intended

    moved = step == "_move_head"  # killed after the compare-and-swap: v2 is in
    assert remote_head(remote_url, tmp_path / "before") == (2 if moved else 1)
    assert push(a).pushed == ([] if moved else [2])  # the re-run completes it
    assert remote_head(remote_url, tmp_path / "after") == 2
    assert_same_store(a, tmp_path / "after")


def test_a_412_on_the_marker_is_refused_and_overwrites_nothing(tmp_path, s3, remote_url):
    a = tmp_path / "a"
    make_store(a, 1)
    push(a, remote_url)
    with Store.open(a, mode="w") as store:
        commit(store, 1)
    code, out, _ = finish(start("_create_marker", "kill", a))
    assert code == -signal.SIGKILL and out == "at _create_marker\n"
    marker = next(k for k in s3.keys(remote_url) if k.startswith("versions/v0002-"))
    s3.overwrite(remote_url, marker, b'{"not": "engram"}')  # another writer's bytes

    with pytest.raises(RemoteConflictError, match="412") as caught:
        push(a)
    assert "\n" not in str(caught.value)
    assert s3.read(remote_url, marker) == b'{"not": "engram"}'  # not overwritten
    assert remote_head(remote_url, tmp_path / "clone") == 1


def two_diverging_clones(tmp_path: Path, url: str) -> tuple[Path, Path]:
    """Two machines at the remote's v1, each with its own v2."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_store(a, 1)
    push(a, url)
    pull(url, b)
    for path, i in ((a, 1), (b, 7)):
        with Store.open(path, mode="w") as store:
            commit(store, i)
    return a, b


def test_a_second_writer_is_refused_at_the_compare_and_swap(tmp_path, s3, remote_url):
    a, b = two_diverging_clones(tmp_path, remote_url)
    # b has read HEAD (v1) and written its objects and marker; a pushes meanwhile
    late = start("_create_marker", "wait", b)
    assert late.stdout.readline() == "at _create_marker\n"
    code, _, err = finish(start("-", "-", a))
    assert code == 0, err
    late.stdin.write("go\n")
    late.stdin.flush()
    code, _, err = finish(late)
    assert code == 2
    assert err.count("\n") == 1, err  # one line
    assert "HEAD moved to v0002" in err and "412" in err and "engram pull" in err, err
    assert remote_head(remote_url, tmp_path / "clone") == 2
    assert_same_store(a, tmp_path / "clone")  # a's v2: nothing of b's overwrote it


def test_two_writers_racing_one_wins_one_is_refused(tmp_path, s3, remote_url):
    a, b = two_diverging_clones(tmp_path, remote_url)
    racers = [start("-", "-", a), start("-", "-", b)]
    results = [finish(child) for child in racers]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    winner = [a, b][[code for code, _, _ in results].index(0)]
    loser_err = next(err for code, _, err in results if code == 2)
    assert loser_err.count("\n") == 1 and "HEAD" in loser_err and "v0002" in loser_err
    assert remote_head(remote_url, tmp_path / "clone") == 2
    assert_same_store(winner, tmp_path / "clone")
