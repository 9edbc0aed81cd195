"""The store's own files, opened without ever leaving the store directory.

A store directory may come from anywhere (a copy, a shared registry, a download), so
what is inside it is not trusted to be what the format says. Every write, truncation
and deletion the store makes goes through a name inside the store that is checked not
to be a symbolic link (``O_NOFOLLOW``, or a directory descriptor opened with it), and
every file it reads is checked to be a regular file before a byte is read: a FIFO
opened for reading blocks until a writer appears, so it is opened with ``O_NONBLOCK``
and refused. The store's *path* itself may be a link (``runs -> /data/runs``, the
user's own choice): only what is inside it must not escape.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from engram.errors import UnsafeStoreError
from engram.store import format as fmt

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_RESTORE = "remove it and restore the store from a copy"
# What must be a directory (d) or a regular file (f) when present: LMDB opens its two
# files by name (a link there would make even a reader write LMDB's lock table through
# it), gc deletes in blobs/ and checkpoints/, the writer lock truncates its file.
_LAYOUT = (
    (fmt.LMDB_DIR, "d"),
    (fmt.BLOB_DIR, "d"),
    (fmt.CHECKPOINT_DIR, "d"),
    (fmt.LOCK_FILE, "f"),
    (f"{fmt.LMDB_DIR}/data.mdb", "f"),
    (f"{fmt.LMDB_DIR}/lock.mdb", "f"),
)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a regular file"


def _unsafe(path: Path, kind: str, expected: str = "a regular file") -> UnsafeStoreError:
    return UnsafeStoreError(
        f"{path} is {kind}, not {expected}; engram never follows or opens that inside a "
        f"store (it could lead outside the store or block): {_RESTORE}"
    )


def check_layout(root: Path) -> None:
    """Refuse a store whose directories or LMDB files are links or of the wrong kind.

    One ``lstat`` per name; a missing name passes (a store being created lacks some).

    Raises:
        UnsafeStoreError: one of them is a symbolic link, a FIFO, a device, ...
    """
    for name, want in _LAYOUT:
        path = root / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        ok = stat.S_ISDIR(mode) if want == "d" else stat.S_ISREG(mode)
        if not ok:
            raise _unsafe(path, _kind(mode), "a directory" if want == "d" else "a regular file")


def open_regular(path: Path, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """``os.open`` of a regular file of the store: never through a symbolic link, never
    blocking on a FIFO. The descriptor returned is in blocking mode.

    Raises:
        FileNotFoundError: there is no such file (and ``flags`` has no ``O_CREAT``).
        UnsafeStoreError: it is a link or not a regular file.
    """
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise _unsafe(path, "a symbolic link") from None
        if e.errno == errno.ENXIO:  # a FIFO opened for writing with no reader
            raise _unsafe(path, "a FIFO") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _unsafe(path, _kind(st.st_mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_read(path: Path) -> BinaryIO:
    """``open(path, "rb")`` through :func:`open_regular`."""
    return os.fdopen(open_regular(path), "rb")


def create_new(path: Path) -> int:
    """A new, empty regular file at ``path`` for writing, replacing whatever the name
    was (a leftover of an interrupted write, or a planted link): the name is unlinked
    and created with ``O_EXCL``, so no link is followed and no other file's bytes (a
    hard link's) are truncated."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)


def open_dir(path: Path) -> int:
    """A descriptor of the store's directory ``path``, refused if it is a link (then
    names opened ``dir_fd=`` relative to it stay inside it).

    Raises:
        UnsafeStoreError: ``path`` is a symbolic link or not a directory.
    """
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _unsafe(path, _kind(os.lstat(path).st_mode), "a directory") from None
        raise


def unlink(name: str, directory: int) -> None:
    """Remove ``name`` (a link itself, never what it points at) from the directory open
    at descriptor ``directory``; already gone is fine (a concurrent gc)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=directory)
