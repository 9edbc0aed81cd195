"""Remote benchmark: push/pull against an S3 emulator, as ratios to raw transfers.

Against moto's S3 server on 127.0.0.1 (started here, dummy credentials), in one run:

* throughput: ``push`` of a one-version store and ``pull`` of it into an empty
  directory, each timed beside a raw upload (download) of the same files with the same
  library (obstore ``put``/``get``, the download written and fsynced like a pull's);
  interleaved round by round, reported as a ratio (the emulator's own speed cancels);
* incrementality: a run of commits, each changing a small part of the state and adding
  replay samples, pushed after every commit: bytes uploaded at version 1, 10, 100
  against what the version adds (its manifest's ``new_bytes``) and the store's size;
* the training stall of background pushes (``engram-train store.remote=``): what the
  training thread spends blocked per commit in ``commit`` + ``BackgroundPusher.request``
  while the previous version's push is in flight, against a commit with no remote and
  against the upload itself (the same versions pushed in the foreground), in one run.
  Here the emulator runs in its own process: in this one it would hold the GIL that the
  training thread's commit needs, a stall no real object store causes.

Run::

    python benchmarks/remote.py            # 128 MiB store, 3 rounds; 100 versions; 30 commits
    python benchmarks/remote.py --quick    # 16 MiB, 2 rounds; 20 versions; 4 commits
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from common import command, emit, machine, parser, scratch, table

from engram.store import SampleIds, Store
from engram.store import format as fmt
from engram.store.remote import pull, push

BUCKET = "engram-bench"


@contextmanager
def emulator() -> Iterator[str]:
    """moto's S3 server on a free local port, the AWS variables pointing at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = dict(os.environ)
    try:
        _, port = server.get_host_and_port()
        os.environ.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_DEFAULT_REGION="us-east-1",
        )
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


@contextmanager
def emulator_process() -> Iterator[str]:
    """moto's S3 server in a child process (``moto_server``), the AWS variables set."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                               "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    saved = dict(os.environ)
    try:
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
                          AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
        deadline = time.monotonic() + 30
        while True:  # bounded: until the server accepts
            try:
                boto3.client("s3").create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        yield f"s3://{BUCKET}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.terminate()
        server.wait(30)


def raw_store(url: str):  # the same library, the same client options as the remote's
    from engram.store.remote.client import ObjectStore

    return ObjectStore(url)


def store_files(path: Path) -> list[Path]:
    return sorted(p for sub in (fmt.BLOB_DIR, fmt.CHECKPOINT_DIR) for p in (path / sub).iterdir())


def throughput(root: Path, url: str, mib: int, rounds: int) -> list[list[object]]:
    gen = torch.Generator().manual_seed(0)
    src = root / "src"
    per = mib * 2**20 // 4 // 2  # floats in the state, and again in the weights
    with Store.open(src, mode="c") as store:
        store.commit({"state": torch.randn(per, generator=gen)},
                     model={"w": torch.randn(per, generator=gen)})  # fmt: skip
    files = store_files(src)
    nbytes = sum(p.stat().st_size for p in files)
    times: dict[str, list[float]] = {k: [] for k in ("push", "raw up", "pull", "raw down")}
    for r in range(rounds):
        remote = f"{url}/tp{r}"
        start = time.perf_counter()
        push(src, remote)
        times["push"].append(time.perf_counter() - start)

        raw = raw_store(f"{url}/raw{r}")
        start = time.perf_counter()
        for p in files:
            raw.create(p.name, p)
        times["raw up"].append(time.perf_counter() - start)

        start = time.perf_counter()
        pull(remote, root / f"clone{r}")
        times["pull"].append(time.perf_counter() - start)

        out = root / f"raw{r}"
        out.mkdir()
        start = time.perf_counter()
        for p in files:
            with open(out / p.name, "wb") as f:
                raw.get_into(p.name, f, lambda _: None)
                f.flush()
                os.fsync(f.fileno())
        times["raw down"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    mb = nbytes / 2**20
    return [
        ["push", f"{mb / med['push']:.0f} MiB/s", f"{mb / med['raw up']:.0f} MiB/s",
         f"{med['raw up'] / med['push']:.2f}x"],
        ["pull", f"{mb / med['pull']:.0f} MiB/s", f"{mb / med['raw down']:.0f} MiB/s",
         f"{med['raw down'] / med['pull']:.2f}x"],
    ]  # fmt: skip


def incremental(root: Path, url: str, versions: int) -> list[list[object]]:
    gen = torch.Generator().manual_seed(1)
    path = root / "inc"
    kept = torch.randn(1 << 20, generator=gen)  # 4 MiB every version keeps
    weights = {"w": torch.randn(1 << 18, generator=gen)}  # 1 MiB, unchanged
    marks = sorted({1, min(10, versions), versions})
    rows = []
    table_ids: list[int] = []
    remote = f"{url}/inc"
    with Store.open(path, mode="c") as store:
        for i in range(1, versions + 1):
            table_ids += store.samples.append([os.urandom(256) for _ in range(16)])
            state = {
                "kept": kept,
                "step": torch.randn(16 << 10, generator=gen),  # 64 KiB new each version
                "buffer": SampleIds.of(torch.tensor(table_ids, dtype=torch.int64)),
            }
            info = store.commit(state, model=weights, meta={"experience": i})
            start = time.perf_counter()
            sent = push(store, None if i > 1 else remote).uploaded_bytes
            seconds = time.perf_counter() - start
            if i in marks:
                size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
                rows.append([i, f"{size / 2**20:.1f} MiB", f"{info.new_bytes / 1024:.0f} KiB",
                             f"{sent / 1024:.0f} KiB", f"{sent / max(info.new_bytes, 1):.2f}x",
                             f"{seconds * 1000:.0f} ms"])  # fmt: skip
    return rows


def stall(root: Path, url: str, mib: int, commits: int) -> tuple[list[list[object]], float]:
    """Per commit of ``mib`` MiB of new state, interleaved commit by commit (the machine's
    load then weighs on each alike): the training thread's time in ``commit`` with no
    remote; in ``commit`` + ``request`` while a background push of the previous version
    is in flight, its worker at the default niceness and at 0 (as before it had one);
    and a foreground ``push`` of one such version (the upload). The stall: median over
    commits of (blocked − commit alone) / upload; returned for the default."""
    from engram.store.remote import BackgroundPusher, unpushed
    from engram.store.remote.background import WORKER_NICENESS

    gen = torch.Generator().manual_seed(2)
    floats = mib * 2**20 // 4

    def state() -> dict[str, torch.Tensor]:  # all new bytes: every push uploads `mib`
        return {"weights": torch.randn(floats, generator=gen)}

    def wait_pushed(store: Store) -> None:
        deadline = time.monotonic() + 120
        while unpushed(store) != [] and time.monotonic() < deadline:  # bounded
            time.sleep(0.01)

    def timed(fn: object, *args: object) -> float:
        start = time.perf_counter()
        fn(*args)  # type: ignore[operator]
        return time.perf_counter() - start

    nices = (WORKER_NICENESS, 0)
    times: dict[str, list[float]] = {"alone": [], "upload": []}
    with contextlib.ExitStack() as stack:
        alone, fg = (stack.enter_context(Store.open(root / n, mode="c")) for n in ("a", "f"))
        fg.commit(state())
        push(fg, f"{url}/foreground")
        pushers = {}
        for nice in nices:
            bg = stack.enter_context(Store.open(root / f"bg{nice}", mode="c"))
            bg.commit(state())
            pushers[nice] = BackgroundPusher(bg, f"{url}/bg{nice}", niceness=nice)
            stack.callback(pushers[nice].finish)
            pushers[nice].request()
            wait_pushed(bg)  # the worker started (it imports torch once per run)
            times[f"commit {nice}"], times[f"request {nice}"] = [], []
        for _ in range(commits):
            times["alone"].append(timed(alone.commit, state()))
            for nice, pusher in pushers.items():
                pusher.store.commit(state())
                pusher.request()  # this push is in flight during the next, measured commit
                times[f"commit {nice}"].append(timed(pusher.store.commit, state()))
                times[f"request {nice}"].append(timed(pusher.request))
                wait_pushed(pusher.store)
            fg.commit(state())
            times["upload"].append(timed(push, fg))
    med = {k: statistics.median(v) for k, v in times.items()}
    ms = lambda x: f"{x * 1000:.1f} ms"  # noqa: E731
    rows: list[list[object]] = [["commit, no remote", ms(med["alone"])]]
    ratios = {}
    for nice in nices:
        blocked = [c + r - a for a, c, r in zip(times["alone"], times[f"commit {nice}"],
                                                times[f"request {nice}"], strict=True)]  # fmt: skip
        ratios[nice] = statistics.median(b / u for b, u in zip(blocked, times["upload"],
                                                                strict=True))  # fmt: skip
        rows.append([f"commit, a push in flight (worker niceness {nice})",
                     ms(med[f"commit {nice}"])])  # fmt: skip
    rows.append(["`BackgroundPusher.request()` (the enqueue)",
                 f"{med[f'request {nices[0]}'] * 1e6:.0f} us"])  # fmt: skip
    rows.append(["push of one version in the foreground (the upload)", ms(med["upload"])])
    for nice in nices:
        rows.append([f"**stall**, worker niceness {nice}: (commit + request − commit alone) "
                     "/ upload", f"{ratios[nice]:.3f}"])  # fmt: skip
    return rows, ratios[nices[0]]


def main() -> None:
    args = parser(__doc__).parse_args()
    mib, rounds, versions = (16, 2, 20) if args.quick else (128, 3, 100)
    with scratch("engram-remote-bench-") as root, emulator() as url:
        speed = throughput(root, url, mib, rounds)
        growth = incremental(root, url, versions)
    stall_mib, commits = (4, 4) if args.quick else (16, 30)
    with scratch("engram-remote-stall-") as root, emulator_process() as url:
        blocked, ratio = stall(root, url, stall_mib, commits)
    text = f"""
## Remote (push/pull to an S3 emulator)

`{command(args)}` — {machine()}; moto's S3 server on 127.0.0.1 (in-process Python, so
absolute speeds are the emulator's; the ratios compare engram with the same library's
raw transfer of the same bytes, in the same run).

### Throughput ({mib} MiB store, median of {rounds} rounds)

{table(["", "engram", "raw obstore", "engram / raw"], speed)}

### Bytes pushed per commit (each version: 64 KiB new state, 16 new replay samples)

{table(["version", "store on disk", "version adds", "pushed", "pushed / adds", "push time"],
       growth)}

### Training stall of background pushes ({stall_mib} MiB new per commit, median of {commits})

The emulator runs in its own process here (in this one it would hold the GIL a commit
needs). Goal: stall ≤ 0.05 of the upload at the default niceness
({"met" if ratio <= 0.05 else "NOT met"}).

{table(["", "per commit"], blocked)}
"""  # fmt: skip
    emit(args, text)


if __name__ == "__main__":
    main()
