"""Store I/O benchmark: engram commit/load vs raw I/O, torch.save and safetensors.

Every figure is measured side by side in one run, interleaved round by round, and
reported as a ratio to its reference (this machine is shared and noisy; absolute
times move). Run::

    python benchmarks/store_io.py            # 256 MiB state, 5 rounds
    python benchmarks/store_io.py --mib 32 --rounds 2   # quick

The state: model weights + optimizer momentum + a Fisher-sized and an anchor-sized
copy, each a quarter of the total, in 1024x1024-ish float32 tensors.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="state size in MiB")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()

    model, state = make_state(args.mib)
    flat = flatten(model, state)
    nbytes = sum(t.numel() * t.element_size() for t in flat.values())
    root = Path(tempfile.mkdtemp(prefix="engram-bench-", dir=args.dir))
    times: dict[str, list[float]] = {}

    def timed(name: str, fn) -> object:
        start = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - start)
        return out

    new_bytes_ratio = []
    buffer = bytearray(nbytes)

    def one_round(d: Path) -> None:
        timed("raw write+fsync", lambda: raw_write(d / "raw.bin", list(flat.values())))
        timed("torch.save+fsync", lambda: torch_save(d / "t.pt", {"m": model, "s": state}))
        timed("safetensors save+fsync", lambda: st_save(d / "s.safetensors", flat))
        with Store.open(d / "store", mode="c") as store:
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
    print(f"## Store I/O — {nbytes / 2**20:.0f} MiB state, median of {args.rounds} rounds\n")
    print(f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| operation | seconds | GiB/s | throughput vs reference |")
    print("|---|---:|---:|---:|")
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
        print(f"| {name} | {med[name]:.3f} | {gib / med[name]:.2f} | {ratio:.2f}x of {ref} |")
    r_state = statistics.median(r[0] for r in new_bytes_ratio)
    r_all = statistics.median(r[1] for r in new_bytes_ratio)
    print(
        f"\nA second commit where 10% of the CL-state tensors changed and the model did not "
        f"wrote {100 * r_state:.1f}% of the first commit's bytes."
    )
    print(
        f"A commit where 10% of all tensors changed, model weights included, wrote "
        f"{100 * r_all:.1f}% (a changed model means a full new safetensors checkpoint file)."
    )


if __name__ == "__main__":
    main()
