"""A store's LMDB environment: its directory, named databases, meta and transactions.

Every read and write of an LMDB value — manifests, refs, meta, replay samples, blob
index entries — goes through :meth:`Env.get`, :meth:`Env.items`, :meth:`Env.put` and
:meth:`Env.put_sorted`: the one place that turns a value into stored bytes and back.
In a format-3 store every value is *sealed* (:mod:`engram.store.records`): reads check
its checksum, so a damaged record is reported, never used; stores of formats 1 and 2
are read as they are until :meth:`Env.upgrade` seals them.

(A little over the ~400-line budget: every record access goes through this one class
so that sealing, map growth and the LMDB errno mapping cannot be bypassed.)
"""

from __future__ import annotations

import datetime as _dt
import errno
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from engram import __version__
from engram.errors import (
    CorruptionError,
    DamagedDatabaseError,
    EngramError,
    LockTableReplacedError,
    NotAStoreError,
    ReadOnlyStoreError,
    StoreFormatError,
    StoreNotFoundError,
)
from engram.store import format as fmt
from engram.store.files import check_layout
from engram.store.lock import WriterLock
from engram.store.meta import check_not_truncated
from engram.store.records import SEAL_BYTES, seal, unseal
from engram.store.values import Mode

INITIAL_MAP_SIZE = 1 << 30  # address space only: the file grows as pages are used
_MAX_GROWTHS = 24  # each at least doubles the map: 2**24 GiB is more than any disk
# A reader that cannot write LMDB's lock file (a registry shared read-only, a read-only
# mount) opens without it (docs/store.md, "Read-only stores").
_NO_LOCK_FILE = (errno.EACCES, errno.EPERM, errno.EROFS)
_LOCK_FILE = "lock.mdb"
# meta key whose presence (sealed, with this value) says every record is sealed
_SEALED_KEY, _SEALED_VALUE = b"records", b"sealed-xxh3-64"
# LMDB's codes for a damaged B-tree (not a full reader table, map or transaction)
_DAMAGE = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadTxnError, lmdb.InvalidError,
           lmdb.PanicError)  # fmt: skip


def now() -> str:
    """The current UTC time as the format writes it (ISO-8601, microseconds, ``Z``)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def prepare_directory(root: Path, mode: Mode, lock_timeout: float) -> WriterLock | None:
    """Check that ``root`` is a store (or, for ``mode="c"``, may become one), create
    what is missing, and take the writer lock unless ``mode="r"``.

    Raises:
        StoreNotFoundError, NotAStoreError, StoreLockedError.
        UnsafeStoreError: a directory or LMDB file inside ``root`` is a link (or a FIFO).
    """
    lmdb_dir = root / fmt.LMDB_DIR
    if root.exists() and not root.is_dir():
        raise NotAStoreError(f"{root} is a file, not an engram store directory")
    check_layout(root)  # before anything below creates, locks or lists through a link
    ours = {fmt.LMDB_DIR, fmt.BLOB_DIR, fmt.CHECKPOINT_DIR, fmt.LOCK_FILE}
    if not lmdb_dir.is_dir():
        if mode != "c":
            if not root.exists():
                raise StoreNotFoundError(f"no store at {root}; open it with mode='c' to create one")
            if mode == "r" and all(p.name in ours for p in root.iterdir()):
                raise StoreNotFoundError(  # a writer creating it, or a creation cut short
                    f"no store at {root} yet: it is being created (or its creation was cut "
                    "short); try again once the writer has opened it"
                )
            raise NotAStoreError(f"{root} is not an engram store (it has no {fmt.LMDB_DIR}/)")
        # Names of ours may be there: a creation cut short, or one racing with us
        # (the writer lock below then decides who proceeds).
        if root.exists() and any(p.name not in ours for p in root.iterdir()):
            raise NotAStoreError(
                f"{root} exists, is not empty and is not an engram store; "
                "choose a new or empty directory"
            )
        root.mkdir(parents=True, exist_ok=True)
        lmdb_dir.mkdir(exist_ok=True)
    if mode == "r":
        return None
    lock = WriterLock(root / fmt.LOCK_FILE)
    lock.acquire(lock_timeout)
    for sub in (fmt.CHECKPOINT_DIR, fmt.BLOB_DIR):  # a creation cut short lacks them
        (root / sub).mkdir(exist_ok=True)
    return lock


class Env:
    """The LMDB environment of the store at ``path``, opened for ``mode``.

    Not thread-safe by itself and unusable after ``fork()`` (:meth:`checked` refuses).
    """

    def __init__(self, path: Path, mode: Mode, map_size: int) -> None:
        self.path = path
        self.mode = mode
        self.pid = os.getpid()
        self.store_id = ""
        self.dbs: dict[bytes, Any] = {}
        self.sealed = False  # every record carries a checksum (format 3)
        self.format_version = 0
        # Whoever closes this environment when it is collected (the Store): referenced
        # here so that what it hands out over the environment (its sample table, ...)
        # keeps it, and so the environment, open.
        self.owner: object | None = None
        self._map_size = map_size
        self._lmdb: lmdb.Environment | None = None
        # (st_dev, st_ino) of the lock.mdb LMDB registered this process's readers in;
        # None when opened without one (read-only registries)
        self._lock_file_id: tuple[int, int] | None = None
        self._lock_path = str(path / fmt.LMDB_DIR / _LOCK_FILE)  # a str: stat'd per read
        self._reading = 0  # read transactions open (the environment is reopened at 0 only)
        # What LMDB said when this process last met a damaged page (None: never): no
        # write after that, so that nothing is built on a damaged tree.
        self.damage: str | None = None
        self._open()

    # ------------------------------------------------------------------ opening

    def _open(self) -> None:
        # LMDB opens data.mdb and lock.mdb by name, read-write even for a reader: never
        # through a link. Then, before LMDB maps the file: a truncated data.mdb would be
        # a SIGBUS, not an error.
        check_layout(self.path)
        check_not_truncated(self.path / fmt.LMDB_DIR)
        writable = self.mode != "r"
        try:
            try:
                self._lmdb = self._lmdb_open(writable, lock=True)
            except lmdb.Error as e:
                if writable or getattr(e, "code", 0) not in _NO_LOCK_FILE:
                    raise
                # A reader that may not write the lock file reads without it: LMDB's
                # lock-free read-only mode (what it gives up: docs/store.md).
                self._lmdb = self._lmdb_open(writable, lock=False)
            self._lock_file_id = self._lock_file() if self._lmdb.flags()["lock"] else None
        except lmdb.Error as e:
            if "already open in this process" in str(e):
                raise EngramError(
                    f"store {self.path} is already open in this process (LMDB allows one "
                    "handle per process); use that Store object, or read from another process"
                ) from None
            if not writable and getattr(e, "code", 0) == errno.ENOENT:  # no data.mdb yet
                raise self._being_created() from None
            raise _os_fault(e, self.path) or NotAStoreError(
                f"{self.path} is not a readable engram store: {e}"
            ) from e
        try:
            if writable:
                self._lmdb.reader_check()  # clear reader slots of dead processes
                with self._lmdb.begin(write=True) as txn:
                    self.dbs = {n: self._lmdb.open_db(n, txn=txn, create=True) for n in fmt.ALL_DBS}
                    if txn.get(b"format_version", db=self.dbs[fmt.DB_META]) is None:
                        self._init_meta(txn)
            else:
                # py-lmdb opens (and commits) its own read transaction here; a handle
                # opened inside ours would die with it.
                for _ in range(_MAX_GROWTHS):
                    try:
                        self.dbs = {n: self._lmdb.open_db(n, create=False) for n in fmt.ALL_DBS}
                        break
                    except lmdb.MapResizedError:  # a writer grew the map meanwhile
                        self._lmdb.set_mapsize(0)
                    except lmdb.NotFoundError:
                        names = self._named_dbs()
                        if not names <= set(fmt.ALL_DBS):
                            raise  # someone else's environment
                        if names != set(fmt.ALL_DBS):  # the creating transaction is not in
                            raise self._being_created() from None
                        # it committed between our opens: open again
            with self.read() as txn:
                self.sealed = self._is_sealed(txn)
                self._check_meta(txn)
        except lmdb.NotFoundError as e:  # no named database of ours: a foreign environment
            self._lmdb.close()
            raise NotAStoreError(f"{self.path} is not a valid engram store: {e}") from e
        except lmdb.Error as e:
            self._lmdb.close()
            raise _os_fault(e, self.path) or self._damaged(e) from e
        except BaseException:
            self._lmdb.close()
            raise

    def _lmdb_open(self, writable: bool, *, lock: bool) -> lmdb.Environment:
        return lmdb.open(
            str(self.path / fmt.LMDB_DIR),
            subdir=True,
            readonly=not writable,
            create=writable,
            lock=lock,
            map_size=self._map_size,
            max_dbs=8,
            meminit=False,
            max_readers=1024,
        )

    def _lock_file(self) -> tuple[int, int] | None:
        """(st_dev, st_ino) of the lock file now at ``memory.lmdb/lock.mdb`` (None: none)."""
        try:
            st = os.stat(self._lock_path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _lock_file_replaced(self) -> bool:
        """Whether lock.mdb was deleted or replaced since LMDB opened it. A writer opening
        the store afterwards makes a new lock table that lacks this process's readers, so
        it reuses pages they still read: what they read is garbage, not corruption."""
        return self._lock_file_id is not None and self._lock_file() != self._lock_file_id

    def _damaged(self, e: lmdb.Error) -> DamagedDatabaseError:
        if isinstance(e, _DAMAGE):
            self.damage = str(e)
        return DamagedDatabaseError(
            f"store {self.path} is damaged: LMDB reports {e}; run `engram verify "
            f"--untrusted {self.path}` to see what is affected, and restore the store from "
            "a copy"
        )

    def _named_dbs(self) -> set[bytes]:
        """The names of the environment's named databases (its main database's keys)."""
        with self._lmdb.begin() as txn, txn.cursor() as cur:
            return {bytes(k) for k in cur.iternext(values=False)}

    def _being_created(self) -> StoreNotFoundError:
        """What a reader gets between a writer making ``memory.lmdb/`` and committing the
        store's first transaction: no store yet (not "not a store")."""
        return StoreNotFoundError(
            f"no store at {self.path} yet: it is being created (or its creation was cut "
            "short); try again once the writer has opened it"
        )

    def _init_meta(self, txn: lmdb.Transaction) -> None:
        self.sealed = True  # a new store seals every record it ever writes
        self.put(txn, fmt.DB_META, _SEALED_KEY, _SEALED_VALUE)
        # the oldest format describing it (raised to 4 by its first artifact commit)
        self.put(txn, fmt.DB_META, b"format_version", str(fmt.SEALED_FORMAT_VERSION).encode())
        self.put(txn, fmt.DB_META, b"store_id", uuid.uuid4().hex.encode())
        self.put(txn, fmt.DB_META, b"created_at", now().encode())
        self.put(txn, fmt.DB_META, b"next_version", b"1")
        self.put(txn, fmt.DB_META, b"next_pack", b"1")

    def _is_sealed(self, txn: lmdb.Transaction) -> bool:
        raw = txn.get(_SEALED_KEY, db=self.dbs[fmt.DB_META])
        if raw is None:
            return False
        if bytes(unseal(fmt.DB_META, _SEALED_KEY, raw)) != _SEALED_VALUE:
            raise StoreFormatError(f"{self.path}: unknown record sealing {bytes(raw)[:32]!r}")
        return True

    def _check_meta(self, txn: lmdb.Transaction) -> None:
        raw = self.get(txn, fmt.DB_META, b"format_version")
        try:
            version = int(bytes(raw).decode("ascii"))
            self.format_version = version
            self.store_id = bytes(self.get(txn, fmt.DB_META, b"store_id")).decode("ascii")
            self.counter(txn, b"next_version")
            self.counter(txn, b"next_pack")  # both must be there: no default
        except (TypeError, ValueError, UnicodeDecodeError) as e:
            raise StoreFormatError(f"{self.path} has malformed store metadata ({e})") from None
        if self.sealed != (version >= fmt.SEALED_FORMAT_VERSION):
            raise StoreFormatError(
                f"{self.path} has malformed store metadata (format version {version}, but its "
                f"records are {'' if self.sealed else 'not '}sealed)"
            )
        if version > fmt.FORMAT_VERSION:
            raise StoreFormatError(
                f"store {self.path} was written in format version {version}, newer than the "
                f"{fmt.FORMAT_VERSION} this engram {__version__} reads; upgrade engram"
            )

    def reopen(self) -> None:
        """Close and open the environment again (after a failed write LMDB's may be
        unusable)."""
        if self._lmdb is not None:
            self._lmdb.close()
        try:
            self._open()
        except BaseException:
            self._lmdb = None  # closed, not half-open: checked() says so
            raise

    def close(self) -> None:
        if self._lmdb is not None:
            self._lmdb.close()
            self._lmdb = None

    @property
    def is_open(self) -> bool:
        return self._lmdb is not None

    # ------------------------------------------------------------ transactions

    def checked(self) -> lmdb.Environment:
        """The environment, if this process may use it: not closed, not forked."""
        if self._lmdb is None:
            raise EngramError(f"store {self.path} is closed")
        if os.getpid() != self.pid:
            raise EngramError(
                f"store {self.path} was opened in process {self.pid} and cannot be used after "
                "fork(); open it again in the child process"
            )
        return self._lmdb

    def check_writable(self) -> None:
        self.checked()
        if self.mode == "r":
            raise ReadOnlyStoreError(f"store {self.path} was opened read-only; use mode='w'")

    def last_txnid(self) -> int:
        """The id of the last committed write transaction (by any process)."""
        return self.checked().info()["last_txnid"]

    @contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read transaction. LMDB errors in it are :class:`DamagedDatabaseError` (or
        the ``OSError`` they carry); a lost lock table is :class:`LockTableReplacedError`."""
        env = self._current_lock_table()
        try:
            try:
                txn = env.begin(buffers=True)
            except lmdb.MapResizedError:  # another process grew the map: adopt its size
                env.set_mapsize(0)
                txn = env.begin(buffers=True)
        except lmdb.Error as e:
            raise _os_fault(e, self.path) or self._damaged(e) from e
        self._reading += 1
        try:
            yield txn
        except (lmdb.Error, CorruptionError) as e:
            if self._lock_file_replaced():  # the next read reopens the environment
                raise LockTableReplacedError(
                    f"store {self.path}: memory.lmdb/{_LOCK_FILE} was deleted or replaced while "
                    "this read ran, so a writer may have reused the pages it read (not "
                    "corruption); run it again (the store is reopened first)"
                ) from None
            if isinstance(e, lmdb.Error):
                raise _os_fault(e, self.path) or self._damaged(e) from e
            raise
        finally:
            txn.abort()
            self._reading -= 1

    def _current_lock_table(self) -> lmdb.Environment:
        """The environment, reopened first if its lock file was deleted or replaced
        (one ``stat``): transactions then register where the writer looks."""
        env = self.checked()
        if self._reading == 0 and self._lock_file_replaced():
            self.reopen()
            env = self.checked()
        return env

    def write(self, work: Callable[[lmdb.Transaction], Any], reserve: int = 0) -> Any:
        """Run ``work`` in one write transaction, growing the map until it fits.

        ``work`` must be safe to re-run: it is retried from scratch after a MapFullError.

        Raises:
            DamagedDatabaseError: LMDB met a damaged page in this transaction (which is
                then aborted: nothing of it is written), or in an earlier one of this
                process (then no transaction starts).
        """
        self.check_writable()
        if self.damage is not None:
            raise DamagedDatabaseError(
                f"store {self.path} is damaged (LMDB reported {self.damage}); refusing to "
                f"write to it: run `engram verify --untrusted {self.path}` to see what is "
                "affected, and restore the store from a copy"
            )
        env = self._current_lock_table()
        self.ensure_room(reserve)
        for _ in range(_MAX_GROWTHS):
            try:
                with env.begin(write=True) as txn:
                    return work(txn)
            except lmdb.MapFullError:
                self._grow(env, max(reserve, env.info()["map_size"]))
            except lmdb.MapResizedError:
                env.set_mapsize(0)
            except lmdb.Error as e:
                if _os_fault(e, self.path) is not None:
                    raise  # a full disk, EIO...: engram.faults names the remedy
                raise self._damaged(e) from e
        raise OSError(f"LMDB map of {self.path} still full after {_MAX_GROWTHS} growths")

    def ensure_room(self, reserve: int) -> None:
        """Grow the map now if a write of ``reserve`` bytes might not fit.

        Only call it while this process holds no transaction (LMDB's rule for growing).
        """
        env = self.checked()
        info = env.info()
        used = (info["last_pgno"] + 1) * env.stat()["psize"]
        if used + reserve * 1.25 + (16 << 20) > info["map_size"]:
            self._grow(env, reserve)

    def free_bytes(self) -> int | None:
        """Bytes of the map not yet used (None once closed)."""
        if self._lmdb is None:
            return None
        info = self._lmdb.info()
        return info["map_size"] - (info["last_pgno"] + 1) * self._lmdb.stat()["psize"]

    def _grow(self, env: lmdb.Environment, extra: int) -> None:
        info = env.info()
        used = (info["last_pgno"] + 1) * env.stat()["psize"]
        target = max(2 * info["map_size"], used + int(extra * 1.5) + (64 << 20))
        env.set_mapsize(-(-target // (1 << 20)) * (1 << 20))

    # ------------------------------------------------------------------ records

    def get(self, txn: lmdb.Transaction, db: bytes, key: bytes) -> memoryview | None:
        """The value of ``key`` in database ``db`` (a zero-copy view), or None.

        Raises:
            CorruptionError: the record fails its checksum (sealed stores).
        """
        raw = txn.get(key, db=self.dbs[db])
        if raw is None or not self.sealed:
            return raw
        return unseal(db, key, raw)

    def put(self, txn: lmdb.Transaction, db: bytes, key: bytes, value: bytes) -> None:
        txn.put(key, seal(db, key, value) if self.sealed else value, db=self.dbs[db])

    def put_sorted(
        self, txn: lmdb.Transaction, db: bytes, items: Iterable[tuple[bytes, bytes]]
    ) -> None:
        """Append ``(key, value)`` items whose keys are ascending and after every key
        in ``db`` (LMDB's fast append)."""
        if self.sealed:
            items = ((key, seal(db, key, value)) for key, value in items)
        with txn.cursor(db=self.dbs[db]) as cur:
            cur.putmulti(items, append=True)

    def delete(self, txn: lmdb.Transaction, db: bytes, key: bytes) -> bool:
        """Remove ``key``; whether it was there."""
        return txn.delete(key, db=self.dbs[db])

    def items(
        self, txn: lmdb.Transaction, db: bytes, *, skip_damaged: bool = False
    ) -> Iterator[tuple[bytes, memoryview]]:
        """Every ``(key, value)`` of ``db``, in key order (checked, in sealed stores; with
        ``skip_damaged``, a record failing its checksum is left out instead of raising —
        for verify, which reports those through :meth:`damaged_records`)."""
        with txn.cursor(db=self.dbs[db]) as cur:
            for key, value in cur:
                key = bytes(key)
                if not self.sealed:
                    yield key, value
                    continue
                try:
                    payload = unseal(db, key, value)
                except CorruptionError:
                    if skip_damaged:
                        continue
                    raise
                yield key, payload

    def damaged_records(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, bytes, str]]:
        """``(db, key, problem)`` of every record that fails its checksum (verify --all)."""
        if not self.sealed:
            return
        for db in fmt.ALL_DBS:
            with txn.cursor(db=self.dbs[db]) as cur:
                for key, value in cur:
                    try:
                        unseal(db, bytes(key), value)
                    except CorruptionError as e:
                        yield db, bytes(key), str(e)

    def upgrade(self) -> int:
        """Seal every record of a format-1/2 store, in one transaction; returns how many
        (0: already sealed). The store says format 3 afterwards."""
        if self.sealed:
            return 0
        self.check_writable()
        with self.read() as txn:
            records = {db: [(bytes(k), bytes(v)) for k, v in self.items(txn, db)]
                       for db in fmt.ALL_DBS}  # fmt: skip
        count = sum(len(r) for r in records.values())
        size = sum(len(k) + len(v) + SEAL_BYTES for r in records.values() for k, v in r)

        def seal_all(txn: lmdb.Transaction) -> None:
            for db, items in records.items():
                for key, value in items:
                    txn.put(key, seal(db, key, value), db=self.dbs[db])
            txn.put(_SEALED_KEY, seal(fmt.DB_META, _SEALED_KEY, _SEALED_VALUE),
                    db=self.dbs[fmt.DB_META])  # fmt: skip
            version = str(fmt.SEALED_FORMAT_VERSION).encode()  # unsealed: no artifacts
            txn.put(b"format_version", seal(fmt.DB_META, b"format_version", version),
                    db=self.dbs[fmt.DB_META])  # fmt: skip

        self.write(seal_all, reserve=2 * size)
        self.sealed, self.format_version = True, fmt.SEALED_FORMAT_VERSION
        return count

    def raise_format(self, txn: lmdb.Transaction, at_least: int) -> None:
        """Record that the store now holds what format ``at_least`` describes."""
        if self.format_version < at_least:
            self.put(txn, fmt.DB_META, b"format_version", str(at_least).encode())
            self.format_version = at_least

    def keys(self, txn: lmdb.Transaction, db: bytes, prefix: bytes = b"") -> Iterator[bytes]:
        """The keys of ``db`` that start with ``prefix``, in order."""
        with txn.cursor(db=self.dbs[db]) as cur:
            if not (cur.set_range(prefix) if prefix else cur.first()):
                return
            for key in cur.iternext(values=False):
                key = bytes(key)
                if not key.startswith(prefix):
                    return
                yield key

    def count(self, txn: lmdb.Transaction, db: bytes) -> int:
        return txn.stat(self.dbs[db])["entries"]

    def counter(self, txn: lmdb.Transaction, name: bytes, default: int | None = None) -> int:
        """A meta counter (``next_version``, ``next_pack``, ``next_sample``).

        Raises:
            TypeError: it is not set and there is no ``default``.
            ValueError: it is not an ASCII integer.
        """
        raw = self.get(txn, fmt.DB_META, name)
        if raw is None and default is not None:
            return default
        return int(bytes(raw))

    def set_counter(self, txn: lmdb.Transaction, name: bytes, value: int) -> None:
        self.put(txn, fmt.DB_META, name, str(value).encode())


def _os_fault(e: lmdb.Error, path: Path) -> OSError | None:
    """An ``lmdb.Error`` that carries an errno (permission denied, a read-only or full
    disk) as the ``OSError`` it is — not "not a store", which would be a wrong diagnosis
    — or None for LMDB's own codes (a damaged or foreign file)."""
    code = getattr(e, "code", 0)
    if isinstance(code, int) and code > 0:
        return OSError(code, os.strerror(code), str(path / fmt.LMDB_DIR))
    return None
