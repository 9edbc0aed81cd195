"""The background push worker yields the CPU to training (moto's S3 server, conftest.py):
it runs ``WORKER_NICENESS`` below the run, so on a machine with few cores a push in
flight does not slow the next commit (measured in benchmarks/remote.py)."""

from __future__ import annotations

import os
import time

import pytest
from remote_helpers import make_store

from engram.store import Store
from engram.store.remote import BackgroundPusher, unpushed
from engram.store.remote.background import WORKER_NICENESS

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not hasattr(os, "getpriority"), reason="POSIX priorities")]  # fmt: skip


def test_the_push_worker_runs_below_the_run_priority(tmp_path, remote_url):
    make_store(tmp_path / "s", 2)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    if mine >= 19:
        pytest.skip("this process already runs at the lowest priority")
    with Store.open(tmp_path / "s", mode="w") as store:
        pusher = BackgroundPusher(store, remote_url)
        pusher.request()
        deadline = time.monotonic() + 60
        while unpushed(store) != [] and time.monotonic() < deadline:  # bounded
            time.sleep(0.02)
        worker = pusher._worker
        assert worker is not None and worker.poll() is None  # idle, waiting for the next
        theirs = os.getpriority(os.PRIO_PROCESS, worker.pid)
        assert theirs > mine and theirs == min(mine + WORKER_NICENESS, 19)
        assert pusher.finish() == []
