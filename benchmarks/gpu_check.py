"""The checks behind ``benchmarks/gpu_check.sh``, one subcommand each; each prints its
figures as its last line and exits non-zero, saying why, when the check fails.

    python benchmarks/gpu_check.py train STORE --device cuda --precision 16-mixed -- [overrides]
    python benchmarks/gpu_check.py train STORE --device cpu --precision 16-mixed --ranks 2
    python benchmarks/gpu_check.py kill-rerun ROOT --device cuda -- [engram-train overrides]
    python benchmarks/gpu_check.py resume-on-cpu ROOT -- [engram-train overrides]
    torchrun --standalone --nproc-per-node=1 benchmarks/gpu_check.py nccl
    python benchmarks/gpu_check.py persistence --device cuda --rounds 3
    python benchmarks/gpu_check.py vs-avalanche --device cuda --rounds 3
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore")

ENGRAM_TRAIN = [sys.executable, "-m", "engram.train"]
KILL_DEADLINE_S = 240.0  # for the killed run to reach a mid-experience version


class CheckFailed(Exception):
    """The check ran and found something wrong."""


def engram_train(store: Path, overrides: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*ENGRAM_TRAIN, f"store.path={store}", *overrides],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if proc.returncode != 0:
        raise CheckFailed(f"engram-train exited {proc.returncode}: {proc.stderr[-1500:]}")
    return proc


def weights(store: Path) -> dict[str, torch.Tensor]:
    from engram.store import Store

    with Store.open(store) as s:
        return s.load(state=False).model


def train(args: argparse.Namespace) -> str:
    """An ``engram-train`` run (``--ranks`` > 1: under ``torchrun``) trains where and how
    it was asked to, its weights are finite and its store verifies."""
    from engram.metrics import average_accuracy
    from engram.store import Store

    overrides = [f"training.device={args.device}", f"training.precision={args.precision}",
                 *args.rest]  # fmt: skip
    if args.ranks == 1:
        engram_train(args.store, overrides)
    else:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        proc = subprocess.run([torchrun, "--standalone", f"--nproc-per-node={args.ranks}",
                               "-m", "engram.train", f"store.path={args.store}", *overrides],
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        if proc.returncode != 0:
            raise CheckFailed(f"torchrun exited {proc.returncode}: {proc.stderr[-1500:]}")
    with Store.open(args.store) as s:
        if not s.verify(all=True).ok:
            raise CheckFailed(f"{args.store} does not verify")
        head = s.head
        ex = head.meta["execution"]
        if (ex["device"], ex["precision"]) != (args.device, args.precision):
            raise CheckFailed(f"HEAD {head.name} ran on {ex['device']} in {ex['precision']}, "
                              f"not {args.device} in {args.precision}")  # fmt: skip
        snap = s.load()
    bad = [k for k, v in snap.model.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise CheckFailed(f"non-finite weights: {bad[:3]}")
    metrics = snap.state["metrics"]
    scale = snap.state.get("scaler", {}).get("scale")
    return (f"{ex['device']} ({ex['device_name']}) {ex['precision']}, {ex['world_size']} "
            f"rank(s): average accuracy "
            f"{average_accuracy(metrics['accuracy_matrix']):.3f}, skipped updates "
            f"{metrics.get('skipped_updates', 0)}"
            + (f", loss scale {scale:g}" if scale is not None else ""))  # fmt: skip


def head_kind(store: Path) -> str | None:
    from engram.store import Store

    try:
        with Store.open(store) as s:
            return s.head.meta["kind"] if s.head is not None else None
    except Exception:  # not created yet, or being created
        return None


def kill_rerun(args: argparse.Namespace) -> str:
    """SIGKILL a deterministic run at its first mid-experience version, rerun the same
    command: the weights equal an uninterrupted run's, bit for bit."""
    overrides = [f"training.device={args.device}", "training.deterministic=true", *args.rest]
    whole, killed = args.root / "whole", args.root / "killed"
    engram_train(whole, overrides)
    proc = subprocess.Popen([*ENGRAM_TRAIN, f"store.path={killed}", *overrides],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + KILL_DEADLINE_S
    try:
        while proc.poll() is None and head_kind(killed) != "mid-experience":
            if time.monotonic() > deadline:
                raise CheckFailed(f"no mid-experience version within {KILL_DEADLINE_S:.0f} s")
            time.sleep(0.02)
        if proc.poll() is not None:
            raise CheckFailed(f"the run ended (exit {proc.returncode}) before it could be "
                              "killed mid-experience: commit more often")  # fmt: skip
        proc.send_signal(signal.SIGKILL)
        if proc.wait(timeout=60) != -signal.SIGKILL:
            raise CheckFailed(f"the run ended (exit {proc.returncode}) before the kill")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    from engram.store import Store

    with Store.open(killed) as s:
        at = f"{s.head.name} ({s.head.meta['kind']})"
    engram_train(killed, overrides)
    a, b = weights(whole), weights(killed)
    if a.keys() != b.keys():
        raise CheckFailed(f"killed at {at}, the rerun has other tensors than the whole run")
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    if differ:
        raise CheckFailed(f"killed at {at}, the rerun's weights differ: {differ[:3]}")
    return f"{args.device}: killed at {at}, rerun bit-identical ({len(a)} tensors)"


def resume_on_cpu(args: argparse.Namespace) -> str:
    """A store written on CUDA resumes on the CPU, warning that it is not bit-identical."""
    from engram.store import Store

    store = args.root / "gpu-to-cpu"
    engram_train(store, ["training.device=cuda", "run.max_experiences=1", *args.rest])
    proc = engram_train(store, ["training.device=cpu", *args.rest])
    if "device: store 'cuda' vs now 'cpu'" not in proc.stderr:
        raise CheckFailed(f"no device-change warning: {proc.stderr[-800:]}")
    with Store.open(store) as s:
        devices = [v.meta["execution"]["device"] for v in s.versions()]
        if not s.verify(all=True).ok:
            raise CheckFailed(f"{store} does not verify")
    return f"versions on {' '.join(devices)}; warned about the device change"


def nccl(args: argparse.Namespace) -> str:
    """Under torchrun: engram joins an NCCL group for ``auto`` on CUDA, with the gloo group
    beside it, and the collectives it issues on CUDA tensors work (one rank: NCCL refuses
    two ranks on one GPU, so here only what one rank can show)."""
    import torch.distributed as dist

    from engram import distributed

    world = distributed.init_from_env("auto")
    try:
        if dist.get_backend() != "nccl":
            raise CheckFailed(f"device auto on CUDA joined {dist.get_backend()}, not nccl")
        t = torch.arange(4.0, device="cuda")
        dist.all_reduce(t)  # the gradient average's collective
        dist.broadcast(t, 0)  # the module broadcast's
        flag = torch.tensor([1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=world.group)  # the step decision
        if not (t.tolist() == [0.0, 1.0, 2.0, 3.0] and flag.item() == 1):
            raise CheckFailed(f"collectives gave {t.tolist()} and {flag.item()}")
        gloo = dist.get_backend(world.group)
        return (f"nccl {torch.cuda.nccl.version()} on {torch.cuda.get_device_name()}, "
                f"state group {gloo}, world size {world.size}")  # fmt: skip
    finally:
        distributed.shutdown()


def _timed(runs: dict[str, Any], rounds: int) -> dict[str, float]:
    from common import interleave, median

    interleave(runs, 1)  # warm-up: CUDA context, allocator, lazy imports
    return {k: median(v) for k, v in interleave(runs, rounds).items()}


def persistence(args: argparse.Namespace) -> str:
    """Persistence overhead on ``--device``: benchmarks/persistence.py's runs (split
    digits, MLP, naive), durable per experience (and async checkpoints) vs no commits."""
    import persistence as bench
    from common import scratch

    torch.set_num_threads(1)
    with scratch("engram-gpu-check-") as root:
        n = iter(range(10**6))

        def variant(cls: type, **kwargs: Any) -> Any:
            return lambda _: bench.run(cls, root / f"s{next(n)}", 256, args.epochs, [],
                                       device=args.device, **kwargs)  # fmt: skip

        times = _timed({
            "off": variant(bench.NoPersistence),
            "durable": variant(bench.Timed),
            "async": variant(bench.Timed, commit_every_iterations=10, async_commit=True),
        }, args.rounds)  # fmt: skip
    durable, checkpoints = times["durable"] / times["off"], times["async"] / times["off"]
    return (f"{args.device}: durable commit per experience {durable:.2f}x, + async "
            f"checkpoint every 10 iterations {checkpoints:.2f}x the time without "
            f"persistence ({times['off']:.2f} s; median of {args.rounds})")  # fmt: skip


def vs_avalanche(args: argparse.Namespace) -> str:
    """engram's EWC vs Avalanche's on ``--device`` (benchmarks/vs_avalanche.py's pair)."""
    import vs_avalanche as bench
    from avalanche.training import EWC
    from avalanche.training.plugins import EvaluationPlugin
    from common import scratch
    from torch import nn

    from engram.strategies import EWCPlugin
    from engram.streams.digits import split_digits
    from engram.training.template import AccuracyRecorder, DurableTemplate

    torch.set_num_threads(1)
    stream = split_digits(5)

    def ours(r: int) -> None:
        model, opt = bench.model_and_optimizer(r)
        plugins = [EWCPlugin(ewc_lambda=bench.EWC_LAMBDA)]
        with DurableTemplate(model=model, optimizer=opt, store=root / f"e{time.time_ns()}",
                             plugins=plugins, train_mb_size=bench.BATCH, device=args.device,
                             train_epochs=args.epochs, eval_mb_size=256, name="ewc",
                             seed=r) as t:  # fmt: skip
            t.fit(stream.train_stream, stream.test_stream)

    def theirs(r: int) -> None:
        model, opt = bench.model_and_optimizer(r)
        recorder = AccuracyRecorder()
        strategy = EWC(model=model, optimizer=opt, criterion=nn.CrossEntropyLoss(),
                       ewc_lambda=bench.EWC_LAMBDA, train_mb_size=bench.BATCH,
                       train_epochs=args.epochs, eval_mb_size=256, device=args.device,
                       evaluator=EvaluationPlugin(loggers=[]), plugins=[recorder])  # fmt: skip
        recorder.accuracy_matrix(strategy, stream.train_stream, stream.test_stream)

    with scratch("engram-gpu-check-") as root:
        times = _timed({"engram": ours, "avalanche": theirs}, args.rounds)
    return (f"{args.device}: engram EWC {times['engram'] / times['avalanche']:.2f}x "
            f"Avalanche EWC's time ({times['engram']:.2f} s vs {times['avalanche']:.2f} s; "
            f"median of {args.rounds})")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="check", required=True)
    c = sub.add_parser("train")
    c.add_argument("store", type=Path)
    c.add_argument("--device", required=True)
    c.add_argument("--precision", required=True)
    c.add_argument("--ranks", type=int, default=1)
    for name in ("kill-rerun", "resume-on-cpu"):
        c = sub.add_parser(name)
        c.add_argument("root", type=Path)
        c.add_argument("--device", default="cuda")
    sub.add_parser("nccl")
    for name in ("persistence", "vs-avalanche"):
        c = sub.add_parser(name)
        c.add_argument("--device", default="cuda")
        c.add_argument("--rounds", type=int, default=3)
        c.add_argument("--epochs", type=int, default=1)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # after it: engram-train overrides
    args = p.parse_args(argv[:cut])
    args.rest = argv[cut + 1 :]
    checks = {"train": train, "kill-rerun": kill_rerun, "resume-on-cpu": resume_on_cpu,
              "nccl": nccl, "persistence": persistence, "vs-avalanche": vs_avalanche}  # fmt: skip
    try:
        print(checks[args.check](args))
    except CheckFailed as e:
        print(" ".join(str(e).split()))
        sys.exit(1)


if __name__ == "__main__":
    main()
