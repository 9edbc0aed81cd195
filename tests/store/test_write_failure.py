"""A write past ``RLIMIT_FSIZE`` (EFBIG) in the pack, the checkpoint or LMDB: the
commit raises ``CommitError`` and HEAD stays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from children import LINUX_ONLY, assert_no_leftovers, assert_same, make_state, make_weights

from engram.store import Store

pytestmark = LINUX_ONLY


WRITE_FAILURE = """
path, case = sys.argv[1], sys.argv[2]
out = {}
with Store.open(path, mode="c") as store:
    first = store.commit(make_state(0), model=linear(0), meta={"i": 0})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if case == "pack":          # 16 MiB of new blobs, limit 1 MiB: fails in the pack file
        state, model, meta = {"big": torch.ones(4 << 20)}, linear(2), {"i": 1}
        limit = 1 << 20
    elif case == "checkpoint":  # tiny state, 16 MiB of weights: fails in the checkpoint file
        state, model, meta = {"x": torch.ones(3)}, {"w": torch.ones(4 << 20)}, {"i": 1}
        limit = 1 << 20
    elif case == "lmdb":        # tiny blobs, a 2 MiB manifest: fails growing data.mdb
        state, model, meta = {"x": torch.ones(3)}, None, {"i": 1, "pad": "x" * (2 << 20)}
        limit = os.path.getsize(os.path.join(path, "memory.lmdb", "data.mdb")) + 8192
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        store.commit(state, model=model, meta=meta)
    except Exception as e:
        out["error"] = type(e).__name__
        out["is_commit_error"] = isinstance(e, CommitError)
        out["message"] = str(e)
    else:
        out["error"] = None
    out["head"] = store.head.id
    out["versions"] = [v.id for v in store.versions()]
    snap = store.load(verify=True)
    out["head_state_ok"] = bool(torch.equal(snap.state["big"], make_state(0)["big"]))
    report = store.verify(all=True)
    out["verify_ok"] = report.ok
    out["problems"] = [str(p) for p in report.problems]
print("result", json.dumps(out), flush=True)
"""


@pytest.mark.parametrize("case", ["pack", "checkpoint", "lmdb"])
def test_write_failure_keeps_head(spawn, tmp_path: Path, case: str) -> None:
    path = tmp_path / "store"
    child = spawn(WRITE_FAILURE, path, case)
    line = child.expect("result")
    assert child.finish() and child.proc.returncode == 0, child.stderr()
    out = json.loads(line.split(" ", 1)[1])
    # in the child: the failed commit raised CommitError naming the intact HEAD
    assert out["error"] is not None, "the commit past RLIMIT_FSIZE did not fail"
    assert out["is_commit_error"], (
        f"commit raised {out['error']}: {out['message']!r}, not CommitError"
    )
    assert "HEAD" in out["message"] and "v0001" in out["message"], out["message"]
    assert out["head"] == 1 and out["versions"] == [1]
    assert out["head_state_ok"]
    assert out["verify_ok"], out["problems"]
    # and again from a fresh process, which then commits and collects the leftovers
    with Store.open(path, mode="w") as store:
        assert store.head.id == 1 and [v.id for v in store.versions()] == [1]
        snap = store.load(verify=True)
        assert_same(snap.state, make_state(0))
        assert_same(snap.model, make_weights(0), "model")
        assert store.verify(all=True).ok
        after = store.commit(make_state(1), model=make_weights(1), meta={"i": 1})
        assert after.id == 2 and after.parent == 1
        store.gc()
        assert store.verify(all=True).ok
        assert_same(store.load(verify=True).state, make_state(1))
    assert_no_leftovers(path)
