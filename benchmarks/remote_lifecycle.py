"""What the remote gc's fence costs a push, and what a remote gc costs, side by side.

Against moto's S3 server on 127.0.0.1 (started here, dummy credentials), in one run:

* a push of one small version (a 64 KiB change and 16 replay samples over a 1 MiB kept
  state), with the fence's two reads (``gc.json`` at the start and before HEAD moves)
  and without them (the reads replaced by "no gc ever ran"), interleaved commit by
  commit, medians and their ratio: the emulator's speed cancels;
* ``gc`` of that remote once it holds N versions (dry run, and for real with nothing to
  collect, then after a stopped push left its objects): the walk reads every marker and
  segment, so its time is per version.

Run::

    .venv/bin/python benchmarks/remote_lifecycle.py            # 40 commits, 40 versions
    .venv/bin/python benchmarks/remote_lifecycle.py --quick    # 6 commits
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engram.store import SampleIds, Store
from engram.store.remote import push
from engram.store.remote.gc import gc
from engram.store.remote.layout import Fence

BUCKET = "engram-bench-lifecycle"
steps = importlib.import_module("engram.store.remote.push")


def commit(store: Store, i: int) -> None:
    ids = store.samples.append([bytes([i % 256]) * 256 for _ in range(16)])
    table = store.load(state=True, model=False).state["buffer"].tolist() if store.head else []
    state = {
        "kept": torch.arange(256 * 1024, dtype=torch.float32),  # 1 MiB, pushed once
        "step": torch.full((16 * 1024,), float(i)),  # 64 KiB, new every version
        "buffer": SampleIds.of(torch.tensor(table + ids, dtype=torch.int64)),
    }
    store.commit(state, model={"w": torch.full((4, 4), float(i))})


def timed_push(path: Path, fence: bool) -> float:
    saved = steps.read_fence, steps._settle
    if not fence:  # as a push did before the fence: no reads of gc.json
        steps.read_fence = lambda client: Fence()
        steps._settle = lambda client, seen, relied: seen
    try:
        start = time.perf_counter()
        push(path)
        return time.perf_counter() - start
    finally:
        steps.read_fence, steps._settle = saved


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--quick", action="store_true")
    commits = 6 if args.parse_args().quick else 40
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                          AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp) / "store", f"s3://{BUCKET}/lifecycle", commits)
    finally:
        server.stop()


def run(path: Path, url: str, commits: int) -> None:
    with Store.open(path, mode="c") as store:
        commit(store, 0)
    push(path, url)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(1, commits + 1):
        with Store.open(path, mode="w") as store:
            commit(store, i)
        fence = i % 2 == 0  # interleaved: the emulator's drift hits both alike
        times[fence].append(timed_push(path, fence))
    with_fence, without = (statistics.median(times[k]) * 1e3 for k in (True, False))
    print(f"push of one version, median of {len(times[True])} / {len(times[False])}:")
    print(f"  with the fence {with_fence:.1f} ms, without {without:.1f} ms, "
          f"ratio {with_fence / without:.2f}x")  # fmt: skip

    versions = commits + 1
    for label, dry in (("dry run", True), ("nothing to collect", False)):
        start = time.perf_counter()
        report = gc(url, dry_run=dry, grace_s=0)
        took = time.perf_counter() - start
        print(
            f"gc of {versions} versions ({label}): {took * 1e3:.0f} ms, "
            f"{took / versions * 1e3:.1f} ms per version, removed {len(report.removed)}"
        )
    with Store.open(path, mode="w") as store:
        commit(store, commits + 1)
    saved = steps._move_head
    steps._move_head = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stopped"))
    try:
        push(path)
    except RuntimeError:
        pass
    finally:
        steps._move_head = saved
    start = time.perf_counter()
    report = gc(url, grace_s=0)
    took = time.perf_counter() - start
    print(f"gc after a stopped push: {took * 1e3:.0f} ms, removed {len(report.removed)} "
          f"objects ({report.removed_bytes / 1024:.0f} KiB)")  # fmt: skip


if __name__ == "__main__":
    main()
