"""engram's exception types.

Every error a user can cause or meet (a wrong path, a locked store, a corrupted
file, a full disk) is one of these, with a message that says what happened and
what to do next. Errors from deeper libraries (lmdb, safetensors, OSError) are
wrapped, never leaked as the only information.
"""

from __future__ import annotations


class EngramError(Exception):
    """Base class of every error engram raises on purpose."""


class StoreNotFoundError(EngramError):
    """The store path does not exist (and creating it was not asked for)."""


class NotAStoreError(EngramError):
    """The path exists but is not an engram store (a file, or a foreign directory)."""


class StoreFormatError(EngramError):
    """The store was written by a newer format version, or its metadata is malformed."""


class StoreLockedError(EngramError):
    """Another live process holds the store's writer lock."""


class ReadOnlyStoreError(EngramError):
    """A write was attempted on a store opened read-only."""


class VersionNotFoundError(EngramError, KeyError):
    """No version, tag or ref of that name exists in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CorruptionError(EngramError):
    """Stored bytes do not match their recorded hash or structure."""


class EncodingError(EngramError, TypeError):
    """A value cannot be stored: not a tensor, a nested mapping/list or a JSON scalar."""


class CommitError(EngramError):
    """A commit failed (e.g. disk full); the previous HEAD is intact."""


class ArchitectureMismatchError(EngramError):
    """The model's parameters do not match the checkpoint being resumed."""


class HyperparameterMismatchError(EngramError):
    """The strategy's hyperparameters differ from those that produced the store's state."""


class GateFailed(EngramError):
    """The regression gate rejected an experience; HEAD was moved off the failed version."""


class NonFiniteError(EngramError):
    """Training produced a non-finite loss, gradient or weight; nothing was committed."""


class DataFileError(EngramError):
    """A file of the ``files`` benchmark is missing, unreadable or malformed, or a file
    a store was trained on changed since (raised by the streams and by the lineage)."""


class ConfigError(EngramError):
    """An option is unknown, out of range, or does not fit the rest of the config."""


class UnsafeStoreError(CorruptionError):
    """Something inside the store directory is a symbolic link, a hard link or not a
    regular file (a FIFO, a device): the store never follows, opens or deletes through
    it, since it could lead outside the store or block forever."""


class DamagedDatabaseError(CorruptionError):
    """LMDB's own page checks failed while reading ``memory.lmdb/data.mdb`` (an
    ``lmdb.Error`` such as ``MDB_CORRUPTED``, ``MDB_PAGE_NOTFOUND``, ``MDB_BAD_TXN``)."""


class LockTableReplacedError(EngramError):
    """``memory.lmdb/lock.mdb`` was deleted or replaced while a read ran, so a writer
    may have reused the pages it read: not corruption; the next read reopens the store,
    so the read can simply run again."""


class RemoteError(EngramError):
    """A store's remote (object storage) cannot be used: unreachable, no credentials,
    not an engram remote, or an object that fails its hash. Local versions are intact."""


class RemoteUnreachableError(RemoteError):
    """The remote's endpoint cannot be reached (down, a closed port, a timeout), as
    opposed to a remote that answered: a local copy may stand in for it."""


class RemoteConflictError(RemoteError):
    """The remote's HEAD moved (another writer pushed) or names another history:
    nothing was overwritten; the message says how to resolve it."""


class NetworkFilesystemError(EngramError):
    """A store would be written on a network or FUSE file system, where LMDB is unsafe."""


class UntrustedVersionError(EngramError):
    """A version is not signed by the trusted key: unsigned, signed by another key, or
    edited after signing (:mod:`engram.store.signing`)."""
