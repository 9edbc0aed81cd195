"""The single-writer lock of a store.

An ``flock`` on ``<store>/writer.lock``: the kernel releases it when the holder
dies, so a lock left by a crashed or killed process is reclaimed by the next
writer without any staleness heuristics. The file's text names the holder (pid,
host, start time) so the error a second writer gets says who to stop.
Local file systems only (as LMDB itself requires).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from engram.errors import StoreLockedError, UnsafeStoreError
from engram.store.files import open_regular


class WriterLock:
    """Exclusive, process-death-safe writer lock on one store directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, timeout: float = 0.0) -> None:
        """Take the lock, waiting up to ``timeout`` seconds.

        Raises:
            StoreLockedError: another live process holds it.
        """
        # Never through a link (it would truncate whatever it points at), and only a
        # file of its own: a hard link's other name would be truncated too.
        fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)
        if os.fstat(fd).st_nlink > 1:
            os.close(fd)
            raise UnsafeStoreError(
                f"{self.path} is a hard link to another file; engram truncates its writer "
                "lock, so it refuses one shared with another name: delete it (the next "
                "writer creates it again)"
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _describe_holder(fd)
                    os.close(fd)
                    store = self.path.parent
                    raise StoreLockedError(
                        f"store {store} is locked by {holder}; stop that run, or open the store "
                        "read-only, or wait for it (lock_timeout=SECONDS)"
                    ) from None
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:  # who holds it is advice for the next writer: a full disk must not leak fd
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        except OSError:
            os.close(fd)  # closing releases the flock too
            raise
        self._fd = fd

    def release(self) -> None:
        """Release the lock (the file stays: deleting it would race with the next writer)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing the descriptor drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        pid, host, since = info["pid"], info["host"], info["since"]
    except (ValueError, KeyError, TypeError, OSError):
        return "another process"
    me = " (this process)" if pid == os.getpid() and host == socket.gethostname() else ""
    return f"pid {pid}{me} on host {host} since {since}"
