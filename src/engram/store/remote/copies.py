"""The local copies of remotes (:mod:`engram.store.remote.cache`): sharing one in a
process, taking turns across processes, and reclaiming their space.

Three rules keep a copy consistent however many processes and threads read it:

* **One environment per process.** LMDB allows a process one open environment per path,
  so every :class:`~engram.store.remote.cache.RemoteStore` on a copy in one process
  shares one (:func:`acquire`: a registry keyed by the copy's real path, counted). Their
  reads take the shared side of the copy's :class:`Gate`; a sync takes the exclusive
  side, closes the environment (the pull opens its own), and reopens it.
* **One sync at a time.** A sync (reading HEAD, pulling, remembering the lineage) runs
  under the exclusive flock ``<copy>.sync.lock``: two processes syncing one copy take
  turns, and neither pulls against a HEAD that the other has moved past meanwhile.
* **No pruning under a reader.** A process holding a copy open keeps a shared flock on
  ``<copy>.users.lock``; :func:`prune` takes it exclusively, without waiting, or refuses.

The lock files lie beside the copy, not in it: a directory a store is being created in
may hold only the store's own files.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from engram.errors import EngramError
from engram.store import Store
from engram.store import format as fmt
from engram.store.blobs import EncodedBlob, FileBlob, decode_entry
from engram.store.env import INITIAL_MAP_SIZE, Env
from engram.store.history import History
from engram.store.inspect import tree_arrays
from engram.store.packs import pack_name
from engram.store.remote.lineage import REMOTE_FILE, remembered

FILES = "remote-files.json"
# A holder waits this long for a prune of its copy to end (a prune deletes files: short)
HOLD_TIMEOUT_S = 60.0
_POLL_S = 0.05
T = TypeVar("T")


class CopyBusyError(EngramError):
    """A copy cannot be pruned now: another process holds it open, or syncs it."""


# ------------------------------------------------------------------ file locks


class FileLock:
    """An ``flock`` on a file beside a copy, shared or exclusive; the kernel drops it
    when its holder dies. A lock file removed by a prune while a process waited for it
    is not the one the next holder locks: the lock is taken again on the new file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, shared: bool = False, timeout: float = 0.0) -> bool:
        """Take the lock within ``timeout`` seconds; False if it stayed taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        while True:
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self.path, flags, 0o644)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return False
                time.sleep(_POLL_S)
                continue
            if _same_file(fd, self.path):
                self._fd = fd
                return True
            os.close(fd)  # removed (a prune) while we waited: lock the file there now

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def remove(self) -> None:
        """Delete the lock file while holding it (a pruned copy leaves none)."""
        self.path.unlink(missing_ok=True)

    @property
    def held(self) -> bool:
        return self._fd is not None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def sync_lock_path(copy: Path) -> Path:
    return copy.with_name(copy.name + ".sync.lock")


def users_lock_path(copy: Path) -> Path:
    return copy.with_name(copy.name + ".users.lock")


@contextmanager
def sync_lock(copy: Path, timeout: float) -> Iterator[None]:
    """The exclusive right to sync (or prune) ``copy``.

    Raises:
        CopyBusyError: another process held it for ``timeout`` seconds.
    """
    lock = FileLock(sync_lock_path(copy))
    if not lock.acquire(timeout=timeout):
        waited = f" (waited {timeout:g} s)" if timeout else ""
        raise CopyBusyError(
            f"the local copy {copy} is being synced or pruned by another process{waited}; "
            "run the command again once it is done"
        )
    try:
        yield
    finally:
        lock.release()


# ------------------------------------------------------------------ one environment


class Gate:
    """Reads share it, a sync has it alone. A thread that has it alone may read (the
    environment's own open reads), and a thread's exclusive request is not blocked by
    its own reads, so no thread waits for itself."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers: dict[int, int] = {}  # thread id -> reads it has open
        self._owner: int | None = None
        self._depth = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            while self._owner not in (None, me):
                self._cond.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._readers[me] -= 1
                if not self._readers[me]:
                    del self._readers[me]
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
            else:
                while self._owner is not None or any(t != me for t in self._readers):
                    self._cond.wait()
                self._owner = me
        try:
            yield
        finally:
            with self._cond:
                if self._depth:
                    self._depth -= 1
                else:
                    self._owner = None
                self._cond.notify_all()


class GatedEnv(Env):
    """A copy's read-only environment, shared by its stores in this process: each read
    transaction holds the gate's shared side, so a sync never closes it under one."""

    def __init__(self, path: Path, gate: Gate) -> None:
        self.gate = gate
        super().__init__(path, "r", INITIAL_MAP_SIZE)

    @contextmanager
    def read(self) -> Iterator[Any]:
        with self.gate.shared(), super().read() as txn:
            yield txn


class Shared:
    """A copy open in this process: its environment and how many stores use it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pid = os.getpid()
        self.gate = Gate()
        self.env: GatedEnv | None = None
        self.users = 0
        self._hold = FileLock(users_lock_path(path))

    def resync(self, do_sync: Callable[[], T]) -> T:
        """Run ``do_sync`` (a pull into the copy) with the environment closed, then
        (re)open it. If the sync fails, the environment is reopened still (the copy is
        as it was) and the sync's error is raised."""
        with self.gate.exclusive():
            if not self._hold.held and not self._hold.acquire(shared=True, timeout=HOLD_TIMEOUT_S):
                raise CopyBusyError(
                    f"the local copy {self.path} is being pruned by another process (for "
                    f"over {HOLD_TIMEOUT_S:g} s); run the command again once it is done"
                )
            if self.env is not None:
                self.env.close()  # the object stays: every store on the copy holds it
            try:
                result = do_sync()
            except BaseException:
                self._reopen(quiet=True)
                raise
            self._reopen(quiet=False)
            return result

    def _reopen(self, *, quiet: bool) -> None:
        try:
            if self.env is None:
                self.env = GatedEnv(self.path, self.gate)
                self.env.owner = self
            else:
                self.env.reopen()
        except EngramError:
            if not quiet:  # after a failed sync, its error says more (e.g. no copy yet)
                raise

    def release(self) -> None:
        """One store less; the last one closes the environment and lets prunes in."""
        with _REGISTRY:
            self.users -= 1
            if self.users > 0:
                return
            if _OPEN.get(self.path) is self:
                del _OPEN[self.path]
            with self.gate.exclusive():
                if self.env is not None:
                    self.env.close()
            self._hold.release()


_REGISTRY = threading.Lock()
_OPEN: dict[Path, Shared] = {}


def acquire(copy: Path) -> Shared:
    """The copy's :class:`Shared` in this process (counted: call its ``release``); not
    opened yet if it is new (its first ``resync`` opens it)."""
    real = Path(os.path.realpath(copy))
    with _REGISTRY:
        shared = _OPEN.get(real)
        if shared is None or shared.pid != os.getpid():  # (a forked child: not its own)
            shared = _OPEN[real] = Shared(real)
        shared.users += 1
        return shared


# ------------------------------------------------------------------ what a read needs


def needed_files(store: Store, vid: int, *, state: bool = True, model: bool = True) -> set[str]:
    """The files reading version ``vid`` (its state, its model) opens: its checkpoint
    or model file, and the packs (or checkpoint files) its chunks and their delta bases
    are in."""
    manifest = store.manifest(vid)
    names: set[str] = set()
    records = tree_arrays(manifest["state"]) if state else []
    if model:
        names |= {manifest[k]["file"] for k in ("checkpoint", "artifact") if manifest.get(k)}
        if manifest.get("model") is not None:  # compacted: its weights are blobs
            records += tree_arrays(manifest["model"]["tensors"])
    todo = [bytes.fromhex(digest) for _, r in records for digest, _, _ in r.chunks]
    seen: set[bytes] = set()
    with store.env.read() as txn:
        while todo:
            digest = todo.pop()
            if digest in seen:
                continue
            seen.add(digest)
            raw = store.env.get(txn, fmt.DB_BLOBS, digest)
            if raw is None:  # not indexed: the read itself reports it
                continue
            entry = decode_entry(raw, digest.hex())
            if isinstance(entry, FileBlob):
                names.add(entry.file)
                continue
            names.add(pack_name(entry.pack))
            if isinstance(entry, EncodedBlob) and entry.base is not None:
                todo.append(entry.base)
    return names


# ------------------------------------------------------------------ listing, pruning


@dataclass
class CopyInfo:
    """One copy on this machine (``engram cache ls --json``)."""

    path: str
    url: str | None
    bytes: int  # on disk
    versions: int
    head: int | None
    files: int  # fetched files (packs, checkpoints, model files)
    synced_at: str | None  # the last sync that reached the remote (UTC)
    in_use: bool  # held open by a process (or being pruned)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PruneReport:
    """What :func:`prune` removed (``engram cache prune --json``)."""

    path: str
    url: str | None
    removed_copy: bool
    files: list[str] = field(default_factory=list)
    freed_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def is_copy(path: Path) -> bool:
    """Whether ``path`` holds a copy (its first sync may have been cut short)."""
    return (path / fmt.LMDB_DIR).is_dir()


def copies_in(root: Path) -> list[Path]:
    """The copies under ``root`` (a cache directory), by name."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and is_copy(p))


def synced_at(copy: Path) -> str | None:
    """When a sync last reached the remote (it rewrites ``remote.json``), in UTC."""
    try:
        mtime = (copy / REMOTE_FILE).stat().st_mtime
    except FileNotFoundError:
        return None
    return _dt.datetime.fromtimestamp(mtime, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe(copy: Path) -> CopyInfo:
    """What ``copy`` holds, read-only (LMDB readers never wait for a sync)."""
    memory = remembered(copy)
    with _records(copy) as (env, history), env.read() as txn:
        versions, head = history.count(txn), history.head(txn)
    return CopyInfo(str(copy), memory.url if memory else None, _disk_bytes(copy), versions,
                    head, len(_fetched(copy)), synced_at(copy), _in_use(copy))  # fmt: skip


@contextmanager
def _records(copy: Path) -> Iterator[tuple[Env, History]]:
    """The copy's environment and history: this process's shared one if it holds the
    copy open (LMDB: one per process; counted meanwhile), else its own, closed after."""
    real = Path(os.path.realpath(copy))
    with _REGISTRY:
        shared = _OPEN.get(real)
        if shared is not None and shared.pid == os.getpid():
            shared.users += 1
        else:
            shared = None
    if shared is not None:
        try:
            with shared.gate.shared():  # a first sync in progress: wait for its env
                env = shared.env
            if env is not None:
                yield env, History(env)
                return
        finally:
            shared.release()
    env = Env(copy, "r", INITIAL_MAP_SIZE)
    try:
        yield env, History(env)
    finally:
        env.close()


def _in_use(copy: Path) -> bool:
    lock = FileLock(users_lock_path(copy))
    if lock.acquire(timeout=0):
        lock.release()
        return False
    return True


def prune(copy: Path, *, keep_last: int | None) -> PruneReport:
    """Remove ``copy`` (``keep_last=None``), or the fetched files that neither HEAD,
    a tagged version nor the ``keep_last`` newest versions need (each is fetched again
    when read; the records, small, stay).

    Raises:
        CopyBusyError: another process holds the copy open, or syncs it (nothing removed).
    """
    memory = remembered(copy)
    url = memory.url if memory else None
    with sync_lock(copy, timeout=0):
        users = FileLock(users_lock_path(copy))
        if not users.acquire(timeout=0):
            raise CopyBusyError(
                f"the local copy of {url or copy} is open in a process (a ModelHandle, "
                "load_model, engram show ...); stop it or wait, then prune again"
            )
        try:
            if keep_last is None:
                size = _disk_bytes(copy)
                shutil.rmtree(copy)
                users.remove()
                sync_lock_path(copy).unlink(missing_ok=True)
                return PruneReport(str(copy), url, True, freed_bytes=size)
            return _prune_files(copy, url, keep_last)
        finally:
            users.release()


def _prune_files(copy: Path, url: str | None, keep_last: int) -> PruneReport:
    with Store.open(copy) as store:
        ids = store.version_ids()
        keep = set(ids[-keep_last:] if keep_last else [])
        keep |= set(store.tags().values())
        head = store.inspect.head_id()
        if head is not None:
            keep.add(head)
        needed: set[str] = set()
        for vid in sorted(keep):
            needed |= needed_files(store, vid)
    report = PruneReport(str(copy), url, False)
    for path in _fetched(copy, leftovers=True):
        if path.name in needed:
            continue
        report.freed_bytes += _blocks(path)
        path.unlink()
        if not path.name.startswith("."):
            report.files.append(path.name)
    report.files.sort()
    return report


def _fetched(copy: Path, *, leftovers: bool = False) -> list[Path]:
    """The files fetched into the copy (and, with ``leftovers``, temporary files of
    fetches cut short)."""
    try:
        known = set(json.loads((copy / FILES).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        known = set()
    out = []
    for sub in (fmt.BLOB_DIR, fmt.CHECKPOINT_DIR):
        directory = copy / sub
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            ours = path.name in known or (leftovers and path.name.startswith(".tmp"))
            if ours and path.is_file() and not path.is_symlink():
                out.append(path)
    return out


def _disk_bytes(copy: Path) -> int:
    return sum(_blocks(p) for p in copy.rglob("*") if p.is_file() and not p.is_symlink())


def _blocks(path: Path) -> int:
    return os.stat(path, follow_symlinks=False).st_blocks * 512
