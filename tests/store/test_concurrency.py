"""Concurrency under load: reader processes load HEAD while one writer process commits,
collects (``gc``) and compacts.

Every version ``v`` of the store carries a counter ``i = v - 1`` three times over: in its
meta, in its state (a scalar and tensors derived from it) and in its model weights. A
reader that loads a version recomputes everything from the counter and compares bit for
bit, so a torn read (the state of one version with the weights of another, a tensor
half written, a delta chain decoded against the wrong base) is counted, never missed.

What is asserted (docs/store.md, "One writer, many readers": readers see only complete
versions; docs/reliability.md, "Concurrency under load"):

* a HEAD load (``Store.load()``, ``engram.load_model(path, "HEAD")``) never fails and
  never goes back in time, also while ``gc`` rewrites packs and ``compact`` delta-codes;
* a load of an older version by id returns that version intact, or raises
  ``VersionNotFoundError`` when ``gc(keep_last=N)`` dropped it after the reader chose it
  (counted as ``vanished``; the only error allowed, and only for non-HEAD loads).

Readers are started with the ``spawn`` context (an LMDB environment must never cross a
``fork``). Everything is bounded: fixed rounds, a deadline on every wait, readers stop
when the writer's ``done`` file appears. The default run (3 readers, 20 rounds) takes
~15 s on 2 cores; ``-m slow`` runs 200 rounds.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch

MODEL_SPEC = {"name": "mlp", "args": {"input_shape": [256], "n_classes": 10, "hidden": [256]}}
STEP = 1.0 / 1024  # what a version adds to every drifting value (a power of two: i * STEP is exact)
DRIFT_SIZE = 1 << 18  # float32: 1 MiB of state per version, so a load takes a while
WAIT_S = 120.0  # a child waits at most this long for anything; the parent too


READER_COUNTS = ("reads", "head_reads", "model_reads", "old_reads", "vanished", "torn", "errors",
                 "regressions")  # fmt: skip


class TornRead(AssertionError):
    """A load returned something that no committed version holds."""


# --------------------------------------------------- deterministic versions


@functools.cache
def _bases() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(2026)
    from engram.models import build_model

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(MODEL_SPEC).state_dict().items()}
    weights = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
    return weights, torch.randn(DRIFT_SIZE, generator=g)


def make_weights(i: int) -> dict[str, torch.Tensor]:
    """Weights of version ``i + 1``: every float drifts a little (so compaction
    delta-codes them), and the classifier's bias *is* the counter (load_model has no meta)."""
    base, _ = _bases()
    weights = {k: v + i * STEP for k, v in base.items()}
    weights["classifier.bias"] = torch.full((10,), float(i))
    return weights


def make_state(i: int) -> dict[str, Any]:
    _, drift = _bases()
    return {
        "counter": i,
        "filled": torch.full((256,), float(i)),
        "drift": drift + i * STEP,  # (DRIFT_SIZE,)
        "clock": {"experience": i, "name": f"step-{i}"},
    }


def commit_version(store, i: int):
    return store.commit(
        make_state(i), model=make_weights(i), meta={"counter": i, "model_spec": MODEL_SPEC}
    )


def check_weights(weights: dict[str, torch.Tensor], i: int, what: str) -> None:
    expected = make_weights(i)
    if set(weights) != set(expected):
        raise TornRead(f"{what}: weight names {sorted(weights)}")
    for k, value in expected.items():
        if not torch.equal(weights[k], value):
            raise TornRead(f"{what}: weights {k!r} are not those of counter {i}")


def check_snapshot(snap, what: str) -> int:
    """The counter of a loaded version; raises TornRead if any part disagrees."""
    i = snap.version.meta["counter"]
    if snap.version.id != i + 1:
        raise TornRead(f"{what}: {snap.version.name} has the meta of counter {i}")
    state, expected = snap.state, make_state(i)
    if (
        state.keys() != expected.keys()
        or state["counter"] != i
        or state["clock"] != expected["clock"]
    ):
        raise TornRead(f"{what}: state {state.get('counter')!r} in version of counter {i}")
    for k in ("filled", "drift"):
        if not torch.equal(state[k], expected[k]):
            raise TornRead(f"{what}: state tensor {k!r} is not that of counter {i}")
    check_weights(snap.model, i, what)
    return i


def check_model(model: torch.nn.Module, what: str) -> int:
    weights = model.state_dict()
    i = int(weights["classifier.bias"][0])
    check_weights(weights, i, what)
    return i


# ------------------------------------------------------------------ children


def writer_main(path: str, run: str, cfg: dict) -> None:
    """Commit ``rounds`` versions, gc every ``gc_every``, compact every ``compact_every``."""
    from engram.store import Store

    torch.set_num_threads(1)
    out = Path(run)
    counts = {"commits": 0, "gcs": 0, "compacts": 0, "dropped": 0, "compacted": 0}
    try:
        deadline = time.monotonic() + WAIT_S
        while len(list(out.glob("ready-*"))) < cfg["readers"]:  # readers are loading
            if time.monotonic() > deadline:
                raise TimeoutError("the readers did not get ready")
            time.sleep(0.02)
        with Store.open(path, mode="w", lock_timeout=10) as store:
            for r in range(1, cfg["rounds"] + 1):
                commit_version(store, r)
                counts["commits"] += 1
                if r % cfg["gc_every"] == 0:
                    before = len(store.versions())
                    store.gc(keep_last=cfg["keep_last"])
                    counts["dropped"] += before - len(store.versions())
                    counts["gcs"] += 1
                if r % cfg["compact_every"] == 0:
                    store.compact()
                    counts["compacts"] += 1
            counts["compacted"] = sum(v.compacted for v in store.versions())
            report = store.verify(all=True)
            counts["verify_problems"] = [str(p) for p in report.problems]
            counts["head"] = store.head.id
    finally:
        (out / "writer.json").write_text(json.dumps(counts))
        (out / "done").touch()  # also after a failure: the readers stop


def reader_main(path: str, run: str, index: int, handle: bool) -> None:
    """Load HEAD (store and load_model) and a random older version until ``done``.

    ``handle``: one Store kept open for the whole run; else a fresh open per load (LMDB
    allows one handle per process, so a reader is one kind or the other).
    """
    import engram
    from engram.errors import VersionNotFoundError
    from engram.store import Store

    torch.set_num_threads(1)
    out = Path(run)
    rng = random.Random(index)
    counts: dict[str, Any] = {
        "reads": 0, "head_reads": 0, "model_reads": 0, "old_reads": 0, "vanished": 0,
        "torn": 0, "errors": 0, "regressions": 0, "heads_seen": [], "problems": [],
        "final": None,
    }  # fmt: skip
    store = Store.open(path) if handle else None
    last = -1  # HEAD's counter, as last seen: HEAD never goes back (no rollback here)

    def opened():
        return store if handle else Store.open(path)

    def closing(s):
        if not handle:
            s.close()

    def head_load(verify: bool) -> int:
        s = opened()
        try:
            return check_snapshot(s.load(verify=verify), "HEAD")
        finally:
            closing(s)

    def model_load() -> int:
        return check_model(engram.load_model(store if handle else path, "HEAD"), "load_model")

    def old_load() -> None:
        s = opened()
        try:
            ids = [v.id for v in s.versions()]
            vid = rng.choice(ids)
            try:
                snap = s.load(vid)
            except VersionNotFoundError:
                counts["vanished"] += 1  # gc dropped it after versions(): allowed
                return
            if check_snapshot(snap, f"v{vid}") != vid - 1:
                raise TornRead(f"asked for v{vid}, got {snap.version.name}")
        finally:
            closing(s)

    def attempt(kind: str, fn, *args) -> None:
        nonlocal last
        try:
            i = fn(*args)
        except TornRead as e:
            counts["torn"] += 1
            counts["problems"].append(f"torn: {e}")
            return
        except Exception as e:  # any error escaping a load is a failure: counted
            counts["errors"] += 1
            counts["problems"].append(f"{kind}: {type(e).__name__}: {e}")
            return
        counts["reads"] += 1
        counts[f"{kind}_reads"] += 1
        if i is None:
            return
        if i < last:
            counts["regressions"] += 1
            counts["problems"].append(f"{kind}: HEAD went back from {last} to {i}")
        last = max(last, i)
        if i not in counts["heads_seen"]:
            counts["heads_seen"].append(i)

    try:
        attempt("head", head_load, True)
        (out / f"ready-{index}").touch()
        deadline = time.monotonic() + WAIT_S
        n = 0
        while not (out / "done").exists():
            if time.monotonic() > deadline:
                counts["errors"] += 1
                counts["problems"].append("the writer did not finish before the deadline")
                break
            attempt("head", head_load, n % 5 == 0)  # SHA-256 too, now and then
            attempt("model", model_load)
            attempt("old", old_load)
            n += 1
        counts["final"] = head_load(True)  # the finished writer's last version
    finally:
        if store is not None:
            store.close()
        counts["problems"] = counts["problems"][:10]
        (out / f"reader-{index}.json").write_text(json.dumps(counts))


# ------------------------------------------------------------------ the parent


def run_load(tmp_path: Path, **cfg: int) -> dict[str, Any]:
    """Run one load test; returns the writer's and every reader's counts."""
    from engram.store import Store

    path, run = tmp_path / "store", tmp_path / "run"
    run.mkdir()
    with Store.open(path, mode="c") as store:  # HEAD exists before any reader starts
        commit_version(store, 0)
    ctx = multiprocessing.get_context("spawn")
    readers = [
        ctx.Process(target=reader_main, args=(str(path), str(run), k, k % 2 == 0))
        for k in range(cfg["readers"])
    ]
    writer = ctx.Process(target=writer_main, args=(str(path), str(run), cfg))
    procs = [*readers, writer]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 2 * WAIT_S
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        stuck = [p.pid for p in procs if p.is_alive()]
        assert not stuck, f"children {stuck} did not finish in {2 * WAIT_S:.0f} s"
        assert [p.exitcode for p in procs] == [0] * len(procs), [p.exitcode for p in procs]
    finally:
        for p in procs:  # only ours, by their own handles
            if p.is_alive():
                p.kill()
                p.join(timeout=WAIT_S)
    result = {"writer": json.loads((run / "writer.json").read_text())}
    result["readers"] = [
        json.loads((run / f"reader-{k}.json").read_text()) for k in range(cfg["readers"])
    ]
    return result


def assert_clean(result: dict[str, Any], cfg: dict[str, int]) -> dict[str, int]:
    """Every count the run must meet; returns the totals (printed with ``-s``)."""
    w, readers = result["writer"], result["readers"]
    assert w["commits"] == cfg["rounds"]
    assert w["gcs"] == cfg["rounds"] // cfg["gc_every"]
    assert w["compacts"] == cfg["rounds"] // cfg["compact_every"]
    assert w["dropped"] > 0 and w["compacted"] > 0, w  # gc and compact really did work
    assert w["verify_problems"] == [] and w["head"] == cfg["rounds"] + 1, w
    totals = {k: sum(r[k] for r in readers) for k in READER_COUNTS}
    problems = [p for r in readers for p in r["problems"]]
    assert totals["torn"] == 0, problems
    assert totals["errors"] == 0, problems
    assert totals["regressions"] == 0, problems
    for r in readers:
        assert r["final"] == cfg["rounds"], r  # each saw the writer's last version
        # and really read while the writer worked: several HEADs, every kind of load
        assert len(r["heads_seen"]) >= 3, r["heads_seen"]
        assert min(r["head_reads"], r["model_reads"], r["old_reads"]) >= 3, r
    totals |= {k: w[k] for k in ("commits", "gcs", "compacts", "dropped", "compacted")}
    print("concurrency:", cfg, totals)
    return totals


DEFAULT = {"readers": 3, "rounds": 20, "gc_every": 3, "compact_every": 5, "keep_last": 2}


def test_readers_see_only_whole_versions_while_writer_commits_gcs_compacts(
    tmp_path: Path,
) -> None:
    assert_clean(run_load(tmp_path, **DEFAULT), DEFAULT)


@pytest.mark.slow
def test_readers_under_a_long_load(tmp_path: Path) -> None:
    cfg = DEFAULT | {"rounds": 200}
    assert_clean(run_load(tmp_path, **cfg), cfg)


def test_the_check_catches_a_torn_version(tmp_path: Path) -> None:
    """The detector itself: versions a torn read would produce are all refused."""
    from engram.store import Store

    with Store.open(tmp_path / "store", mode="c") as store:
        commit_version(store, 0)
        good = store.load()
        meta = {"counter": 1, "model_spec": MODEL_SPEC}
        store.commit(make_state(1), model=make_weights(0), meta=meta)  # weights of another
        half = make_state(2)
        half["drift"][DRIFT_SIZE // 2 :] = make_state(1)["drift"][DRIFT_SIZE // 2 :]
        store.commit(half, model=make_weights(2), meta=meta | {"counter": 2})  # half written
        store.commit(make_state(2), model=make_weights(3), meta=meta | {"counter": 3})
        assert check_snapshot(good, "v1") == 0
        for vid in (2, 3, 4):
            with pytest.raises(TornRead):
                check_snapshot(store.load(vid), f"v{vid}")
    mixed = {**make_weights(5), "body.1.bias": make_weights(4)["body.1.bias"]}
    with pytest.raises(TornRead, match="body.1.bias"):
        check_weights(mixed, 5, "mixed")
