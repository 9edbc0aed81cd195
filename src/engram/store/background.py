"""Commits that persist in a background thread while training continues.

    committer = BackgroundCommitter(store)
    committer.submit(state, model.state_dict(), message="step 100")  # returns at once
    ...                                   # training keeps mutating its tensors
    committer.submit(...)                 # waits for the previous commit first
    committer.close()                     # waits; raises if the last commit failed

What happens where:

* In the calling thread, :meth:`~BackgroundCommitter.submit` (1) waits for the commit
  in flight, if any (at most one is), and raises its error; (2) *stages* the state: every
  tensor and array is copied, containers are rebuilt, so training may keep mutating its
  optimizer moments, plugin tensors and weights in place; (3) flushes the store's pending
  replay samples, so every sample the staged state references is durable before any
  version can reference it.
* In the background thread, the staged copy goes through the ordinary
  :meth:`Store.commit <engram.store.Store.commit>`: chunks are hashed and appended to a
  pack, the checkpoint file is written and fsynced, and one LMDB transaction publishes the
  version. That transaction is the only thing that makes a version visible, so the
  all-or-nothing guarantee is the synchronous commit's: a crash (even SIGKILL) before it
  leaves the previous version as HEAD; files written before it are unreferenced and
  ``gc`` removes them.

Sharing one store between two threads. LMDB allows one environment per process, so both
threads use the store's. Each LMDB transaction begins and ends in one thread (the store
never hands a transaction across), so LMDB's own write lock serialises the two threads'
writes. Two things are not safe by themselves, and the committer takes care of them
while it is installed:

* the replay sample table's write-behind buffer is plain Python state: the committer puts
  a lock around the table (``store.samples``), so a background flush and the training
  thread's appends and reads never interleave;
* growing the LMDB map (``mdb_env_set_mapsize``) is only allowed while no transaction is
  open in the process: before a commit is submitted the map is given headroom, and while
  one is in flight, a sample append that could need more room waits for the commit
  first, so no growth happens while the other thread may hold a transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from engram.errors import CommitError, EngramError
from engram.faults import remedy
from engram.store.store import Store
from engram.store.values import VersionInfo

# Room kept free in the LMDB map while a commit is in flight (address space, not disk).
_HEADROOM = 256 << 20
_MIN_FREE = 128 << 20  # a sample append that could leave less waits for the commit


def stage(value: Any) -> Any:
    """A copy of a state tree that later in-place changes to the original cannot reach.

    Tensors are cloned (to CPU, detached; a :class:`~engram.store.SampleIds` stays one),
    numpy arrays copied, mappings, lists and tuples rebuilt; other values (str, numbers,
    None) are immutable and shared. Values the store cannot encode pass through as they
    are and are refused by the commit itself.
    """
    if isinstance(value, torch.Tensor):
        t = value.detach()
        return t.to("cpu", copy=True) if t.device.type != "cpu" else t.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, Mapping):
        return {k: stage(v) for k, v in value.items()}
    if isinstance(value, list):
        return [stage(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(stage(v) for v in value)
    return value


class _LockedSamples:
    """``store.samples`` behind a lock, shared by the training and the commit thread."""

    def __init__(self, table: Any, committer: BackgroundCommitter) -> None:
        self._table = table
        self._committer = committer
        self._lock = threading.RLock()

    def append(self, records: Sequence[bytes | memoryview]) -> list[int]:
        self._committer._wait_if_short_of_room(sum(len(r) for r in records) + 64 * len(records))
        with self._lock:
            return self._table.append(records)

    def flush(self) -> int:
        with self._lock:
            return self._table.flush()

    def read(self, ids: Any, record_size: int) -> np.ndarray:
        with self._lock:
            return self._table.read(ids, record_size)

    def __len__(self) -> int:
        with self._lock:
            return len(self._table)

    def __getattr__(self, name: str) -> Any:  # sweep, ... (used with no commit in flight)
        return getattr(self._table, name)


class BackgroundCommitter:
    """Runs :meth:`Store.commit` in a background thread, one commit at a time.

    Errors of a background commit are raised, as :class:`~engram.errors.CommitError`
    naming the commit, by the next :meth:`submit`, :meth:`wait` or :meth:`close`.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._result: VersionInfo | None = None
        self._message = ""
        self._closed = False
        self._table = store.samples
        store.samples = _LockedSamples(self._table, self)

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(
        self,
        state: Mapping[str, Any] | None,
        model_weights: Mapping[str, torch.Tensor] | None = None,
        *,
        message: str = "",
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Stage ``state`` and ``model_weights`` (copies) and commit them in the background.

        Waits for the previous commit first, and raises its error if it failed.
        """
        if self._closed:
            raise EngramError("the background committer is closed")
        self.wait()
        staged_state = stage(dict(state or {}))
        staged_model = None
        if model_weights is not None:
            if isinstance(model_weights, torch.nn.Module):
                model_weights = model_weights.state_dict()
            staged_model = {k: stage(v) for k, v in model_weights.items()}
        staged_meta = stage(dict(meta or {}))
        self.store.samples.flush()  # samples the staged state references become durable
        self._make_room()
        self._message = message
        self._thread = threading.Thread(
            target=self._run,
            args=(staged_state, staged_model, message, staged_meta),
            name="engram-commit",
        )
        self._thread.start()

    def _run(self, state: Any, model: Any, message: str, meta: Any) -> None:
        try:
            self._result = self.store.commit(state, model=model, message=message, meta=meta)
        except BaseException as e:  # surfaced in the caller's thread by wait()
            self._error = e

    def wait(self) -> VersionInfo | None:
        """Wait for the commit in flight; returns its version (None if there was none).

        Raises:
            CommitError: the background commit failed; HEAD is still the version before it.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return None
        thread.join()
        error, self._error = self._error, None
        result, self._result = self._result, None
        if error is not None:
            try:
                head = self.store.head
                where = f"HEAD is still {head.name if head is not None else '(empty)'}"
            except Exception:  # the store may be unusable after the failure
                where = "HEAD is the version before it"
            raise CommitError(
                f"the background commit {self._message!r} to {self.store.path} failed: "
                f"{type(error).__name__}: {error}. {where}; {remedy(error)}, then commit again"
            ) from error
        return result

    def close(self) -> None:
        """Wait for the commit in flight (raising its error) and give back ``store.samples``."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self.store.samples = self._table

    # ---------------------------------------------------------- LMDB map growth

    def _make_room(self) -> None:
        """Grow the map now (no commit in flight) so the next one need not grow it."""
        free = self.store.env.free_bytes()
        if free is not None and free < _HEADROOM:
            self.store.env.ensure_room(_HEADROOM)

    def _wait_if_short_of_room(self, nbytes: int) -> None:
        """Called by the training thread before a sample append: an append that might
        grow the map waits for the commit in flight (errors are left to the next wait)."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        free = self.store.env.free_bytes()
        if free is not None and free - 2 * (nbytes + self._table.pending_bytes) < _MIN_FREE:
            thread.join()


__all__ = ["BackgroundCommitter", "stage"]
