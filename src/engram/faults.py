"""The errno of an OS fault and what to do about it: shared by the store's errors
(a failed commit says the remedy) and the command line's one-line fault reports.

Imports nothing heavy: :func:`fault_errno` only looks at modules already imported.
"""

from __future__ import annotations

import errno
import re
import sys

# errno -> (what happened, what to do); "write" faults name the path as "cannot write".
FAULTS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("disk full", "free space"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
    errno.EFBIG: ("disk full or file-size limit reached",
                  "free space or raise the file-size limit (ulimit -f)"),
    errno.EROFS: ("read-only file system", "remount it read-write or use a writable disk"),
    errno.EACCES: ("permission denied",
                   "give this user write access (chmod/chown) or run as the owner"),
    errno.EPERM: ("operation not permitted",
                  "give this user write access (chmod/chown) or run as the owner"),
    # LMDB reports a short write (a full disk, a file-size limit) as EIO
    errno.EIO: ("I/O error, often a full disk or a file-size limit",
                "check the disk and free space"),
}  # fmt: skip
OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # how Rust (safetensors) says errno


def fault_errno(exc: BaseException) -> int | None:
    """The errno of an OS I/O error (an ``OSError``, an ``lmdb.Error`` with an errno
    code, a safetensors I/O error), or None for any other exception."""
    if isinstance(exc, OSError):
        return exc.errno or 0  # 0: raised without one (e.g. "LMDB map still full")
    lmdb = sys.modules.get("lmdb")
    if lmdb is not None and isinstance(exc, lmdb.Error):
        code = getattr(exc, "code", 0)  # > 0: an errno; < 0: an LMDB code (a bug)
        return code if isinstance(code, int) and code > 0 else None
    if type(exc).__name__ == "SafetensorError":
        found = OS_ERROR_IN_TEXT.search(str(exc))
        return int(found.group(1)) if found else None
    return None


def remedy(exc: BaseException) -> str:
    """What to do about ``exc``: the errno's remedy, or a generic one."""
    code = fault_errno(exc)
    if code in FAULTS:
        return FAULTS[code][1]
    return "fix the error"
