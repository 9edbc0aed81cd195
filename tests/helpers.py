"""Small helpers the tests of several rooms share (tests/trees.py: state equality)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
