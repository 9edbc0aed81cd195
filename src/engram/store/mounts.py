"""Which file system a store is on: LMDB must not be written on a network one.

LMDB's own documentation says not to use it on remote file systems: its lock table is
shared memory (``lock.mdb`` mapped by every process) and its pages are written through
a memory map, which NFS, SMB, Lustre, GPFS and FUSE mounts do not keep coherent between
machines (and some not even within one). A store written there can be corrupted
silently. So opening a store for writing there is refused: keep the store on a local
disk and share it through a remote (``store.remote=``, docs/remote.md). Reading is
allowed: a read-only open of a store nobody is writing is what a registry on a shared
mount needs.

The type is read from ``/proc/self/mounts`` (Linux): the mount whose point is the
longest prefix of the store's real path. Elsewhere nothing is known and nothing is
refused.
"""

from __future__ import annotations

import os
from pathlib import Path

MOUNTS = Path("/proc/self/mounts")
# file system types that are network or FUSE mounts (fuse.* covers sshfs, s3fs,
# gcsfuse, rclone, glusterfs ...)
NETWORK = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "9p",
    "afs", "beegfs", "davfs", "fuse", "fuseblk", "orangefs", "panfs", "pvfs2", "ncpfs",
})  # fmt: skip


def filesystem(path: str | os.PathLike[str], mounts: Path | None = None) -> tuple[str, str] | None:
    """(type, mount point) of the file system ``path`` is on (its nearest existing
    ancestor, for a store yet to be created), or None when it cannot be told."""
    where = Path(path).expanduser().absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        real = os.path.realpath(where)
        table = (mounts or MOUNTS).read_text()  # looked up now: a test's table
    except OSError:
        return None
    best: tuple[str, str] | None = None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")  # the table escapes spaces
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[1])):
            best = (fields[2], point)
    return best


def network_filesystem(
    path: str | os.PathLike[str], mounts: Path | None = None
) -> tuple[str, str] | None:
    """(type, mount point) if ``path`` is on a network or FUSE file system, else None."""
    found = filesystem(path, mounts)
    if found is None:
        return None
    kind = found[0]
    return found if kind in NETWORK or kind.startswith("fuse.") else None
