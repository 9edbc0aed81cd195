"""An agent answers with the ``prod`` model while a trainer learns each new data file.

    python experiments/sklearn_agent.py demo --workdir /tmp/agent       # the whole story, ~45 s
    python experiments/sklearn_agent.py serve --store /tmp/agent/store  # JSON lines on stdin

``demo`` splits scikit-learn's digits into class-incremental ``.npz`` files (digits 0-1,
then 2-3, ...; ``--experiences N``) and lets them "arrive" one at a time: each is copied
into ``WORKDIR/stream`` and ``engram-train model=sgd_classifier strategy=replay
benchmark=files`` runs to completion in a subprocess; it trains just the new file and
moves the tag ``prod`` to the new version if it passes the regression gate. Meanwhile a
thread answers requests (held-out digits that no file holds, of all ten classes) with
``engram.ModelHandle(store, "prod")``, which picks up each promoted version within
``check_every`` seconds. At the end: requests answered and accuracy, per version.

``serve`` answers one JSON line per line of stdin: ``{"x": [64 floats]}`` gives
``{"label": 3, "version": "v0003"}``, a bad request ``{"error": "..."}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

import engram
from engram.errors import EngramError, StoreNotFoundError, VersionNotFoundError
from engram.signature import check_input

# Average accuracy over the digits seen so far; replay keeps SGD above ~0.88 on these files.
MIN_AVERAGE_ACCURACY = 0.8
# Until the first trainer has created the store and promoted a version (a store being
# created is StoreNotFoundError too: "being created").
NOT_YET = (StoreNotFoundError, VersionNotFoundError)


def write_files(root: Path, n: int) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Digits as ``n`` class-incremental files in ``root``, and held-out requests (x, y)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # (N, 64) in [0, 1]
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    n_requests = len(y) // 5
    requests, x, y = (x[:n_requests], y[:n_requests]), x[n_requests:], y[n_requests:]
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i, classes in enumerate(np.array_split(np.arange(10), n)):
        mine = np.flatnonzero(np.isin(y, classes))
        test, train = mine[: len(mine) // 4], mine[len(mine) // 4 :]  # the gate's test split
        path = root / f"{i:03d}-digits-{classes[0]}-{classes[-1]}.npz"
        np.savez(path, x=x[train], y=y[train], x_test=x[test], y_test=y[test])
        files.append(path)
    return files, *requests


def train(workdir: Path, min_accuracy: float) -> subprocess.CompletedProcess[str]:
    """One engram-train run over WORKDIR/stream: trains the files not yet trained."""
    command = [sys.executable, "-m", "engram.train", "model=sgd_classifier", "strategy=replay",
               "benchmark=files", f"benchmark.path={workdir / 'stream'}", "benchmark.n_classes=10",
               "gate.promote=prod", f"gate.min_average_accuracy={min_accuracy}",
               f"store.path={workdir / 'store'}", "logger.tensorboard=false"]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, check=False)


class Agent:
    """Answers requests with the model ``ref`` names, counting answers per version."""

    def __init__(self, store: Path, x: np.ndarray, y: np.ndarray, wait: float) -> None:
        self.store, self.x, self.y, self.wait = store, x, y, wait
        self.stats: dict[str, dict] = {}  # version name -> answered, correct, meta
        self.stop = threading.Event()
        self.error: str | None = None
        self.handle: engram.ModelHandle | None = None

    def connect(self) -> bool:
        """Wait until ``prod`` names a version (True) or ``stop`` is set (False)."""
        deadline, said = time.monotonic() + self.wait, None
        while not self.stop.is_set():
            try:
                self.handle = self.handle or engram.ModelHandle(self.store, "prod", check_every=0.2)
                self.handle.get()  # VersionNotFoundError until the first version passes the gate
                return True
            except NOT_YET as e:
                if type(e) is not said:
                    print(f"agent: no prod yet ({type(e).__name__}: {e}); waiting", flush=True)
                    said = type(e)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no prod version in {self.store} after {self.wait:.0f} s")
            time.sleep(0.2)
        return False

    def run(self) -> None:
        try:
            if self.connect():
                self.answer(self.handle)
        except Exception as e:  # reported by the main thread
            self.error = f"{type(e).__name__}: {e}"
        finally:
            if self.handle is not None:
                self.handle.close()

    def answer(self, handle: engram.ModelHandle) -> None:
        rng, current, reported = np.random.default_rng(1), None, time.monotonic()
        while not self.stop.is_set():
            i = int(rng.integers(len(self.y)))
            model, info = handle.get()
            x = self.x[i : i + 1]  # a batch of one request
            check_input(info.meta.get("signature"), x, what=info.name)
            s = self.stats.setdefault(info.name, {"answered": 0, "correct": 0, "meta": info.meta})
            s["answered"] += 1
            s["correct"] += int(model.predict(x)[0] == self.y[i])
            if info.name != current:
                print(f"agent: answering with prod = {info.name}", flush=True)
                current, reported = info.name, time.monotonic()
            elif time.monotonic() - reported > 2.0:
                print(f"agent: {info.name} answered {s['answered']} requests, running accuracy "
                      f"{s['correct'] / s['answered']:.3f}", flush=True)  # fmt: skip
                reported = time.monotonic()
            time.sleep(0.01)  # ~100 requests a second


def demo(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    stream, store = workdir / "stream", workdir / "store"
    if stream.exists() or store.exists():
        sys.exit(f"demo: {workdir} already holds a stream or a store; choose a new --workdir")
    files, x_requests, y_requests = write_files(workdir / "arrivals", args.experiences)
    stream.mkdir()
    agent = Agent(store, x_requests, y_requests, args.wait)
    thread = threading.Thread(target=agent.run, name="agent")
    thread.start()
    try:
        for file in files:
            shutil.copy(file, stream / file.name)
            print(f"data: {file.name} arrived; training it", flush=True)
            start = time.monotonic()
            done = train(workdir, args.min_accuracy)
            took = time.monotonic() - start
            for line in done.stdout.splitlines():
                if line.startswith("experience"):
                    print(f"trainer: {line} ({took:.1f} s)", flush=True)
            if done.returncode == 3:  # the gate rejected it: prod stays where it was
                print(f"trainer: {done.stderr.strip().splitlines()[-1]}", flush=True)
            elif done.returncode != 0:
                sys.exit(f"demo: engram-train exited {done.returncode}:\n{done.stderr[-3000:]}")
            if agent.error:
                break
            time.sleep(args.pause)  # requests keep coming between arrivals
    finally:
        agent.stop.set()
        thread.join()
    if agent.error:
        sys.exit(f"demo: agent: {agent.error}")
    summarize(agent, workdir)


def summarize(agent: Agent, workdir: Path) -> None:
    with engram.Store.open(workdir / "store") as store:  # the handle closed: one per process
        if "prod" not in store.tags():
            sys.exit("demo: no version passed the gate, so prod was never set")
        prod = store.info("prod")
    print("\nversion  experience  gate avg acc  requests  accuracy (all 10 digits)")
    for name, s in sorted(agent.stats.items()):
        gate_accuracy = s["meta"]["metrics"]["average_accuracy"]
        print(f"{name:<8} {s['meta']['experience']:>10} {gate_accuracy:>13.3f} "
              f"{s['answered']:>9} {s['correct'] / s['answered']:>9.3f}")  # fmt: skip
    print(f"prod = {prod.name}, gate {prod.meta['gate']}")
    summary = {name: {"requests": s["answered"], "accuracy": s["correct"] / s["answered"]}
               for name, s in agent.stats.items()}  # fmt: skip
    (workdir / "summary.json").write_text(json.dumps({"prod": prod.name, "versions": summary}))


def answer(handle: engram.ModelHandle, line: str) -> dict:
    """One request line's answer: the label and the version, or the error."""
    try:
        try:
            request = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON line ({e})") from None
        if not isinstance(request, dict) or "x" not in request:
            raise ValueError('a request is one JSON object {"x": [numbers]}')
        x = np.asarray(request["x"])[None]  # one sample: a batch of one
        model, info = handle.get()
        check_input(info.meta.get("signature"), x, what=f"{handle.ref} = {info.name}")
        return {"label": int(model.predict(x.astype(np.float32))[0]), "version": info.name}
    except (EngramError, ValueError, TypeError) as e:
        return {"error": str(e)}


def serve(args: argparse.Namespace) -> None:
    try:
        handle = engram.ModelHandle(args.store, args.tag, check_every=args.check_every)
    except EngramError as e:
        sys.exit(f"serve: {e}")
    with handle:
        for line in sys.stdin:
            if line.strip():
                print(json.dumps(answer(handle, line)), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="data arrives, a trainer promotes, the agent answers")
    run.add_argument("--workdir", required=True, help="a new directory for files and the store")
    run.add_argument("--experiences", type=int, default=5, help="files to split digits into")
    run.add_argument("--min-accuracy", type=float, default=MIN_AVERAGE_ACCURACY,
                     help="the gate's gate.min_average_accuracy")  # fmt: skip
    run.add_argument("--pause", type=float, default=0.5, help="seconds between two arrivals")
    run.add_argument("--wait", type=float, default=120.0, help="seconds to wait for prod")
    answers = commands.add_parser("serve", help="answer JSON lines on stdin")
    answers.add_argument("--store", required=True)
    answers.add_argument("--tag", default="prod", help="the ref to follow (a tag or HEAD)")
    answers.add_argument("--check-every", type=float, default=1.0, help="seconds between checks")
    args = parser.parse_args(argv)
    if args.command == "demo" and not 1 <= args.experiences <= 10:
        parser.error("--experiences must be 1..10 (there are ten digits)")
    if args.command == "demo":
        demo(args)
    else:
        serve(args)


if __name__ == "__main__":
    main()
