"""Store I/O benchmark: engram commit/load vs raw I/O, torch.save and safetensors.

Every figure is measured side by side in one run, interleaved round by round, and
reported as a ratio to its reference (this machine is shared and noisy; absolute
times move). Run::

    python benchmarks/store_io.py            # 256 MiB state, 5 rounds
    python benchmarks/store_io.py --quick    # 32 MiB, 2 rounds

The state: model weights + optimizer momentum + a Fisher-sized and an anchor-sized
copy, each a quarter of the total, in 1024x1024-ish float32 tensors.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import command, emit, machine, parser
from safetensors.torch import load_file, save_file

from engram.store import Store


def make_state(mib: int, seed: int = 0) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    per_part = mib * 2**20 // 4
    n_tensors = max(1, per_part // (4 * 2**20))
    numel = per_part // 4 // n_tensors
    names = [f"layer{i}.weight" for i in range(n_tensors)]

    def part() -> dict[str, torch.Tensor]:
        return {n: torch.randn(numel, generator=gen) for n in names}

    model = part()
    state = {"optimizer": part(), "ewc": {"fisher": part(), "anchor": part()}}
    return model, state


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def raw_write(path: Path, tensors: list[torch.Tensor]) -> None:
    with open(path, "wb") as f:
        for t in tensors:
            f.write(t.numpy().data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)


def prime(nbytes: int) -> None:
    """Touch and free ``nbytes`` (and some) of memory just before a timed write: on this
    VM, pages freed seconds ago are handed back to the hypervisor and writing a file's
    page cache into them is 15-20x slower (benchmarks/scaling.py's ``_prime``); primed,
    every writer gets pages freed a moment before."""
    torch.ones(nbytes + (64 << 20), dtype=torch.uint8)  # allocated, written, freed


def raw_read(path: Path) -> bytes:
    """Read into fresh memory, as any loader must to hand out new tensors."""
    with open(path, "rb") as f:
        return f.read()


def raw_read_into(path: Path, buffer: bytearray) -> None:
    """Read into memory already faulted in: the machine's read limit."""
    with open(path, "rb", buffering=0) as f:
        f.readinto(buffer)


def perturb(tree: dict, every: int, start: int = 0) -> dict:
    """A copy of a nested dict of tensors where every ``every``-th tensor changed."""
    counter = iter(range(start, 10**9))

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node + 1.0 if next(counter) % every == 0 else node

    return walk(tree)


def torch_save(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def st_save(path: Path, flat: dict) -> None:
    save_file(flat, path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def flatten(model: dict, state: dict) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in model.items()}
    out.update({f"optimizer.{k}": v for k, v in state["optimizer"].items()})
    for part in ("fisher", "anchor"):
        out.update({f"ewc.{part}.{k}": v for k, v in state["ewc"][part].items()})
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--mib", type=int, default=None, help="state size in MiB (default 256)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5)")
    p.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = p.parse_args()
    extra = "".join(f" --{k} {v}" for k in ("mib", "rounds") if (v := getattr(args, k)))
    args.mib = args.mib or (32 if args.quick else 256)
    args.rounds = args.rounds or (2 if args.quick else 5)

    model, state = make_state(args.mib)
    flat = flatten(model, state)
    nbytes = sum(t.numel() * t.element_size() for t in flat.values())
    root = Path(tempfile.mkdtemp(prefix="engram-bench-", dir=args.dir))
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}  # CPU seconds of this process (all its threads)

    def timed(name: str, fn) -> object:
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - start)
        cpu.setdefault(name, []).append(time.process_time() - start_cpu)
        return out

    new_bytes_ratio = []
    buffer = bytearray(nbytes)

    def one_round(d: Path) -> None:
        prime(nbytes)
        timed("raw write+fsync", lambda: raw_write(d / "raw.bin", list(flat.values())))
        prime(nbytes)
        timed("torch.save+fsync", lambda: torch_save(d / "t.pt", {"m": model, "s": state}))
        prime(nbytes)
        timed("safetensors save+fsync", lambda: st_save(d / "s.safetensors", flat))
        with Store.open(d / "store", mode="c") as store:
            prime(nbytes)
            v1 = timed("engram commit", lambda: store.commit(state, model=model))
            # 10% of the CL-state tensors change, the model does not...
            v2 = store.commit(perturb(state, 10), model=model)
            # ...and 10% of all tensors change, model weights included.
            v3 = store.commit(perturb(state, 10, start=5), model=perturb(model, 10))
            new_bytes_ratio.append((v2.new_bytes / v1.new_bytes, v3.new_bytes / v1.new_bytes))
        timed("raw read", lambda: raw_read(d / "raw.bin"))
        timed("raw read into warm buffer", lambda: raw_read_into(d / "raw.bin", buffer))
        timed("torch.load", lambda: torch.load(d / "t.pt", weights_only=True))
        timed("safetensors load", lambda: load_file(d / "s.safetensors"))
        with Store.open(d / "store") as store:
            timed("engram load HEAD~2", lambda: store.load("HEAD~2"))
            timed("engram load (verify=True)", lambda: store.load("HEAD~2", verify=True))

    try:
        for r in range(args.rounds):
            d = root / f"round{r}"
            d.mkdir()
            one_round(d)
            shutil.rmtree(d)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    gib = nbytes / 2**30
    rows = []
    for name, ref in [
        ("raw write+fsync", "raw write+fsync"),
        ("torch.save+fsync", "raw write+fsync"),
        ("safetensors save+fsync", "raw write+fsync"),
        ("engram commit", "raw write+fsync"),
        ("raw read", "raw read"),
        ("raw read into warm buffer", "raw read"),
        ("torch.load", "raw read"),
        ("safetensors load", "raw read"),
        ("engram load HEAD~2", "raw read"),
        ("engram load (verify=True)", "raw read"),
        ("engram load HEAD~2", "raw read into warm buffer"),
    ]:
        ratio = med[ref] / med[name]
        rows.append(f"| {name} | {med[name]:.3f} | {gib / med[name]:.2f} | {ratio:.2f}x of {ref} |")
    r_state = statistics.median(r[0] for r in new_bytes_ratio)
    r_all = statistics.median(r[1] for r in new_bytes_ratio)
    commit = med["raw write+fsync"] / med["engram commit"]
    load = med["raw read"] / med["engram load HEAD~2"]
    warm = med["raw read into warm buffer"] / med["engram load HEAD~2"]
    verify = med["raw read"] / med["engram load (verify=True)"]
    commit_cpu = statistics.median(cpu["engram commit"])
    raw_cpu = statistics.median(cpu["raw write+fsync"])
    table = "\n".join(rows)
    emit(
        args,
        f"""
## Store I/O (issue 2)

```bash
{command(args, extra)}
```

State: {nbytes / 2**20:.0f} MiB of float32 tensors — model weights, optimizer momentum, and a
Fisher-sized and an anchor-sized copy (a quarter each). Median of {args.rounds} interleaved
rounds; page cache warm. Machine: {machine()}.

| operation | seconds | GiB/s | throughput vs reference |
|---|---:|---:|---:|
{table}

A second commit where 10% of the CL-state tensors changed and the model did not wrote
**{100 * r_state:.1f}%** of the first commit's bytes; a commit where 10% of all tensors
changed, model weights included, wrote **{100 * r_all:.1f}%**.

Reading the table:

- **Commit: {commit:.2f}x of raw write+fsync (target ≥ 0.8x, issue 25).** A commit
  content-addresses every 16 MiB chunk with SHA-256 (+ XXH3-64) and writes the model's
  safetensors checkpoint while a second thread hashes it (SHA-256 + XXH3-64 from the
  tensors' memory). The chunks are hashed in parallel lanes that leave the checkpoint's
  one sequential SHA-256 a core of its own; a chunk whose XXH3 says it is new (not one
  of the parent's) goes into the pack file before its SHA-256 is known; the disk is
  asked to start on each file every 8 MiB (`sync_file_range`), so the fsyncs at the end
  wait for the last few MiB; one LMDB transaction publishes. Its CPU time:
  {commit_cpu:.2f} s against the raw write's {raw_cpu:.2f} s ({commit_cpu / raw_cpu:.1f}x,
  medians): SHA-256 of every byte (~1.6 GiB/s per core on this VM) on top of the same
  page-cache copy. So a commit keeps up with the raw write only with both cores free;
  on a machine whose other core is busy, hashing — not I/O — bounds it. Every timed
  write is primed (`prime`). Blob bytes as LMDB values instead of pack files cost more
  (next section).
- **Load HEAD~2: {load:.2f}x of "raw read" (target ≥ 0.8x)**: "raw read" is `f.read()` of
  the same bytes into new memory, what any loader that hands out new tensors must do;
  engram copies state chunks from the page cache (mmap) into new tensors, checking every
  chunk's XXH3 checksum, and maps the model checkpoint through safetensors. Against
  reading into a buffer that is already faulted in (the machine's memcpy-from-page-cache
  limit) it is {warm:.2f}x. `safetensors load` is not comparable: `load_file` returns
  mmap-backed tensors whose pages are read on first touch, so its time excludes the read.
- **`load(verify=True)`** also re-checks every SHA-256 ({verify:.2f}x of raw read).
- **Deduplication (target ≤ 15%)**: unchanged chunks are stored once and an unchanged
  model shares its parent's checkpoint file, so the first figure is about the changed
  tenth. When the model changes too, the version keeps its model as one plain safetensors
  file (a quarter of this state), hence the second figure; delta-compacting older
  checkpoint files is issue 6's history compaction.
""",
    )


if __name__ == "__main__":
    main()
