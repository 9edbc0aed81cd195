"""The remote beside a training run: catch up before it, push after each experience.

    report = catch_up(url, path)          # before the run opens its store: clone or fast-forward
    pusher = BackgroundPusher(store, url)  # once the run holds its store
    pusher.request()                      # after each experience's commit: returns at once
    pusher.finish()                       # at the end: the last push, bounded by a timeout

Why the pushes run in a worker process, not a thread of the run. LMDB allows one
environment per process, so a thread would read through the run's own; growing its map
(which a commit may do at any time) is only allowed while no transaction is open in the
process, and a push holds a read transaction while it uploads. A process has its own
read-only environment (the concurrency ``engram push`` already has with a running job),
and it can be killed when the run's final wait runs out: a push killed anywhere leaves
the remote at its previous version (docs/remote.md, "Why it is atomic"). The worker is
started once per run (importing torch costs seconds) and pushes one version per request.

The worker runs at a lower CPU priority (:data:`WORKER_NICENESS`): on a machine with few
cores, its hashing and requests would otherwise take CPU from the run's next commit and
training steps while a push is in flight (measured in benchmarks/remote.py, "Training
stall"). It only yields: with a core to spare, a push goes as fast as before.

What it pushes is the version the run asked for, not whatever HEAD is when the worker
gets to it: a mid-experience checkpoint committed meanwhile is pruned at the experience's
end (``store.keep_mid_experience=false``), and a remote whose HEAD names it could not
be fast-forwarded any more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import IO, Any

from engram.errors import (
    EngramError,
    NotAStoreError,
    RemoteConflictError,
    RemoteError,
    StoreNotFoundError,
)
from engram.store import Store, VersionInfo, version_name
from engram.store.remote.client import ObjectStore, check_url
from engram.store.remote.layout import STORE_KEY
from engram.store.remote.lineage import read_head, read_marker, remember, remembered, walk
from engram.store.remote.pull import PullReport, pull
from engram.store.remote.push import push, unpushed

# The end of a run waits this long for its last push; then the push is stopped (safe at
# any point) and the run says how far behind the remote is. One request is bounded by
# the client's retries (30 s); this leaves room for a few versions of a large state.
FINISH_TIMEOUT_S = 120.0
_EXIT_S = 10.0  # a worker told to exit (its stdin closed) gets this long, then is killed
# os.nice() of the worker (module docstring): 10 of 19, below training, above idle work
WORKER_NICENESS = 10
_WORKER = "from engram.store.remote.background import serve; serve()"


def catch_up(url: str, path: str | Path) -> PullReport | None:
    """Bring the store at ``path`` up to the remote's HEAD before a run opens it.

    A missing or empty store is cloned; a store the remote is ahead of is
    fast-forwarded. None: nothing to pull (the remote has no version yet, or its HEAD is
    in the store's history: the run pushes what it lacks). If the remote cannot be read,
    a store with versions trains on from them (a warning says so); a new store refuses
    (the run would start over what the remote may hold).

    Raises:
        RemoteConflictError: the store and the remote diverged, or hold two stores.
        RemoteError: the remote cannot be read, and the store is new.
    """
    path = Path(path).expanduser()
    local = _local_history(path)
    client = ObjectStore(url)
    try:
        got = client.get(STORE_KEY)
        head, _ = read_head(client)
        created_at = read_marker(client, head).created_at if head is not None else None
    except RemoteError as e:
        if local is None:
            raise type(e)(f"{e} (the store {path} is new: without the remote, the run "
                              "would start over what the remote may hold)") from None  # fmt: skip
        warnings.warn(f"{e} (the run trains on from {path}; its pushes retry)", stacklevel=2)
        return None
    if head is None:
        return None
    if local is None:
        return pull(url, path)
    store_id, history = local
    theirs = _store_id(got)
    if theirs != store_id:
        raise RemoteConflictError(
            f"remote {client.url} holds store {str(theirs)[:32]}, not the store at {path} "
            f"({store_id}); nothing was pulled or trained: give another store.remote, or a "
            "new store.path to continue from that remote"
        )
    if (head.version, created_at) in history:
        return None  # the store is at the remote's HEAD or ahead of it
    memory = remembered(path)
    cached = memory.lineage if memory is not None and memory.url == client.url else []
    lineage, _ = walk(client, head, cached)
    if history[0] in {(e.ref.version, e.created_at) for e in lineage}:
        return pull(url, path)  # the remote is ahead: a fast-forward
    raise RemoteConflictError(
        f"store {path} (HEAD {version_name(history[0][0])}) and its remote {client.url} (HEAD "
        f"{version_name(head.version)}) diverged: neither HEAD is in the other's history; "
        f"nothing was pulled or trained: continue from the remote with a new store.path, or "
        "push this store to another prefix with another store.remote"
    )


def _local_history(path: Path) -> tuple[str, list[tuple[int, str]]] | None:
    """The store's id and its HEAD's lineage as ``(id, created_at)``, HEAD first; None
    if there is no store or no version there."""
    try:
        store = Store.open(path)  # read-only, closed before pull or the run opens it
    except (StoreNotFoundError, NotAStoreError):
        return None
    with store:
        head = store.head
        if head is None:
            return None
        history: list[tuple[int, str]] = []
        vid: int | None = head.id
        while vid is not None and len(history) <= head.id:  # ids decrease: bounded
            manifest = store.manifest(vid)
            history.append((vid, manifest["created_at"]))
            vid = manifest["parent"]
        return store.store_id, history


def _store_id(got: Any) -> str | None:
    try:
        return str(json.loads(got.data)["store_id"]) if got is not None else None
    except (ValueError, KeyError, TypeError):
        return None


class BackgroundPusher:
    """Pushes a run's store to its remote after each experience, while training goes on.

    A failed push never touches a local commit: its error is kept, reported once as a
    warning (at the next request, or at :meth:`finish`), and the next push retries.
    Call :meth:`request` and :meth:`finish` from the thread that uses the store.
    """

    def __init__(
        self,
        store: Store,
        url: str,
        finish_timeout_s: float = FINISH_TIMEOUT_S,
        niceness: int = WORKER_NICENESS,
    ) -> None:
        self.store = store
        self.url = check_url(url)
        self.finish_timeout_s = finish_timeout_s
        self.niceness = niceness  # the worker's os.nice() (module docstring)
        memory = remembered(store.path)
        if memory is None or memory.url != self.url:
            # remembered now, so `engram push STORE` and "N versions behind" work even if
            # no push gets through during the run
            remember(store.path, self.url, [])
        self._wake = threading.Condition()
        self._wanted: int | None = None  # the version to push next
        self._closing = False
        self._stopping: str | None = None  # why no worker is started any more
        self._error: str | None = None  # the last push's failure (None: it succeeded)
        self._warned: str | None = None
        self._worker: subprocess.Popen[str] | None = None
        self._worker_log: IO[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="engram-push", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Push the store's HEAD (the version just committed) soon; returns at once."""
        self._warn_failure()
        head = self.store.head
        if head is None:
            return
        with self._wake:
            self._wanted = head.id  # a push not started yet is replaced by the newer one
            self._wake.notify()

    def finish(self, wait: bool = True) -> list[int] | None:
        """Push what the run committed last, waiting at most ``finish_timeout_s``
        (``wait=False``: stop now, as after an error), then stop the worker. Warns if the
        remote is behind; returns :func:`~engram.store.remote.unpushed` (``[]``: up to
        date)."""
        if wait and self._behind() != []:
            self.request()
        with self._wake:
            self._closing = True
            if not wait:
                self._wanted = None
            self._wake.notify()
        self._thread.join(self.finish_timeout_s if wait else 0)
        worker = self._stop_worker(
            f"did not finish within {self.finish_timeout_s:g} s" if wait else "ended with the run"
        )
        self._thread.join(_EXIT_S)
        if not self._thread.is_alive():  # the files it reads: closed once it has ended
            for pipe in (worker.stdin, worker.stdout) if worker is not None else ():
                if pipe is not None:
                    pipe.close()
            if self._worker_log is not None:
                self._worker_log.close()
        self._warn_failure()
        behind = self._behind()
        if behind:
            n = len(behind)
            warnings.warn(
                f"remote {self.url} is {n} version{'s' if n != 1 else ''} behind "
                f"{self.store.path}; run `engram push {self.store.path}`",
                stacklevel=2,
            )
        return behind

    def _behind(self) -> list[int] | None:
        try:
            return unpushed(self.store)
        except EngramError:  # a damaged manifest: `engram verify` says more than we can
            return None

    # ------------------------------------------------------------ the push thread

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._wanted is None and not self._closing:
                    self._wake.wait()  # bounded by finish(), which wakes it to end
                vid, self._wanted = self._wanted, None
            if vid is None:
                return
            try:
                error = self._push(vid)
            except Exception as e:  # kept and reported like a failed push, never lost
                error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            with self._wake:
                self._error = error

    def _push(self, vid: int) -> str | None:
        """One push by the worker; its error in one line (None: pushed)."""
        try:
            worker = self._started_worker()
            assert worker.stdin is not None and worker.stdout is not None
            worker.stdin.write(f"{vid}\n")
            worker.stdin.flush()
            line = worker.stdout.readline()  # until it replies, exits, or finish() kills it
        except OSError:  # it died before reading the request
            line = ""
        if not line:
            return self._worker_gone()
        try:
            reply = json.loads(line)
            return None if "head" in reply else str(reply["error"])
        except (ValueError, KeyError, TypeError):
            return f"the push worker replied {line.strip()[:80]!r}"

    def _started_worker(self) -> subprocess.Popen[str]:
        with self._wake:
            if self._stopping is not None:
                raise OSError("the pusher is stopped")
            if self._worker is None:
                if self._worker_log is not None:  # a worker that died: read already
                    self._worker_log.close()
                # its stderr, for the reason it died; open while it lives (closed by finish)
                self._worker_log = tempfile.TemporaryFile()  # noqa: SIM115
                argv = [str(self.store.path), self.url, str(self.niceness)]
                self._worker = subprocess.Popen(
                    [sys.executable, "-c", _WORKER, *argv],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=self._worker_log,
                    text=True,
                )
            return self._worker

    def _worker_gone(self) -> str:
        """The worker exited before replying: stopped by finish(), or it died."""
        with self._wake:
            worker, self._worker = self._worker, None
        if self._stopping is not None:
            return (f"the push to {self.url} {self._stopping} and was stopped (the remote "
                    "keeps its previous version)")  # fmt: skip
        try:
            code = worker.wait(_EXIT_S) if worker is not None else None
        except subprocess.TimeoutExpired:  # its output closed, the process lingers
            worker.kill()
            code = "killed"
        return f"the push worker exited with status {code}{self._worker_last_line()}"

    def _worker_last_line(self) -> str:
        log = self._worker_log
        if log is None:
            return ""
        log.seek(0)
        lines = log.read().decode(errors="replace").strip().splitlines()
        return f": {lines[-1][:200]}" if lines else ""

    def _stop_worker(self, why: str) -> subprocess.Popen[str] | None:
        """End the worker: ``why`` names a push it kills (one still in flight)."""
        with self._wake:
            self._stopping = why
            worker = self._worker
            in_flight = self._thread.is_alive()
        if worker is None:
            return None
        if in_flight:
            worker.kill()  # safe at any point of a push
        elif worker.stdin is not None:
            worker.stdin.close()  # idle: it exits at the end of its input
        try:
            worker.wait(_EXIT_S)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(_EXIT_S)
        return worker

    def _warn_failure(self) -> None:
        with self._wake:
            error = self._error
        if error is not None and error != self._warned:  # once per failure, not per retry
            warnings.warn(f"a background push failed (training goes on; the next push "
                          f"retries): {error}", stacklevel=3)  # fmt: skip
        self._warned = error


class _PinnedHead(Store):
    """A read-only store whose HEAD, as push sees it, is the version the run asked for."""

    pinned: VersionInfo | None = None

    @property
    def head(self) -> VersionInfo | None:
        return self.pinned


def serve(argv: list[str] | None = None) -> None:
    """The push worker: ``STORE URL [NICENESS]`` as arguments; a version id per line on
    stdin, one JSON reply per push on stdout (``{"head": ...}`` or ``{"error": "<one
    line>"}``). ``NICENESS``: added to the process's (module docstring)."""
    store_path, url, *rest = (sys.argv[1:] if argv is None else argv)[:3]
    if rest and int(rest[0]) and hasattr(os, "nice"):
        os.nice(int(rest[0]))
    replies, sys.stdout = sys.stdout, sys.stderr  # nothing else writes where replies go
    try:
        for line in sys.stdin:
            try:
                with _PinnedHead.open(store_path) as store:
                    store.pinned = store.info(int(line))
                    report = push(store, url)
                reply: dict[str, Any] = {"head": report.head, "pushed": report.pushed}
            except EngramError as e:
                reply = {"error": str(e)}
            except Exception as e:  # an OS fault reading the store: one line; the next retries
                reply = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            replies.write(json.dumps(reply) + "\n")
            replies.flush()
    finally:
        sys.stdout = replies
