"""OS faults — a full disk, a read-only file system, a permission — as one-line errors.

``engram`` and ``engram-train`` report an I/O error of the operating system (an
``OSError``, an ``lmdb.Error`` carrying an errno, a safetensors I/O error) in one line
naming the path and what to do, with exit code 2. Every store operation is all or
nothing (docs/reliability.md, "OS faults"), so the remedy is always: fix the cause,
run the same command again. Any other exception is a bug and keeps its traceback.

Imports nothing heavy: :func:`describe` only looks at modules already imported.
"""

from __future__ import annotations

import errno
import os
import re
import sys

from engram.faults import FAULTS, fault_errno

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
