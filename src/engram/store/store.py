"""The versioned, crash-safe store: LMDB for state, safetensors for model weights.

Typical use::

    from engram.store import Store

    with Store.open("runs/demo", mode="c") as store:          # create or open, take the lock
        v = store.commit({"ewc": {"fisher": fisher}}, model=net, meta={"experience": 0})
    with Store.open("runs/demo") as store:                    # read-only, no lock
        snap = store.load()                                   # HEAD; or "v0003", 3, a tag
        net.load_state_dict(snap.model)

The on-disk format and the commit protocol are specified in :mod:`engram.store.format`.
:class:`Store` is a facade: each verb delegates to the room that does that one job
(``env``, ``history``, ``blobs``, ``load``, ``commit``, ``verify``, ``gc``, ``compact``;
docs/store.md, "Code layout"). (A little over ~400 lines: the public API's docstrings.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb

from engram.errors import CommitError, NetworkFilesystemError
from engram.faults import remedy
from engram.store import format as fmt
from engram.store import load as _reading
from engram.store.artifact import Artifact
from engram.store.blobs import Blobs
from engram.store.checkpoint import CheckpointInfo, RawTensor
from engram.store.commit import commit as _commit
from engram.store.compact import Compaction
from engram.store.env import INITIAL_MAP_SIZE, Env, prepare_directory
from engram.store.gc import gc as _gc
from engram.store.history import History, is_valid_tag_name
from engram.store.inspect import Inspector
from engram.store.lock import WriterLock
from engram.store.mounts import network_filesystem
from engram.store.samples import SampleTable
from engram.store.signing import Signer, TrustedKey, load_signer
from engram.store.values import (
    CompactReport,
    GcReport,
    Mode,
    Problem,
    RefMoves,
    Snapshot,
    VerifyReport,
    VersionInfo,
    VersionSpec,
    version_name,
)
from engram.store.verify import verify as _verify

if TYPE_CHECKING:  # annotations only: the inspection commands import no torch
    import torch

__all__ = [
    "Artifact",
    "CompactReport",
    "GcReport",
    "Mode",
    "Problem",
    "RefMoves",
    "Snapshot",
    "Store",
    "VerifyReport",
    "VersionInfo",
    "VersionSpec",
    "is_valid_tag_name",
    "version_name",
]


def _refuse_network_fs(root: Path) -> None:
    found = network_filesystem(root)
    if found is not None:
        kind, point = found
        raise NetworkFilesystemError(
            f"{root} is on a network file system ({kind} at {point}), where LMDB's locks and "
            "memory map are not safe and a store can be corrupted silently: keep the store on "
            "a local disk and share it with store.remote= (docs/remote.md), or pass "
            "allow_network_fs=True (store.allow_network_fs=true) to take that risk"
        )


class Store:
    """A versioned store of continual-learning state and model checkpoints.

    Open it with :meth:`Store.open`. One process may hold it for writing (``mode="w"``
    or ``"c"``); any number may read it (``mode="r"``), also while a writer commits.
    A ``Store`` is not thread-safe and must not be used across ``fork()``.

    Attributes:
        path: the store directory.
        mode: the mode it was opened with.
        samples: the replay sample table (:class:`~engram.store.samples.SampleTable`).
        inspect: read-only views for tools (:class:`~engram.store.inspect.Inspector`).
        env: the LMDB environment (:class:`~engram.store.env.Env`), for the store's
            own modules (background commits grow its map ahead of time).
    """

    def __init__(self, path: Path, mode: Mode, lock: WriterLock | None, map_size: int) -> None:
        self.path = path
        self.mode = mode
        self._lock = lock
        self.env = Env(path, mode, map_size)
        self.env.owner = self  # `Store.open(p).samples` keeps the store (and its lock) alive
        self._history = History(self.env)
        self._blobs = Blobs(self.env)
        self.samples: Any = SampleTable(self.env)
        self.inspect = Inspector(self.env, self._history, self._blobs)
        # Signs every commit once set (:meth:`sign_with`); held in memory only.
        self.signer: Signer | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        mode: Mode = "r",
        *,
        lock_timeout: float = 0.0,
        map_size: int = INITIAL_MAP_SIZE,
        allow_network_fs: bool = False,
        remote: str | None = None,
    ) -> Store:
        """Open a store.

        Args:
            path: the store directory.
            mode: ``"r"`` read-only (no lock), ``"w"`` read-write (the store must exist),
                ``"c"`` read-write, creating the store if the path is missing or empty.
            lock_timeout: seconds to wait for another writer to finish.
            map_size: initial LMDB map size; it grows by itself as needed.
            allow_network_fs: open for writing on a network or FUSE file system anyway
                (refused by default: :mod:`engram.store.mounts` says why).
            remote: the store's remote (``s3://BUCKET/PREFIX``, docs/remote.md): a
                missing or empty ``path`` is cloned from it first; opened for writing, a
                store it is ahead of is fast-forwarded, and the store remembers it for
                ``engram push`` (:mod:`engram.store.remote.attach`).

        Raises:
            StoreNotFoundError, NotAStoreError, StoreLockedError, StoreFormatError,
            NetworkFilesystemError; with ``remote``, RemoteError, RemoteConflictError.
        """
        if mode not in ("r", "w", "c"):
            raise ValueError(f"mode must be 'r', 'w' or 'c', not {mode!r}")
        root = Path(path).expanduser()
        if mode != "r" and not allow_network_fs:
            _refuse_network_fs(root)
        if remote is not None:
            from engram.store.remote.attach import before_open  # obstore: only if asked

            remote = before_open(remote, root, mode)
        lock = prepare_directory(root, mode, lock_timeout)
        try:
            store = cls(root, mode, lock, map_size)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if remote is not None and mode != "r":
            from engram.store.remote.attach import after_open

            try:
                after_open(store, remote)
            except BaseException:
                store.close()
                raise
        return store

    @property
    def store_id(self) -> str:
        """The store's id (32 hex characters), also in every manifest and checkpoint."""
        return self.env.store_id

    def close(self) -> None:
        """Close the LMDB environment and release the writer lock.

        Replay samples appended since the last commit are written first. The store is
        closed and the lock released even if that write fails.

        Raises:
            CommitError: writing those samples failed (e.g. disk full); they are lost,
                but no version references them (a commit writes the samples it
                references), so every committed version is intact.
        """
        try:
            if self.env.is_open and self.mode != "r" and os.getpid() == self.env.pid:
                pending = len(self.samples.pending_items())
                try:
                    self.samples.flush()
                except (OSError, lmdb.Error) as e:
                    raise CommitError(
                        f"closing store {self.path}: the {pending} replay samples appended "
                        f"since the last commit were not saved ({e}); no version references "
                        f"them, so every committed version is intact; {remedy(e)} before the "
                        "next run"
                    ) from e
        finally:
            self.env.close()
            self._blobs.close()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        try:
            self.close()
        except CommitError as close_error:
            if exc is None:
                raise
            # The error in flight (often a failed commit, for the same full disk) came
            # first and says more; the one of closing goes with it.
            exc.add_note(str(close_error))

    def __del__(self) -> None:
        # Releases the writer lock of a store that was never closed; not in a forked child.
        try:
            if self.env.pid == os.getpid():
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, mode={self.mode!r})"

    # --------------------------------------------------------------- reading

    @property
    def head(self) -> VersionInfo | None:
        """The current version, or None for an empty store."""
        with self.env.read() as txn:
            vid = self._history.head(txn)
            return None if vid is None else self._history.info(txn, vid, self._history.tags(txn))

    def info(self, version: VersionSpec = "HEAD") -> VersionInfo:
        """Summary of one version."""
        with self.env.read() as txn:
            vid = self._history.resolve(txn, version)
            return self._history.info(txn, vid, self._history.tags(txn))

    def manifest(self, version: VersionSpec = "HEAD") -> dict[str, Any]:
        """The raw manifest (JSON object) of a version."""
        with self.env.read() as txn:
            return self._history.manifest(txn, self._history.resolve(txn, version))

    def versions(self, *, last: int | None = None) -> list[VersionInfo]:
        """Every version in the store, oldest first; a version whose manifest is damaged
        is left out (:meth:`damaged` lists it). ``last``: only the ``last`` newest (their
        manifests alone are read: a page of a long history)."""
        return self._history.versions(last=last)

    def damaged(self, *, last: int | None = None) -> list[tuple[int, str]]:
        """``(id, reason)`` of each version whose manifest cannot be read, oldest first
        (``last``: among the ``last`` newest)."""
        return self._history.damaged(last=last)

    def version_ids(self) -> list[int]:
        """Every version id, oldest first, from the keys alone (no manifest is read)."""
        with self.env.read() as txn:
            return self._history.ids(txn)

    def tags(self) -> dict[str, int]:
        """Tag name → version id."""
        with self.env.read() as txn:
            return self._history.tags(txn)

    def checkpoint_path(self, version: VersionSpec = "HEAD") -> Path | None:
        """Path of a version's plain safetensors checkpoint file.

        None if the version has no model weights or if :meth:`compact` delta-coded
        them (its :attr:`VersionInfo.compacted` is then true): read those with
        ``load(version, state=False).model``, or write a plain file with
        :meth:`export_checkpoint`. HEAD always has its plain file.
        """
        ckpt = self.manifest(version)["checkpoint"]
        return None if ckpt is None else self.path / fmt.CHECKPOINT_DIR / ckpt["file"]

    def artifact_path(self, version: VersionSpec = "HEAD") -> Path | None:
        """Path of a version's model artifact file (e.g. ``model-v0007-exp3.skops``),
        or None if it has none. Read it through :meth:`load` (``Snapshot.artifact``):
        that checks the bytes against the manifest."""
        art = self.manifest(version).get("artifact")
        return None if art is None else self.path / fmt.CHECKPOINT_DIR / art["file"]

    def export_checkpoint(
        self, version: VersionSpec, path: str | os.PathLike[str]
    ) -> CheckpointInfo | None:
        """Write a version's model weights to ``path`` as a plain safetensors file.

        For a compacted version this rebuilds the file it had: the same tensors, bit
        for bit, and the same safetensors metadata (the header's key order may differ).
        None if the version has no model.
        """
        return _reading.export_checkpoint(self.env, self._history, self._blobs, version, path)

    def load(
        self,
        version: VersionSpec = "HEAD",
        *,
        state: bool = True,
        model: bool = True,
        verify: bool = False,
    ) -> Snapshot:
        """Load a version's state and model weights.

        Every chunk and the checkpoint file are checked against their XXH3 checksum;
        ``verify=True`` also re-checks their SHA-256 content hashes.

        Args:
            version: an int id, ``"v0007"``, ``"HEAD"``, ``"HEAD~1"`` or a tag.
            state: load the committed state mapping.
            model: load the model weights from the checkpoint file.
            verify: also re-check SHA-256 digests (slower).

        Raises:
            VersionNotFoundError: no such version.
            CorruptionError: stored bytes do not match their hashes (names version and key).
        """
        return _reading.load(
            self.env, self._history, self._blobs, version, state=state, model=model, verify=verify
        )

    def raw_weights(
        self, version: VersionSpec = "HEAD", *, verify: bool = False
    ) -> dict[str, RawTensor] | None:
        """A version's model weights as their stored bytes (a compacted version's rebuilt
        bit for bit), checked as :meth:`load` checks them, read without torch; None if
        it has no model. :func:`~engram.store.checkpoint.save_raw` writes them as the
        file ``safetensors.torch.save_file`` would (``engram export`` does)."""
        return _reading.raw_weights(self.env, self._history, self._blobs, version, verify=verify)

    # --------------------------------------------------------------- writing

    def commit(
        self,
        state: Mapping[str, Any] | None = None,
        model: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
        *,
        message: str = "",
        meta: Mapping[str, Any] | None = None,
        artifact: Artifact | None = None,
        refs: RefMoves | None = None,
    ) -> VersionInfo:
        """Commit a new version and move HEAD to it, all or nothing.

        Args:
            state: nested mapping of tensors, numpy arrays and JSON scalars (a plugin's
                ``state_dict()``, an optimizer's, RNG states, counters...). A top-level
                value may be a :class:`~engram.store.Later`: produced while the model's
                checkpoint file is written (e.g. other processes' parts, received).
            model: the model (its ``state_dict()`` is saved) or a mapping of its weights,
                written as a plain safetensors checkpoint file.
            message: a human-readable description of the version.
            meta: JSON-able metadata (clock, config, metrics summary). An int
                ``meta["experience"]`` names the checkpoint file and, with
                ``meta["strategy"]``, is copied into the file's safetensors metadata.
            artifact: a model that is not a set of tensors, as an
                :class:`~engram.store.artifact.Artifact` (format and bytes; e.g. a
                scikit-learn estimator written by skops): written to its own file
                ``checkpoints/model-vNNNN[-expN].<format>``, hashed into the manifest,
                verified and collected like a checkpoint, never parsed by the store.
                Not with ``model``.
            refs: tags to point at the new version and where HEAD goes (default: to
                the new version), moved in the transaction that publishes it.

        Returns:
            The new version's summary (its ``id`` is the new version id).

        Raises:
            EncodingError: the state holds a value that cannot be stored.
            CommitError: an I/O error (e.g. disk full); HEAD still names the previous version.
        """
        return _commit(
            self.env,
            self._history,
            self._blobs,
            self.samples,
            state,
            model,
            message=message,
            meta=meta,
            artifact=artifact,
            refs=refs,
            signer=self.signer,
        )

    def sign_with(self, key: str | os.PathLike[str] | None) -> None:
        """Sign every later commit with the ed25519 private key in PEM file ``key``
        (``engram keygen KEYFILE``; None: stop signing). The key stays in this process:
        nothing of it is written to the store. See docs/store.md, "Signed versions".

        Raises:
            EngramError: the file is not an ed25519 private key, or ``cryptography`` is
                not installed (``pip install 'engram-cl[sign]'``).
        """
        self.signer = None if key is None else load_signer(key)

    def tag(self, name: str, version: VersionSpec = "HEAD") -> VersionInfo:
        """Point tag ``name`` at a version (moving it if it exists)."""
        return self.info(self._history.tag(name, version))

    def untag(self, name: str) -> None:
        """Remove a tag (the version stays)."""
        self._history.untag(name)

    def rollback(self, version: VersionSpec | None) -> VersionInfo | None:
        """Move HEAD to an older (or any) version; later versions stay until ``gc``.

        The next commit's parent is that version, so history becomes a tree.
        ``rollback(None)`` resets HEAD: the store keeps its versions (reachable by name
        and tag) but has no current one, and the next commit starts a new root.
        """
        vid = self._history.rollback(version)
        return None if vid is None else self.info(vid)

    # -------------------------------------------------------------- integrity

    def verify(
        self,
        version: VersionSpec = "HEAD",
        *,
        all: bool = False,
        trust: str | os.PathLike[str] | TrustedKey | None = None,
    ) -> VerifyReport:
        """Re-hash what a version (or, with ``all=True``, the whole store) references.

        Checks every manifest's structure, every referenced chunk's presence, size,
        SHA-256 and XXH3, and every checkpoint file's size and hashes. A delta-coded
        chunk (also a compacted version's weights) is decoded through its chain and
        the result checked against the SHA-256 and XXH3 of the original bytes, so
        every stored delta and every base it needs is checked too. With ``all=True``
        it also re-hashes every indexed blob, referenced or not, and checks the seal of
        every LMDB record (format 3). Every version's parent chain must reach a root (no
        missing parent, no cycle).
        Never raises for corruption: it is reported in :attr:`VerifyReport.problems`;
        :attr:`VerifyReport.notes` says when the store's records predate checksums.

        ``trust``: a public key file (``KEYFILE.pub`` of ``engram keygen``); each version
        checked must then carry a valid signature by that key: an unsigned version, one
        signed by another key and one whose manifest was edited after signing (even
        with its record seal recomputed) are each a problem.
        """
        return _verify(self.env, self._history, self._blobs, version, all=all, trust=trust)

    def upgrade(self) -> int:
        """Seal every LMDB record of a store made by an older engram (formats 1 and 2)
        with a checksum, in one transaction; returns how many (0: already sealed).

        Afterwards the store is format 3: older engram versions refuse to open it
        (cleanly: "written in format version 3 ... upgrade engram").
        """
        return self.env.upgrade()

    def gc(self, *, keep_last: int | None = None, drop: Iterable[VersionSpec] = ()) -> GcReport:
        """Delete unreachable data; with ``keep_last``, also old versions.

        Never deletes HEAD, a tagged version, or anything a kept version references,
        including every base blob a kept version's delta chains need (a dropped
        version's blobs stay as long as a kept version is coded against them; weights
        served from a dropped version's checkpoint file are copied into a pack first).
        Collects packs and checkpoint files left by interrupted commits, and rewrites
        packs that are mostly garbage so their space is returned to the file system.
        A kept version whose parent is dropped is re-linked to its nearest kept ancestor.

        Args:
            keep_last: keep only the ``keep_last`` newest versions (plus HEAD and tagged
                ones). ``None`` keeps every version.
            drop: versions to delete as well (never HEAD or a tagged version: that
                raises ``ValueError``).

        Raises:
            CorruptionError: a kept manifest is unreadable (gc deletes nothing then).
        """
        return _gc(
            self.env, self._history, self._blobs, self.samples, keep_last=keep_last, drop=drop
        )

    def compact(self, *, tagged: bool = False) -> CompactReport:
        """Delta-code the history so it costs a small multiple of one version on disk.

        Every version except HEAD (and, unless ``tagged=True``, tagged versions) is
        rewritten: its model weights move from their plain safetensors file into the
        blob store and the file is deleted; each changed chunk of its weights and
        state is stored as a zstd frame of its difference to the same chunk of its
        *base* — its neighbour towards HEAD in the history tree (the child on HEAD's
        lineage). Unchanged chunks are shared by content address, as always. HEAD's
        file and blobs stay plain, so restoring HEAD is as fast as before; any
        version still restores bit-exactly through :meth:`load`. Chains are cut by
        keyframes after :data:`~engram.store.delta.MAX_CHAIN` deltas.

        Crash-safe: new blobs are written to a new pack first, then one LMDB
        transaction swaps index entries and manifests, then old files are removed (as
        :meth:`gc` does). Call it again after more commits: the previous HEAD is then
        compacted too. Replay samples are never touched.

        Args:
            tagged: compact tagged versions too (by default they keep a plain file).
        """
        return Compaction(self.env, self._history, self._blobs, tagged=tagged).run()
