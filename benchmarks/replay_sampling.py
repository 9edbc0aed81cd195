"""Replay sampling throughput and memory vs buffer size (LMDB-backed ReplayBuffer).

784-byte samples (uint8, MNIST-sized), minibatches of 128, one core. For each buffer
size the buffer is filled, then sampled repeatedly; the process's anonymous RSS is
read before filling and after sampling (the LMDB map is file-backed, so buffered
samples should not count there).

    python benchmarks/replay_sampling.py                    # 10k, 100k, 1M samples
    python benchmarks/replay_sampling.py --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from engram.memory.replay import ReplayBuffer
from engram.store import Store


def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(size: int, batch: int, seconds: float) -> tuple[float, float, float]:
    root = Path(tempfile.mkdtemp(prefix="engram-replay-"))
    try:
        with Store.open(root / "s", mode="c") as store:
            before = rss_anon_mib()
            buffer = ReplayBuffer(store, capacity=size, policy="reservoir", seed=0)
            gen = torch.Generator().manual_seed(0)
            chunk = 10_000
            for start in range(0, size, chunk):
                n = min(chunk, size - start)
                x = torch.randint(0, 256, (n, 784), dtype=torch.uint8, generator=gen)
                buffer.add(x, torch.randint(0, 10, (n,), generator=gen), experience=0)
            store.commit({"replay": buffer.state_dict()})
            for start in range(0, size, 50_000):  # warm the page cache and the map
                buffer.read(buffer.slots[start : start + 50_000].tolist())
            drawn, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                buffer.sample(batch)
                drawn += batch
            rate = drawn / (time.perf_counter() - start)
            after = rss_anon_mib()
        # Reference: the same gather from an in-memory (size, 784) tensor, the
        # machine's random-access limit for this working set.
        memory = torch.randint(0, 256, (size, 784), dtype=torch.uint8, generator=gen)
        drawn, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            memory.index_select(0, torch.randint(size, (batch,), generator=gen))
            drawn += batch
        reference = drawn / (time.perf_counter() - start)
        return rate, before, after, reference
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [(size, *measure(size, args.batch, args.seconds)) for size in args.sizes]
    base = rows[0][1]
    print(f"## Replay sampling, 784-byte samples, minibatch {args.batch}, 1 thread\n")
    print(
        "| buffered samples | engram samples/s | vs smallest | in-memory tensor samples/s "
        "| vs smallest | anon RSS before (MiB) | after |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ref_base = rows[0][4]
    for size, rate, before, after, ref in rows:
        print(
            f"| {size:,} | {rate:,.0f} | {rate / base:.2f}x | {ref:,.0f} | {ref / ref_base:.2f}x "
            f"| {before:.0f} | {after:.0f} |"
        )


if __name__ == "__main__":
    main()
