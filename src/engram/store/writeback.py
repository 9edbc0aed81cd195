"""Early writeback: the disk starts on a file's bytes while more of them are written.

Without it the disk gets a commit's bytes only at the ``fsync`` that ends each file,
after the hashing and copying that produce them, so the commit waits for the whole
write-out at the end. :class:`Writeback` asks Linux to start writing every few MiB as
they are written (``sync_file_range(2)`` with ``SYNC_FILE_RANGE_WRITE``: it queues the
I/O and waits for none of it); the disk then works while the CPU hashes, and the
``fsync`` — still what makes the bytes durable, and still called — waits for the last
few MiB. On this VM, 256 MiB written in 16 MiB steps with SHA-256 between them: the
final fsync 0.11 s -> 0.007 s, the whole 0.32 s -> 0.27 s. Where the call is missing
(not Linux) or refused (a file system without it) this does nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

STEP_BYTES = 8 << 20  # started this often: a pack's 16 MiB chunk each, a few I/Os
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>


class Writeback:
    """Starts the write-out of one file's bytes every :data:`STEP_BYTES` written."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._started = 0  # bytes before this offset have been handed to the disk

    def wrote(self, end: int) -> None:
        """The file's bytes up to ``end`` are written (its size, for an appended file)."""
        if end - self._started < STEP_BYTES:
            return
        start = _sync_file_range()
        if start is not None:
            start(self._fd, self._started, end - self._started, _SYNC_FILE_RANGE_WRITE)
        self._started = end


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    """libc's ``sync_file_range`` (it releases the GIL while it queues), or None."""
    import ctypes  # only where a file is written

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn
