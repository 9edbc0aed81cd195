"""Why blob bytes live in pack files: LMDB values vs a pack file vs raw write, side by side.

Writes the same 256 MiB (16 chunks of 16 MiB) three ways, interleaved round by round,
each durable (fsync / LMDB's synchronous commit):

    python benchmarks/lmdb_vs_packs.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np


def raw(directory: Path, chunks: list[np.ndarray]) -> None:
    with open(directory / "raw.bin", "wb") as f:
        for chunk in chunks:
            f.write(chunk.data)
        f.flush()
        os.fsync(f.fileno())


def lmdb_values(directory: Path, chunks: list[np.ndarray], writemap: bool) -> None:
    env = lmdb.open(str(directory / f"lmdb{int(writemap)}"), map_size=1 << 31, writemap=writemap)
    with env.begin(write=True) as txn:
        for i, chunk in enumerate(chunks):
            txn.put(i.to_bytes(8, "big"), chunk.data)
    env.close()


def pack(directory: Path, chunks: list[np.ndarray]) -> None:
    from engram.store.packs import PackWriter

    writer = PackWriter(directory, 1)
    for chunk in chunks:
        writer.append(chunk.data, 0)
    writer.finish()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 256, 16 << 20, dtype=np.uint8) for _ in range(16)]
    methods = {
        "raw write+fsync": raw,
        "pack file (engram)": pack,
        "LMDB values": lambda d, c: lmdb_values(d, c, writemap=False),
        "LMDB values, writemap": lambda d, c: lmdb_values(d, c, writemap=True),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    root = Path(tempfile.mkdtemp(prefix="engram-lmdb-vs-packs-"))
    try:
        for r in range(args.rounds):
            for name, method in methods.items():
                d = root / f"{r}-{len(times[name])}-{name.split()[0]}"
                d.mkdir()
                start = time.perf_counter()
                method(d, chunks)
                times[name].append(time.perf_counter() - start)
                shutil.rmtree(d)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ref = statistics.median(times["raw write+fsync"])
    print(f"## 256 MiB written durably, median of {args.rounds} rounds\n")
    print("| method | seconds | GiB/s | vs raw write+fsync |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.3f} | {0.25 / med:.2f} | {ref / med:.2f}x |")


if __name__ == "__main__":
    main()
