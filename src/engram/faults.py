"""OS faults — a full disk, a read-only file system, a permission — and what to do about
them: the store's errors say the remedy (a failed commit), and ``engram`` and
``engram-train`` report such a fault (an ``OSError``, an ``lmdb.Error`` carrying an
errno, a safetensors I/O error) in one line naming the path and what to do, with exit
code 2 (:func:`describe`). Every store operation is all or nothing (docs/reliability.md,
"OS faults"), so the remedy is always: fix the cause, run the same command again. Any
other exception is a bug and keeps its traceback.

Imports nothing heavy: it only looks at modules already imported.
"""

from __future__ import annotations

import errno
import os
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
                   "give this user access to it (chmod/chown) or run as the owner"),
    errno.EPERM: ("operation not permitted",
                  "give this user access to it (chmod/chown) or run as the owner"),
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


_PATH_IN_TEXT = re.compile(r'at path "([^"]+)"')


def fault_path(exc: BaseException, default: str | os.PathLike[str]) -> str:
    """The file an OS fault names, else ``default`` (the store or output path)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return os.fsdecode(exc.filename)
    found = _PATH_IN_TEXT.search(str(exc))
    if found:
        return found.group(1)
    lmdb = sys.modules.get("lmdb")
    if lmdb is not None and isinstance(exc, lmdb.Error):
        what = getattr(exc, "what", "")  # a path (lmdb.open) or a function (mdb_txn_commit)
        if os.sep in what:
            return what
        from engram.store.format import LMDB_DIR  # imported already: lmdb is the store's

        environment = os.path.join(default, LMDB_DIR)
        if os.path.isdir(environment):
            return environment
    return os.fspath(default)


def describe(exc: BaseException, default_path: str | os.PathLike[str], retry: str) -> str | None:
    """One line for an OS fault: the path, what happened and what to do; None if ``exc``
    is not one (nor an engram error whose only fault is one, e.g. a store that "is not
    readable" because its files are read-only).

    Args:
        exc: the exception.
        default_path: named when the error names no file (a write to an open file).
        retry: how to try again, e.g. ``"run the command again"``.
    """
    code = fault_errno(exc)
    if code is None:
        return None
    path = fault_path(exc, default_path)
    reason = os.strerror(code) if code else str(exc)
    if code not in FAULTS:
        return f"{path}: {reason}; fix it, then {retry}"
    what, remedy = FAULTS[code]
    detail = "" if what.lower() == reason.lower() else f" ({reason})"
    verb = "cannot access" if code in (errno.EACCES, errno.EPERM) else "cannot write"
    return f"{verb} {path}: {what}{detail}; {remedy}, then {retry}"
