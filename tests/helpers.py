"""Small helpers the tests of several rooms share (tests/trees.py: state equality)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread: the same float reductions in every process (children run with
    one too) and faster tiny models; restored afterwards so the test process is left as
    it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar series under ``log_dir`` as (step, value) pairs, but
    the commit durations (a measurement, not a function of the history)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag != "store/commit_seconds"
    }


def two_ranks(target: Any, arg: str, deadline_s: float) -> list[tuple[dict[str, Any], int | None]]:
    """Run ``target(rank, arg, results)`` in two spawned processes (a 2-rank group of
    their own) and collect what each puts on ``results`` as ``(rank, outcome)``: each
    rank's outcome and exit code, in rank order. Fails the test when a rank reports
    nothing by the deadline or crashed (an outcome with ``"crash"``); kills what is
    left running."""
    import queue
    import time

    import pytest

    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, arg, results), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + deadline_s
    got: dict[int, dict[str, Any]] = {}
    try:
        while len(got) < 2:
            rank, outcome = results.get(timeout=max(0.1, deadline - time.monotonic()))
            got[rank] = outcome
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
    except queue.Empty:
        pytest.fail(f"ranks {sorted({0, 1} - set(got))} reported nothing in {deadline_s:.0f} s")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
        results.close()
        results.join_thread()
    for r in range(2):
        assert "crash" not in got[r], f"rank {r} crashed:\n{got[r]['crash']}"
    return [(got[r], procs[r].exitcode) for r in range(2)]
