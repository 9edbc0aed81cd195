"""Scaling: what each store operation costs as the history, the model, the replay
buffer and the stream grow.

    python benchmarks/scaling.py            # 10 -> 10,000 versions; 1e5 -> 1e8 parameters;
                                            # 1e3 -> 1e6 buffered samples; 10 -> 100 experiences
    python benchmarks/scaling.py --quick    # 10 -> 100; 1e5 -> 1e6; 1e3 -> 1e4; 10 -> 20

History: one store grows to each length in turn, by mid-experience-style commits of a
small model through ``Store.commit`` (MLP 64-32-10 weights and SGD momentum, both
changed every commit, so each writes a pack and a checkpoint file). The commits that
only lengthen the history run in a builder process with fsync and LMDB's sync turned
off (the bytes written are the same; 10,000 durable commits would take minutes of
fsyncs); every cost is measured afterwards in a fresh, unpatched process: a commit,
one experience's end (the template's mid-experience commits, its commit, and pruning the
mid-experience versions: now from the fence, and by a full gc as before, side by side),
``engram ls`` (a subprocess of the CLI), the listing in process, ``Store.open`` with a
resume of HEAD, a full gc, a compaction after 10 more commits, the store's bytes and the
process's peak RSS.

Model: for each size, a fresh process commits the weights with their SGD momentum (twice
the model's bytes) next to a raw write+fsync of the same bytes, loads HEAD next to a raw
read of them (page cache warm), and records its peak RSS during the commit above its RSS
before it (``/proc/self/clear_refs``, then ``VmHWM``). Each timed write is primed
(:func:`_prime`: this VM makes writes into long-free pages 15-20x slower) and its CPU
time taken too.

Replay buffer: for each capacity, a fresh process fills an engram ``ReplayBuffer`` per
policy, then times admitting one experience's samples into it full, minibatch draws,
the commit of the change, a restore, and records its peak RSS.

Stream: for each length, a fresh process fits ``DurableTemplate`` on a stream of that
many one-class experiences with a linear model, timing what each experience's end
costs beside training: evaluation on every test experience, the commit (with gate and
prune), the TensorBoard writes (the accuracy-matrix figure among them).

Each cost gets its log-log growth exponent (least squares over the sizes; 0: flat, 1:
linear) and the ratio of its largest to its smallest size.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import git_commit

from engram.cli.history import LS_NEWEST as LISTED  # what `engram ls` shows by default

CHILD = "--child"
MIDS = 3  # mid-experience versions per experience in the experience-end cycle
REFERENCE = "reference: write+fsync 16 KiB"  # measured next to the commits
_CLI = "import sys; from engram.cli import main; sys.exit(main())"  # no console script
_CLI_PEAK = (  # the same, then its peak RSS (bytes) on stderr
    "import sys; from engram.cli import main; code = main(); "
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]; "
    "print(int(hwm) * 1024, file=sys.stderr); sys.exit(code)"
)


# ------------------------------------------------------------------ child processes


def _small_model():  # (torch is imported in the children only)
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # momentum buffers exist
    return model, optimizer


def _step(model, optimizer, i: int) -> dict:
    """A training step's worth of change (weights and momentum), and the state to commit."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
            optimizer.state[p]["momentum_buffer"].mul_(0.9)
    return {"optimizer": optimizer.state_dict(), "clock": {"iteration": i}}


def _meta(i: int, kind: str = "mid-experience", experience: int | None = None) -> dict:
    experience = i // 100 if experience is None else experience
    return {"kind": kind, "experience": experience, "clock": {"train_iterations": i}}


def build(path: str, versions: int) -> None:
    """Commit until the store holds ``versions`` versions (not durably: filler)."""
    import lmdb

    os.fsync = lambda fd: None  # the filler need not survive a crash
    opened = lmdb.open
    lmdb.open = lambda *a, **k: opened(*a, **{**k, "sync": False, "metasync": False})
    import torch

    torch.set_num_threads(1)
    from engram.store import Store

    model, optimizer = _small_model()
    with Store.open(path, mode="c") as s:
        i = len(s.versions())
        while i < versions:
            kind = "experience" if i % 100 == 99 else "mid-experience"
            s.commit(_step(model, optimizer, i), model=model, message=f"iteration {i}",
                     meta=_meta(i, kind))  # fmt: skip
            i += 1


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _timed(fn, *args, **kwargs) -> float:
    """Seconds ``fn(*args, **kwargs)`` takes."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def _write_fsync(path: Path, nbytes: int) -> None:
    """The disk's own latency, next to the commits: a new file written and fsynced."""
    with open(path, "wb") as f:
        f.write(b"\0" * nbytes)
        f.flush()
        os.fsync(f.fileno())


def _full_prune(s, policy, before: set[int], index: int) -> None:
    """What ``CommitPolicy.prune`` did before the fence: list every version, full gc."""
    s.gc(drop=policy.stale(s.versions(), before, index))


class _Costs:
    """Per operation: the seconds of each call, and the most its peak RSS rose above the
    RSS before it (``/proc/self/clear_refs`` resets the peak)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.peak: dict[str, int] = {}

    def __call__(self, key: str, fn, *args, **kwargs) -> None:
        before, reset = _rss(), _reset_peak()
        self.seconds.setdefault(key, []).append(_timed(fn, *args, **kwargs))
        if reset:
            self.peak[key] = max(self.peak.get(key, 0), _peak_rss() - before)

    def result(self) -> dict:
        import statistics

        return {
            "seconds": {k: statistics.median(v) for k, v in self.seconds.items()},
            "peak": self.peak,
        }


def measure(path: str, rounds: int) -> dict:
    """Every per-operation cost at the store's current length."""
    import torch

    torch.set_num_threads(1)
    from engram.cli.history import list_versions
    from engram.store import Store
    from engram.store.history import History
    from engram.training.policy import CommitPolicy

    model, optimizer = _small_model()
    cost = _Costs()
    with Store.open(path) as s:
        versions = len(s.versions())
    store_bytes = _du(Path(path))

    def resume() -> None:
        with Store.open(path, mode="w") as s:
            snapshot = s.load()
            model.load_state_dict(snapshot.model)
            optimizer.load_state_dict(snapshot.state["optimizer"])

    engram = Path(sys.executable).with_name("engram")
    cli = [str(engram)] if engram.exists() else [sys.executable, "-c", _CLI]
    ls = [*cli, "ls", path]
    resume(), subprocess.run(ls, check=True, stdout=subprocess.DEVNULL)  # warm, untimed
    for _ in range(rounds):
        cost("open + resume HEAD", resume)
        cost("engram ls (CLI process)", subprocess.run, ls, check=True, stdout=subprocess.DEVNULL)
    # The CLI's own peak (a child's ru_maxrss would count this process's pages at fork).
    ls_peak = subprocess.run([sys.executable, "-c", _CLI_PEAK, "ls", path], check=True,
                             capture_output=True, text=True).stderr.split()[-1]  # fmt: skip
    with Store.open(path, mode="w") as s:
        history = History(s.env)
        i = 10**6
        reference = Path(path).parent / "fsync-reference.bin"
        for _ in range(max(rounds, 9)):  # a commit is a few fsyncs: as noisy as the disk
            state = _step(model, optimizer, i)
            cost("commit", s.commit, state, model=model, meta=_meta(i, experience=0))
            cost(REFERENCE, _write_fsync, reference, 16 << 10)
            i += 1
        for _ in range(rounds):
            cost("ls: list_versions (in process)", list_versions, s, path)
            cost(f"ls: newest {LISTED} (History.survey(last=))", history.versions, last=LISTED)
            cost("store.versions() (the template's listing)", s.versions)
        policy = CommitPolicy(every_iterations=1)
        for r in range(rounds):  # the old way and the new, on identical experiences
            for how in ("full gc", "fence"):
                if how == "fence":
                    cost("policy.watch (one listing)", policy.watch, s)
                index = 10**6 + 2 * r + (how == "fence")
                for _ in range(MIDS):
                    meta = _meta(i, experience=index)
                    s.commit(_step(model, optimizer, i), model=model, meta=meta)
                    i += 1
                with s.env.read() as txn:
                    before = set(history.ids(txn))
                meta = _meta(i, "experience", index)
                s.commit(_step(model, optimizer, i), model=model, meta=meta)
                i += 1
                if how == "fence":
                    cost("prune: from the fence (now)", policy.prune, s, before, index)
                else:  # what CommitPolicy.prune did: list every version, then a full gc
                    cost("prune: full gc (before)", _full_prune, s, policy, before, index)
        for _ in range(rounds):
            cost("gc (full, nothing to drop)", s.gc)
        cost("compact: catch-up (once)", s.compact)
        for _ in range(10):
            s.commit(_step(model, optimizer, i), model=model, meta=_meta(i, experience=0))
            i += 1
        cost("compact after 10 commits", s.compact)
    out = cost.result()
    out["peak"]["engram ls (CLI process)"] = int(ls_peak)
    return {**out, "versions": versions, "store_bytes": store_bytes, "peak RSS": _peak_rss()}


def model_costs(params: int, rounds: int, root: str) -> dict:
    """A commit and a load of ``params`` weights and their momentum vs raw I/O."""
    import statistics

    import torch

    from engram.store import Store

    parts = 4  # a model is several tensors; each a quarter
    weights = {f"layer{k}.weight": torch.randn(params // parts) for k in range(parts)}
    momentum = {name: torch.randn_like(w) for name, w in weights.items()}
    nbytes = 2 * sum(w.numel() * 4 for w in weights.values())
    raw_path = Path(root) / "raw.bin"
    store_path = Path(root) / "store"

    def raw_write() -> None:
        raw_path.unlink(missing_ok=True)  # a new file, as each commit writes
        with open(raw_path, "wb") as f:
            for t in (*weights.values(), *momentum.values()):
                f.write(memoryview(t.numpy()).cast("B"))
            f.flush()
            os.fsync(f.fileno())

    def raw_read() -> None:
        with open(raw_path, "rb") as f:
            f.read()

    def change() -> None:  # nothing deduplicates: every byte is new
        with torch.no_grad():
            for t in (*weights.values(), *momentum.values()):
                t.add_(1.0)

    def load_touched() -> None:  # as a resume uses it: every page of every tensor read
        snapshot = s.load()
        for t in (*snapshot.model.values(), *snapshot.state["optimizer"]["momentum"].values()):
            t.reshape(-1)[::1024].sum()  # one element per 4 KiB page

    write, commit, read, load, touched, extra = [], [], [], [], [], []
    write_cpu, commit_cpu = [], []
    with Store.open(store_path, mode="c") as s:
        state = {"optimizer": {"momentum": momentum}}
        for _ in range(rounds):
            change()
            _prime(nbytes)
            cpu = time.process_time()
            write.append(_timed(raw_write))
            write_cpu.append(time.process_time() - cpu)
            change()
            _prime(nbytes)
            before, reset = _rss(), _reset_peak()
            cpu = time.process_time()
            commit.append(_timed(s.commit, state, model=weights, meta=_meta(0)))
            commit_cpu.append(time.process_time() - cpu)
            if reset:
                extra.append(_peak_rss() - before)
            read.append(_timed(raw_read))
            load.append(_timed(s.load))
            touched.append(_timed(load_touched))
            if len(s.versions()) > 2:
                s.gc(keep_last=1)
        change()  # one more commit, untimed: its anonymous memory, sampled
        with _AnonSampler() as anon:
            s.commit(state, model=weights, meta=_meta(0))
    med = statistics.median
    return {
        "params": params,
        "bytes": nbytes,
        "raw write+fsync": med(write),
        "commit": med(commit),
        "raw write+fsync CPU": med(write_cpu),
        "commit CPU": med(commit_cpu),
        "raw read": med(read),
        "load": med(load),
        "load, every page read": med(touched),
        "commit peak RSS": max(extra) if extra else None,
        "commit peak anonymous RSS": anon.peak,
    }


def _prime(nbytes: int) -> None:
    """Touch and free ``nbytes`` (and some) of memory just before a timed write.

    On this VM a page the kernel freed seconds ago is handed back to the hypervisor:
    writing 400 MB into such pages took 1.5-2.7 s, into pages freed a moment before
    0.1 s (a write's page cache needs new pages). Primed, a raw write and a commit
    measured after it both get pages freed a moment before, as on a machine without
    that effect; unprimed, whichever wrote second into recycled pages won.
    """
    import numpy as np

    np.ones(nbytes + (64 << 20), dtype=np.uint8)  # allocated, touched, freed


EXPERIENCE = 2048  # samples offered to a full buffer between its two commits
POLICIES = ("reservoir", "class_balanced")


def replay_costs(capacity: int, rounds: int, root: str) -> dict:
    """engram's replay buffer of ``capacity`` samples of 64 floats, per policy: filling
    it, admitting an experience's samples into it full, drawing minibatches, committing
    its change, restoring it in a new store handle; and the process's peak RSS."""
    import statistics

    import torch

    from engram.memory.replay import ReplayBuffer
    from engram.store import Store

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(capacity)

    def batch(n: int) -> tuple:
        return torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen)

    _reset_peak()  # (several sizes may run in one process)
    out: dict = {"capacity": capacity, "rss before": _rss()}
    for policy in POLICIES:
        path = Path(root) / policy
        anon = _AnonSampler._anon()
        with Store.open(path, mode="c") as s:
            buffer = ReplayBuffer(s, capacity, policy=policy, seed=0)
            start = time.perf_counter()
            while buffer.seen < capacity:  # minibatches of 1,000
                buffer.add(*batch(min(1000, capacity - buffer.seen)), experience=0)
            fill = (time.perf_counter() - start) / capacity
            s.commit({"replay": buffer.state_dict()}, meta=_meta(0, "experience", 0))
            start, admitted = time.perf_counter(), 0
            for _ in range(EXPERIENCE // 32):
                admitted += buffer.add(*batch(32), experience=1)
            admit = (time.perf_counter() - start) / EXPERIENCE
            draws = [_timed(buffer.sample, 128) for _ in range(max(rounds, 5) * 10)]
            start = time.perf_counter()
            version = s.commit({"replay": buffer.state_dict()}, meta=_meta(1, "experience", 1))
            commit = time.perf_counter() - start
            record = buffer._record_size()
            held = _AnonSampler._anon() - anon  # the buffer's own memory, not the map's

        def restore(path: Path = path, policy: str = policy) -> None:
            with Store.open(path, mode="w") as s:
                again = ReplayBuffer(s, capacity, policy=policy, seed=0)
                again.load_state_dict(s.load().state["replay"])
                again.sample(128)

        out[policy] = {
            "fill per sample": fill,
            "admission per sample": admit,
            "sample(128)": statistics.median(draws),
            "commit after an experience": commit,
            "commit: state bytes written": version.new_bytes,
            "commit: sample bytes it published": admitted * record,
            "restore": statistics.median(_timed(restore) for _ in range(rounds)),
            "anonymous memory it holds": held,
        }
    out["peak RSS"] = _peak_rss()
    return out


def stream_costs(n: int, root: str) -> dict:
    """A stream of ``n`` experiences (one class each, 16 training and 8 test samples of
    64 floats; a linear model): what each experience's end costs beside its training,
    timed around the template's own steps, and its TensorBoard writes as the runner
    makes them (engram.run.runner): the mean over the stream's last 5 experiences."""
    import statistics
    import warnings

    import torch

    import engram.metrics.tensorboard as board_module
    from engram.streams.digits import split_by_class
    from engram.training.template import DurableTemplate

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    y_train, y_test = torch.arange(n).repeat_interleave(16), torch.arange(n).repeat_interleave(8)
    tensors = (torch.randn(len(y_train), 64, generator=gen), y_train,
               torch.randn(len(y_test), 64, generator=gen), y_test)  # fmt: skip
    bench = split_by_class(tensors, n, n, False)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, n)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seconds: dict[str, list[float]] = {}

    def timed(key: str, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds.setdefault(key, []).append(time.perf_counter() - start)

        return run

    heatmap = board_module.heatmap
    board_module.heatmap = timed("of it the accuracy-matrix figure", heatmap)
    try:
        with DurableTemplate(model=model, optimizer=optimizer, store=Path(root) / "store",
                             train_mb_size=16, train_epochs=1) as t:  # fmt: skip
            t.train_experience = timed("training (the tiny model's)", t.train_experience)
            t.evaluate = timed("evaluation (every test experience)", t.evaluate)
            t.finish_experience = timed("commit, gate and prune", t.finish_experience)
            board = board_module.ForgettingWriter(Path(root) / "tb")
            write = timed("TensorBoard (scalars, figure)", board.experience)

            def report(index: int, row: list[float]) -> None:
                write(t.accuracy_matrix, t.last_commit_seconds, t.last_commit_bytes, None)

            t.fit(bench.train_stream, bench.test_stream, on_experience=report)
            board.close()
    finally:
        board_module.heatmap = heatmap
    seconds["evaluation (every test experience)"].pop(0)  # the untrained model's
    last = {k: statistics.mean(v[-5:]) for k, v in seconds.items()}
    last["evaluation per test experience"] = last["evaluation (every test experience)"] / n
    last["overhead (all but training)"] = sum(
        last[k] for k in ("evaluation (every test experience)", "commit, gate and prune",
                          "TensorBoard (scalars, figure)")
    )  # fmt: skip
    return {"experiences": n, "seconds": last}


class _AnonSampler:
    """The most this process's anonymous resident memory (``RssAnon``: not the file
    pages it maps) rose above its level at entry, sampled every millisecond."""

    def __init__(self) -> None:
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _anon() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._anon() - self._base)

    def __enter__(self) -> _AnonSampler:
        self._base = self._anon()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._anon() - self._base)


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM), where Linux lets us."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _du(path: Path) -> int:
    """Bytes the store's files take on disk (as allocated)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _ints(csv: str) -> list[int]:
    return [int(x) for x in csv.split(",")]


def _in(root: str, n: int, fn, *args) -> dict:
    """``fn(*args, directory)`` in a new directory of ``root`` for size ``n``."""
    directory = Path(root) / str(n)
    directory.mkdir()
    try:
        return fn(*args, str(directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _child(argv: list[str]) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    kind = argv[0]
    if kind == "build":
        build(argv[1], int(argv[2]))
        return
    if kind == "measure":
        result = measure(argv[1], int(argv[2]))
    elif kind == "replay":  # sizes: comma-separated, measured one after another
        result = [_in(argv[3], n, replay_costs, n, int(argv[2])) for n in _ints(argv[1])]
    elif kind == "stream":
        result = [_in(argv[2], n, stream_costs, n) for n in _ints(argv[1])]
    else:
        result = model_costs(int(argv[1]), int(argv[2]), argv[3])
    print(json.dumps(result), flush=True)


# ------------------------------------------------------------------ the report


def exponent(sizes: list[float], costs: list[float]) -> float:
    """Least-squares slope of log(cost) on log(size)."""
    xs = [math.log(s) for s in sizes]
    ys = [math.log(max(c, 1e-9)) for c in costs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def _python(*argv: str) -> str:
    out = subprocess.run([sys.executable, __file__, CHILD, *argv], capture_output=True,
                         text=True)  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"child {argv} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out.stdout


def _seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _plot(path: Path, lengths: list[int], history: list[dict], keys: list[str],
          models: list[dict]) -> bool:  # fmt: skip
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 6.5))
    colors = plt.cm.tab20.colors
    for n, key in enumerate(keys):
        style = "--" if "before" in key or "listing" in key else "-"
        left.loglog(lengths, [h["seconds"][key] for h in history], style, marker="o",
                    color=colors[n % len(colors)], label=key)  # fmt: skip
    left.set_xlabel("versions in the store")
    left.set_ylabel("seconds (median)")
    left.set_title("per-operation cost vs history length")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    left.grid(True, which="both", alpha=0.3)
    params = [m["params"] for m in models]
    for label, num, den in (("commit / raw write+fsync", "commit", "raw write+fsync"),
                            ("load, every page read / raw read", "load, every page read",
                             "raw read")):  # fmt: skip
        right.loglog(params, [m[num] / m[den] for m in models], marker="o", label=label)
    model_bytes = [m["bytes"] / 2 for m in models]
    if all(m["commit peak RSS"] is not None for m in models):
        right.loglog(params, [m["commit peak RSS"] / b for m, b in zip(models, model_bytes,
                     strict=True)], marker="s", label="commit peak RSS / model bytes")  # fmt: skip
    anon = [max(m["commit peak anonymous RSS"], 1) / b for m, b in zip(models, model_bytes,
            strict=True)]  # fmt: skip
    right.loglog(params, anon, marker="s", label="of it anonymous / model bytes")
    right.set_xlabel("model parameters")
    right.set_title("cost ratios vs model size")
    right.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import ROOT, command, emit, machine, parser, scratch, table

    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=None, help="default 3 (--quick: 1)")
    p.add_argument("--max-params", type=float, default=None,
                   help="largest model (default 1e8; --quick: 1e6)")  # fmt: skip
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write the log-log plot here (default docs/scaling.png; --quick: none)",
    )
    args = p.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    lengths = [10, 100] if args.quick else [10, 100, 1000, 10000]
    capacities = [10**3, 10**4] if args.quick else [10**3, 10**4, 10**5, 10**6]
    streams = [10, 20] if args.quick else [10, 30, 100]
    top = args.max_params or (1e6 if args.quick else 1e8)
    sizes = [n for n in (10**5, 10**6, 10**7, 10**8) if n <= top]
    plot = args.plot or (None if args.quick else ROOT / "docs" / "scaling.png")
    started = time.perf_counter()
    history, build_s = [], []
    with scratch("engram-scaling-") as root:
        store = str(root / "store")
        for n in lengths:
            build_s.append(_timed(_python, "build", store, str(n)))
            history.append(json.loads(_python("measure", store, str(rounds)).splitlines()[-1]))
        shutil.rmtree(store, ignore_errors=True)
        models = []
        for n in sizes:
            (root / "m").mkdir()
            models.append(json.loads(_python("model", str(n), str(rounds), str(root / "m"))))
            shutil.rmtree(root / "m")
        # a fresh process per size; --quick: one for all (each process imports torch)
        buffers, runs = [], []
        for group in [capacities] if args.quick else [[n] for n in capacities]:
            (root / "r").mkdir()
            sizes_arg = ",".join(map(str, group))
            buffers += json.loads(_python("replay", sizes_arg, str(rounds), str(root / "r")))
            shutil.rmtree(root / "r")
        for group in [streams] if args.quick else [[n] for n in streams]:
            (root / "s").mkdir()
            runs += json.loads(_python("stream", ",".join(map(str, group)), str(root / "s")))
            shutil.rmtree(root / "s")
    wall = time.perf_counter() - started

    keys = list(history[0]["seconds"])
    plotted = plot is not None and _plot(plot, lengths, history, keys, models)
    if plotted:
        figure = f"![log-log plot of the two axes]({os.path.relpath(plot, ROOT / 'docs')})"
    else:
        figure = "" if plot is None else "(No plot: matplotlib is not installed.)"
    extra = f" --rounds {args.rounds}" if args.rounds else ""
    extra += f" --max-params {args.max_params:.0e}" if args.max_params else ""
    per_version = history[-1]["store_bytes"] / history[-1]["versions"] / 1024
    history_table = table(
        ["operation", *(f"{n:,} versions" for n in lengths), "exponent", "largest / smallest"],
        _history_rows(lengths, history, keys),
    )
    memory_table = table(
        ["operation", *(f"{n:,} versions" for n in lengths), "exponent", "largest / smallest"],
        _memory_rows(lengths, history, keys),
    )
    model_table = table(
        ["parameters", "MiB committed", "commit / raw write+fsync", "load / raw read",
         "load, every page read / raw read", "commit peak RSS / model bytes",
         "of it anonymous / model bytes", "commit", "load", "commit CPU / raw write CPU"],
        _model_rows(models),
    )  # fmt: skip
    growth_table = table(
        ["cost", "exponent (vs parameters)", "largest / smallest"], _growth_rows(sizes, models)
    )
    replay_table = table(
        ["cost", *(f"{n:,} samples" for n in capacities), "exponent", "largest / smallest"],
        _replay_rows(capacities, buffers),
    )
    stream_table = table(
        ["cost per experience", *(f"{n} experiences" for n in streams), "exponent",
         "largest / smallest"],
        _stream_rows(streams, runs),
    )  # fmt: skip
    emit(
        args,
        f"""
## Scaling (issue 25)

Command ({dt.date.today().isoformat()}, commit {git_commit()}, {wall / 60:.1f} min in all):

```bash
{command(args, extra)}
```

Machine: {machine()}. Building the histories (filler commits without fsync) took
{", ".join(f"{b:.0f} s" for b in build_s)}.

**History length.** A store of mid-experience-style commits of an MLP 64-32-10 with SGD
momentum (~{per_version:.0f} KiB a version on disk: a pack and a checkpoint file), each
cost measured in a fresh process at that length, median of {rounds}. "prune" is one
experience's pruning of its {MIDS} mid-experience versions (the template's
`CommitPolicy.prune` after its experience commit): "full gc" is what it did before (list
every version, `store.gc(drop=...)`), "from the fence" what it does now after the
process's first prune (or `CommitPolicy.watch`). "exponent": slope of log(cost) on
log(length) over the lengths, 0 = flat, 1 = linear; "largest / smallest": the cost at the
longest history over the cost at the shortest.

{history_table}

Peak resident memory of each operation above the process's before it (MiB; the most over
the rounds; for `engram ls`, the whole CLI process's peak; "-": under 1 MiB at some
length, too small to fit):

{memory_table}

**Model size.** Weights and SGD momentum committed together (twice the model's bytes),
median of {rounds}; raw write+fsync and raw read (into new memory) of the same bytes in
the same round; ratios are of times: above 1x is slower than raw. `load` hands out the
weights memory-mapped (safetensors: pages read on first touch); "every page read" also
touches every page of every tensor, as applying them to a model does. "commit peak
RSS": the process's peak resident memory during the commit above its resident memory
before it (`VmHWM`), as a multiple of the model's bytes; "anonymous": the part that is
not mapped file pages (`RssAnon`, sampled every millisecond in one more commit).

{model_table}

{growth_table}

**Replay buffer.** engram's `ReplayBuffer` of N samples (64 float32 each, 10 classes) in
a store, per policy, in a fresh process per size: filled in minibatches of 1,000, then
one experience: {EXPERIENCE:,} samples offered in minibatches of 32 ("admission per
sample"), `sample(128)` (median of many), the commit of the buffer's change (the
samples it admitted go into the commit's transaction; "state bytes": what the version
wrote, its slot table), and a restore in a new store handle (open, load,
`load_state_dict`, the first minibatch; median of {rounds}); "anonymous memory": the
process's `RssAnon` with the buffer after its commit above its level before the store
opened (the buffer's own arrays, not the pages of the map).

{replay_table}

**Stream length.** A stream of N experiences (one class each, 16 training and 8 test
samples of 64 floats, a linear model, one epoch), fitted by `DurableTemplate` with
TensorBoard written as `engram-train` writes it; each cost is the mean over the
stream's last 5 experiences, timed around the template's own steps.

{stream_table}

{figure}
""",
    )


def _growth(lengths: list[int], costs: list[float]) -> list[str]:
    return [f"{exponent(lengths, costs):.2f}", f"{costs[-1] / max(costs[0], 1e-12):.2f}x"]


def _history_rows(lengths: list[int], history: list[dict], keys: list[str]) -> list[list]:
    rows = []
    for key in keys:
        costs = [h["seconds"][key] for h in history]
        rows.append([key, *(_seconds(c) for c in costs), *_growth(lengths, costs)])
        if key == REFERENCE:  # the commit as a ratio to the disk's latency of that moment
            ratio = [h["seconds"]["commit"] / h["seconds"][REFERENCE] for h in history]
            rows.append(["commit / reference", *(f"{r:.1f}x" for r in ratio),
                         *_growth(lengths, ratio)])  # fmt: skip
    for key, label in (
        ("store_bytes", "store bytes (MiB)"),
        ("peak RSS", "process peak RSS (MiB)"),
    ):
        costs = [h[key] for h in history]
        rows.append([label, *(f"{c / 2**20:.1f}" for c in costs), *_growth(lengths, costs)])
    return rows


def _memory_rows(lengths: list[int], history: list[dict], keys: list[str]) -> list[list]:
    rows = []
    for key in keys:
        if all(key in h["peak"] for h in history):
            peaks = [h["peak"][key] / 2**20 for h in history]
            # under 1 MiB the kernel's accounting (pages, allocator arenas) is the figure
            growth = _growth(lengths, peaks) if min(peaks) >= 1 else ["-", "-"]
            rows.append([key, *(f"{p:.1f}" for p in peaks), *growth])
    return rows


def _model_rows(models: list[dict]) -> list[list]:
    rows = []
    for m in models:
        rss, model_bytes = m["commit peak RSS"], m["bytes"] / 2
        rows.append([
            f"{m['params']:.0e}", f"{m['bytes'] / 2**20:.1f}",
            f"{m['commit'] / m['raw write+fsync']:.2f}x", f"{m['load'] / m['raw read']:.2f}x",
            f"{m['load, every page read'] / m['raw read']:.2f}x",
            "n/a" if rss is None else f"{rss / model_bytes:.2f}x",
            f"{m['commit peak anonymous RSS'] / model_bytes:.2f}x",
            _seconds(m["commit"]), _seconds(m["load"]),
            f"{m['commit CPU'] / max(m['raw write+fsync CPU'], 1e-9):.2f}x",
        ])  # fmt: skip
    return rows


def _replay_rows(capacities: list[int], buffers: list[dict]) -> list[list]:
    rows = []
    for policy in POLICIES:
        for key in buffers[0][policy]:
            values = [b[policy][key] for b in buffers]
            if "bytes" in key:
                shown = [f"{v / 1024:.1f} KiB" for v in values]
            elif "memory" in key:
                values = [max(v, 1) for v in values]  # (a fit needs no zero)
                shown = [f"{v / 2**20:.1f} MiB" for v in values]
            elif "per sample" in key:
                shown = [f"{v * 1e6:.1f} us" for v in values]
            else:
                shown = [_seconds(v) for v in values]
            rows.append([f"{policy}: {key}", *shown, *_growth(capacities, values)])
    rss = [max(b["peak RSS"] - b["rss before"], 1) for b in buffers]
    rows.append(["process peak RSS above its start, mapped pages too (MiB)",
                 *(f"{r / 2**20:.1f}" for r in rss),
                 *_growth(capacities, rss)])  # fmt: skip
    return rows


def _stream_rows(streams: list[int], runs: list[dict]) -> list[list]:
    rows = []
    for key in runs[0]["seconds"]:
        values = [r["seconds"][key] for r in runs]
        rows.append([key, *(_seconds(v) for v in values), *_growth(streams, values)])
    return rows


def _growth_rows(sizes: list[int], models: list[dict]) -> list[list]:
    rows = []
    for label, num, den in (
        ("commit / raw write+fsync", "commit", "raw write+fsync"),
        ("load / raw read", "load", "raw read"),
        ("load, every page read / raw read", "load, every page read", "raw read"),
        ("commit seconds", "commit", None),
        ("load seconds", "load", None),
    ):
        values = [m[num] / (m[den] if den else 1.0) for m in models]
        rows.append([label, f"{exponent(sizes, values):.2f}", f"{values[-1] / values[0]:.2f}x"])
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        _child(sys.argv[2:])
    else:
        main()
