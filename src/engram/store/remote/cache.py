"""A remote read in place: a read-only local copy that ``engram ls/show/verify/diff/export``,
:func:`engram.load_model` and :class:`engram.ModelHandle` open when given a URL.

    store = RemoteStore.open_url("s3://bucket/runs/ewc@prod")  # copy brought up to date
    store.load()          # prod (the view's HEAD); its files are fetched first
    store.refresh()       # one read of the remote's prod: True if it moved (copy updated)

``URL@REF`` (a tag, ``vNNNN``, an id, ``HEAD~N``) is the remote seen with its HEAD at
``REF``, re-resolved on :meth:`RemoteStore.refresh`; without ``@REF`` its HEAD is the
remote's. ``@`` after the prefix only (``s3://bucket@x`` would be user info: refused).

**Where**: ``$ENGRAM_CACHE/<name>-<h>``, else ``$XDG_CACHE_HOME/engram/remotes/<name>-<h>``,
else ``~/.cache/engram/remotes/<name>-<h>`` (``name``: the prefix's last name; ``h``: 16
hex of the URL's SHA-256), or ``cache_dir=``. ``engram cache prune`` reclaims the
space (:func:`~engram.store.remote.copies.prune`: never under a process holding it open);
the next use fetches or clones again.

**What it holds** (docs/remote.md, "Reading a remote in place"): a clone made by
:func:`pull`'s own code, records only — every version of the remote HEAD's lineage
(manifests, blob-index entries, replay samples: what the segments hold), the remote's
tags (the copy's are the remote's, no other) — plus, of the files (packs, checkpoints,
model artifacts), only those a read needs: a version's checkpoint and the packs its
chunks (and their delta bases) are in, fetched on first use and checked against the
SHA-256 the segments name on the way in (a file failing it is never renamed into place).
``remote-files.json`` maps each local file name to that SHA-256 and size; it is written
before the records naming its files are published, so every published version's files
can be fetched.

**How it stays consistent**: it is only ever written by a sync (:func:`sync`, under
the flock ``<copy>.sync.lock`` for the whole of it, so two processes sharing it take
turns) and by fetches of immutable, hash-checked files; a sync is a pull, so a reader
sees a complete remote version or the previous state, never a half-copied one, and a
sync killed anywhere resumes next time. The remote's versions are immutable, so a copied
version stays true; what can move is HEAD and the tags, which a sync reads again (the
copy is then as of that moment) and :meth:`RemoteStore.refresh` compares with one read.
Every ``RemoteStore`` on one copy in a process shares one LMDB environment
(:mod:`~engram.store.remote.copies`), so a ``ModelHandle`` and ``load_model`` of the same
remote work side by side.

**Offline**: when the remote cannot be reached (down, a closed port, a timeout), a copy
that already holds a version serves it as of its last sync, with one warning
(:class:`OfflineWarning`: "remote URL unreachable, serving the local copy as of TIME,
version vN"); a read that needs a file the copy lacks, or a copy with no version, fails
in one line as before. :meth:`RemoteStore.refresh` keeps trying the remote at each call.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import lmdb

from engram.errors import (
    CorruptionError,
    EngramError,
    RemoteConflictError,
    RemoteError,
    RemoteUnreachableError,
    VersionNotFoundError,
)
from engram.store import Store
from engram.store.blobs import Blobs
from engram.store.checkpoint import CheckpointInfo, RawTensor
from engram.store.env import Env
from engram.store.history import History
from engram.store.inspect import Inspector
from engram.store.packs import PACK_NAME, pack_name
from engram.store.remote import copies
from engram.store.remote.client import ObjectStore, check_url
from engram.store.remote.copies import FILES, Shared, synced_at
from engram.store.remote.layout import Segment, local_dir
from engram.store.remote.lineage import read_head, read_tag, remembered
from engram.store.remote.pull import PullReport, default_store, download_checked, pull_into
from engram.store.samples import SampleTable
from engram.store.values import Problem, Snapshot, VerifyReport, VersionSpec

CACHE_ENV = "ENGRAM_CACHE"
# A sync waits this long for another process syncing the same copy (its writer lock);
# a sync writes records, not files, so that is usually well under a second.
SYNC_LOCK_TIMEOUT_S = 60.0
_HEAD_ANCESTOR = re.compile(r"HEAD~\d+")
_VERSION = re.compile(r"v\d+")


def split_ref(target: str) -> tuple[str, str | None]:
    """``("s3://bucket/prefix", "prod")`` for ``"s3://bucket/prefix@prod"``: the URL
    (checked: :func:`~engram.store.remote.client.check_url`) and the ref after the
    prefix's last ``@``, if any."""
    scheme, sep, rest = target.partition("://")
    host, slash, path = rest.partition("/")
    ref = None
    if sep and slash and "@" in path.rsplit("/", 1)[-1]:
        path, _, ref = path.rpartition("@")
        if not ref:
            raise RemoteError(f"remote {scheme}://{host}/{path}@: name a tag or version after @")
    return check_url(f"{scheme}{sep}{host}{slash}{path}"), ref


def cache_root() -> Path:
    """The directory the copies of remotes are kept in (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "engram" / "remotes"


def cache_path(url: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The copy of ``url`` (a checked URL without ``@REF``)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", default_store(url))[:40] or "remote"
    return root / f"{name}-{hashlib.sha256(url.encode()).hexdigest()[:16]}"


class OfflineWarning(UserWarning):
    """A remote could not be reached: its local copy is served as of its last sync."""


def is_unreachable(error: RemoteError) -> bool:
    """Whether ``error`` says the remote's endpoint cannot be reached (down, a closed
    port, a timeout), as opposed to a remote that answered (no store, no credentials,
    a damaged object), which no local copy can stand in for."""
    return isinstance(error, RemoteUnreachableError)


def sync(url: str, path: Path) -> PullReport:
    """Bring the copy at ``path`` to the remote's HEAD and tags: records only (files are
    fetched when read). A copy this process holds open is closed meanwhile and reopened.

    Raises:
        RemoteError: the remote cannot be read, holds no store, has no version, or the
            copy no longer matches it (delete the copy).
        CopyBusyError: another process synced or pruned it for over a minute.
    """
    shared = copies.acquire(path)
    try:
        return shared.resync(lambda: _sync_locked(url, path))
    finally:
        shared.release()


def _sync_locked(url: str, path: Path) -> PullReport:
    """The sync itself, under the copy's sync lock: from reading the remote's HEAD to
    remembering its lineage, so that no other sync moves the copy in between."""
    client = ObjectStore(url)
    with copies.sync_lock(path, timeout=SYNC_LOCK_TIMEOUT_S):
        try:
            return pull_into(client, path, place=_FileMap(path).place, mirror_tags=True,
                             lock_timeout=SYNC_LOCK_TIMEOUT_S)  # fmt: skip
        except RemoteConflictError:
            raise RemoteError(
                f"the local copy {path} of remote {client.url} no longer matches it (the "
                f"remote was deleted and pushed again?); delete {path} (`engram cache prune "
                f"{client.url} --all`), then run the command again"
            ) from None


class _FileMap:
    """``remote-files.json``: each local file name of the copy -> (SHA-256, size)."""

    def __init__(self, store: Path) -> None:
        self.path = store / FILES

    def read(self) -> dict[str, tuple[str, int]]:
        try:
            obj = json.loads(self.path.read_text())
            return {str(k): (str(v[0]), int(v[1])) for k, v in obj["files"].items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            raise CorruptionError(
                f"{self.path} is damaged; delete {self.path.parent} (a copy of a remote), "
                "then run the command again"
            ) from None

    def write(self, files: dict[str, tuple[str, int]]) -> None:
        tmp = self.path.with_name(f".{FILES}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            json.dump({"files": {k: list(v) for k, v in sorted(files.items())}}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def place(self, store: Store, segment: Segment) -> dict[str, str]:
        """The local name of each file of ``segment``, recorded before its records are
        published. As :func:`~engram.store.remote.pull.pull` does with the files
        themselves: a pack whose name the copy already gave other bytes gets a new id."""
        files = self.read()
        by_content = {v: k for k, v in files.items() if PACK_NAME.fullmatch(k)}
        with store.env.read() as txn:
            next_pack = store.env.counter(txn, b"next_pack")
        places = {}
        for name, digest, nbytes in segment.files:
            local = name
            if PACK_NAME.fullmatch(name) and (digest, nbytes) in by_content:
                local = by_content[(digest, nbytes)]  # the same bytes, already named here
            elif files.get(name, (digest, nbytes)) != (digest, nbytes):
                if PACK_NAME.fullmatch(name):
                    while pack_name(next_pack) in files:
                        next_pack += 1
                    local = pack_name(next_pack)
                    next_pack += 1
                else:  # a checkpoint is named by its version: the one here is an orphan
                    (store.path / local_dir(name) / name).unlink(missing_ok=True)
            places[name] = local
            files[local] = (digest, nbytes)
            if PACK_NAME.fullmatch(local):
                by_content[(digest, nbytes)] = local
        self.write(files)
        return places


class _View(History):
    """The copy's history with HEAD at ``at`` (re-resolved at every read)."""

    def __init__(self, env: Env, at: VersionSpec, url: str) -> None:
        super().__init__(env)
        self._at, self._url = at, url
        self._plain = History(env)

    def head(self, txn: lmdb.Transaction) -> int | None:
        try:
            return self._plain.resolve(txn, self._at)
        except VersionNotFoundError:
            tags = ", ".join(sorted(self._plain.tags(txn))) or "none"
            raise VersionNotFoundError(
                f"remote {self._url} has no tag or version {self._at!r} (tags: {tags}); "
                f"list them with `engram ls {self._url}`"
            ) from None


class RemoteStore(Store):
    """A read-only :class:`Store` over the local copy of a remote (module docstring):
    reads fetch the files they need first; :meth:`refresh` follows the remote. Every
    ``RemoteStore`` on one copy in a process shares its environment; each is closed on
    its own.

    Attributes:
        url: the remote (without ``@REF``).
        at: the ref the view's HEAD is (None: the remote's HEAD).
        offline: the warning given while the remote is unreachable and the copy serves
            (None: the last sync reached it).
    """

    url: str = ""
    at: str | None = None
    offline: str | None = None

    @classmethod
    def open_url(
        cls,
        target: str,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        offline: bool = True,
    ) -> RemoteStore:
        """The remote ``target`` (``URL`` or ``URL@REF``), its copy synced first.

        ``offline``: if the remote cannot be reached, serve a copy that holds a version
        (with an :class:`OfflineWarning`) instead of failing.

        Raises:
            RemoteError: the remote cannot be read (no credentials, down with no copy
                here, no bucket), holds no store or no version yet.
            VersionNotFoundError: ``REF`` is not a tag or version of the remote.
        """
        url, at = split_ref(target)
        path = cache_path(url, cache_dir)
        shared = copies.acquire(path)
        unreachable = None
        try:
            try:
                shared.resync(lambda: _sync_locked(url, path))
            except RemoteError as e:
                if not (offline and is_unreachable(e) and shared.env is not None):
                    raise
                unreachable = e
            store = cls._bound(shared, url, at)
        except BaseException:
            shared.release()
            raise
        try:
            if unreachable is not None:
                store._serve_offline(unreachable)
            else:
                store.head  # noqa: B018 (``@REF`` resolves: said now, in one line)
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def _bound(cls, shared: Shared, url: str, at: str | None) -> RemoteStore:
        """A store over ``shared``'s environment: what :meth:`Store.__init__` sets, with
        the environment this process already has open instead of a new one."""
        env = shared.env
        assert env is not None
        store = cls.__new__(cls)
        store.path, store.mode, store._lock, store.env = shared.path, "r", None, env
        store._history = History(env)
        store._blobs = Blobs(env)
        store.samples = SampleTable(env)
        store.inspect = Inspector(env, store._history, store._blobs)
        store.signer = None
        store.url, store.at = url, at
        store._shared, store._closed = shared, False
        store._install_view()
        return store

    def close(self) -> None:
        """Close this store; the copy's environment closes with the last store on it."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            self._blobs.close()
        finally:
            self._shared.release()

    def __repr__(self) -> str:
        return f"RemoteStore({self.url + ('@' + self.at if self.at else '')!r})"

    def _install_view(self) -> None:
        if self.at is not None:
            self._history = _View(self.env, self.at, self.url)
            self.inspect = Inspector(self.env, self._history, self._blobs)

    # ------------------------------------------------------------ following

    def refresh(self, ref: VersionSpec = "HEAD") -> bool:
        """Read the remote's pointer ``ref`` follows (HEAD, or the tag; one read); if it
        is not what the copy has, sync the copy (every store of this process on it sees
        the new state). True if synced. A remote that cannot be reached is not an error:
        the copy goes on serving (one :class:`OfflineWarning` per outage), and the next
        call tries again.

        Raises:
            RemoteError: the remote answered but cannot be used; the store stays as it was.
        """
        try:
            if self._is_current(ref):
                self.offline = None
                return False
            self._shared.resync(lambda: _sync_locked(self.url, self.path))
        except RemoteError as e:
            if not is_unreachable(e):
                raise
            self._serve_offline(e)
            return False
        self.offline = None
        return True

    def _serve_offline(self, error: RemoteError) -> None:
        """Say once per outage that the copy is served, as of when and at which version.

        Raises:
            RemoteError: ``error``, if the copy has no version to serve.
        """
        if self.offline is not None:
            return
        try:
            head = self.head
        except VersionNotFoundError:  # @REF is not in the copy: the remote may have it
            head = None
        if head is None:
            raise error
        self.offline = (
            f"remote {self.url} unreachable, serving the local copy as of "
            f"{synced_at(self.path) or 'an unknown time'}, version {head.name}"
        )
        warnings.warn(self.offline, OfflineWarning, stacklevel=3)

    def _is_current(self, ref: VersionSpec) -> bool:
        if ref in (None, "HEAD") or (isinstance(ref, str) and _HEAD_ANCESTOR.fullmatch(ref)):
            if self.at is not None and self.at != ref:
                return self._is_current(self.at)
            client = ObjectStore(self.url)
            head, _ = read_head(client)
            memory = remembered(self.path)
            seen = memory.lineage[-1].ref if memory is not None and memory.lineage else None
            return head == seen
        if isinstance(ref, int) or (isinstance(ref, str) and _VERSION.fullmatch(ref)):
            return True  # a version never changes (one the copy lacks: load says so)
        tag, _ = read_tag(ObjectStore(self.url), str(ref))
        return (None if tag is None else tag.target.version) == self.tags().get(str(ref))

    # ------------------------------------------------------------ files on demand

    def needed_files(self, vid: int, *, state: bool = True, model: bool = True) -> set[str]:
        """The files reading version ``vid`` (its state, its model) opens
        (:func:`~engram.store.remote.copies.needed_files`)."""
        return copies.needed_files(self, vid, state=state, model=model)

    def fetch(self, names: set[str]) -> int:
        """Download the files of ``names`` the copy lacks (each checked against its
        SHA-256 before it is renamed into place); the bytes downloaded.

        Raises:
            RemoteError: the remote cannot be read, or an object fails its hash.
        """
        files = _FileMap(self.path).read()
        wanted = []
        for name in sorted(names):
            target = self.path / local_dir(name) / name
            known = files.get(name)
            if known is None:
                raise CorruptionError(
                    f"the local copy {self.path} of {self.url} does not know the file {name}; "
                    f"delete {self.path}, then run the command again"
                )
            if not (target.is_file() and target.stat().st_size == known[1]):
                wanted.append((name, known[0], known[1], target))
        return download_checked(ObjectStore(self.url), wanted) if wanted else 0

    def _fetch_for(self, version: VersionSpec, *, state: bool = True, model: bool = True) -> int:
        with self.env.read() as txn:
            vid = self._history.resolve(txn, version)
        self.fetch(self.needed_files(vid, state=state, model=model))
        return vid

    def load(
        self,
        version: VersionSpec = "HEAD",
        *,
        state: bool = True,
        model: bool = True,
        verify: bool = False,
    ) -> Snapshot:
        vid = self._fetch_for(version, state=state, model=model)  # resolved once
        return super().load(vid, state=state, model=model, verify=verify)

    def export_checkpoint(
        self, version: VersionSpec, path: str | os.PathLike[str]
    ) -> CheckpointInfo | None:
        return super().export_checkpoint(self._fetch_for(version, state=False), path)

    def raw_weights(
        self, version: VersionSpec = "HEAD", *, verify: bool = False
    ) -> dict[str, RawTensor] | None:
        return super().raw_weights(self._fetch_for(version, state=False), verify=verify)

    def checkpoint_path(self, version: VersionSpec = "HEAD") -> Path | None:
        return super().checkpoint_path(self._fetch_for(version, state=False))

    def artifact_path(self, version: VersionSpec = "HEAD") -> Path | None:
        return super().artifact_path(self._fetch_for(version, state=False))

    def verify(
        self, version: VersionSpec = "HEAD", *, all: bool = False, trust: Any = None
    ) -> VerifyReport:
        """:meth:`Store.verify` of the copy, after fetching the files it checks (a
        fetch that fails is one more problem); with ``all=True``, every version's."""
        failed = None
        try:
            if all:
                for info in self.versions():
                    self.fetch(self.needed_files(info.id))
            else:
                self._fetch_for(version)
        except (RemoteError, CorruptionError) as e:
            failed = Problem(None, "remote", str(e))
        except VersionNotFoundError:
            pass  # the verify below says it as it does for a local store
        report = super().verify(version, all=all, trust=trust)
        if failed is not None:
            report.problems.insert(0, failed)
        return report


def rename_errors(e: EngramError, store: RemoteStore) -> EngramError:
    """``e`` naming the remote where it names the copy's directory (what a user typed)."""
    text = str(e).replace(str(store.path), store.url)
    try:
        return type(e)(text)
    except TypeError:
        return e
