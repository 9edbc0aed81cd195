"""Remote benchmark: push/pull against an S3 emulator, as ratios to raw transfers.

Against moto's S3 server on 127.0.0.1 (started here, dummy credentials), in one run:

* throughput: ``push`` of a one-version store and ``pull`` of it into an empty
  directory, each timed beside a raw upload (download) of the same files with the same
  library (obstore ``put``/``get``, the download written and fsynced like a pull's);
  interleaved round by round, reported as a ratio (the emulator's own speed cancels);
* incrementality: a run of commits, each changing a small part of the state and adding
  replay samples, pushed after every commit: bytes uploaded at version 1, 10, 100
  against what the version adds (its manifest's ``new_bytes``) and the store's size.

Run::

    python benchmarks/remote.py            # 128 MiB store, 3 rounds; 100 versions
    python benchmarks/remote.py --quick    # 16 MiB, 2 rounds; 20 versions
"""

from __future__ import annotations

import os
import statistics
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


def main() -> None:
    args = parser(__doc__).parse_args()
    mib, rounds, versions = (16, 2, 20) if args.quick else (128, 3, 100)
    with scratch("engram-remote-bench-") as root, emulator() as url:
        speed = throughput(root, url, mib, rounds)
        growth = incremental(root, url, versions)
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
"""  # fmt: skip
    emit(args, text)


if __name__ == "__main__":
    main()
