"""Read-only views of a store for tools (the ``engram`` CLI); nothing here writes.

* :func:`tree_arrays` and :func:`version_arrays`: the one walk over the arrays a
  state tree or a version holds, reading no bytes;
* ``store.inspect`` (:class:`Inspector`): a version's replay slot tables, the sizes of
  replay samples, HEAD's id without its manifest, a version's arrays as their stored
  bytes (:meth:`~Inspector.raw_snapshot`, behind ``engram diff``), and the
  :meth:`~Inspector.usage` report behind ``engram du`` (which skips and lists versions
  with damaged manifests);
* :func:`disk_usage`: what a store's files take on disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from engram.errors import CorruptionError
from engram.store import format as fmt
from engram.store import load as _reading
from engram.store import references
from engram.store.blobs import Blobs
from engram.store.codec import ArrayRecord
from engram.store.env import Env
from engram.store.history import History, manifest_bytes, tree_arrays, version_arrays
from engram.store.values import Snapshot, VersionSpec

__all__ = ["Inspector", "Usage", "UsageReport", "disk_usage", "tree_arrays", "version_arrays"]


@dataclass
class Usage:
    """The bytes one component of a store takes (see :meth:`Inspector.usage`)."""

    kind: str  # what first charged it: "state", "samples", "model" or "manifest"
    logical: int = 0  # summed over versions
    unique: int = 0  # each distinct chunk, checkpoint file and replay sample once
    slot_tables: bool = False  # ("state") it held replay slot tables where first seen


@dataclass(frozen=True)
class UsageReport:
    versions: int  # versions counted (damaged ones are not)
    components: dict[str, Usage]  # in the order they were first charged
    damaged: tuple[tuple[int, str], ...] = ()  # (id, reason): manifests that cannot be read


# component_of(kind, path): the component a charge goes to. kind "state": a state
# array at path; "samples": the replay samples of the slot table at path; "model": a
# checkpoint file or a compacted weight (path "" for the model as a whole);
# "manifest": a version's manifest (path "").
ComponentOf = Callable[[str, str], str]


class Inspector:
    """Read-only views of the store behind ``env`` (use it as ``store.inspect``)."""

    def __init__(self, env: Env, history: History, blobs: Blobs) -> None:
        self._env, self._history, self._blobs = env, history, blobs

    def slot_tables(self, version: VersionSpec = "HEAD") -> dict[str, list[int]]:
        """The replay-sample ids each slot table (``__samples__`` array) of a version
        references, by state path; reads only those small arrays."""
        with self._env.read() as txn:
            vid = self._history.resolve(txn, version)
            recs = tree_arrays(self._history.manifest(txn, vid)["state"])
            return {path: ids for path, kind, ids in self._referenced(txn, vid, recs)
                    if kind is references.SAMPLES}  # fmt: skip

    def raw_snapshot(self, version: VersionSpec = "HEAD") -> Snapshot:
        """A version as :meth:`Store.load <engram.store.Store.load>` loads it (every
        chunk checked, in one consistent read), each array of its state and model
        weights a :class:`~engram.store.checkpoint.RawTensor` of its stored bytes:
        read without torch (``engram diff``; :func:`~engram.store.codec.numpy_values`
        gives the values)."""
        return _reading.load(
            self._env, self._history, self._blobs, version,
            state=True, model=True, verify=False, raw=True,
        )  # fmt: skip

    def head_id(self) -> int | None:
        """HEAD's version id from the refs alone (None: no HEAD), also when that
        version's manifest is damaged."""
        with self._env.read() as txn:
            return self._history.head(txn)

    def sample_sizes(self, ids: set[int]) -> dict[int, int]:
        """Bytes of each replay sample record (0: missing)."""
        with self._env.read() as txn:
            return self._record_sizes(txn, references.SAMPLES, ids)

    def usage(self, component_of: ComponentOf | None = None) -> UsageReport:
        """What each component of the store takes: summed over versions, and with each
        chunk, checkpoint file and replay sample charged once, to the first component
        (oldest version first) that references it. ``component_of`` groups charges
        (default: the kind, or the path for state arrays and slot tables). A version
        whose manifest or state tree cannot be decoded charges nothing and is listed in
        :attr:`UsageReport.damaged`.

        Long because it is one pass in the order charges are made; its steps are short.
        """
        name = component_of or (lambda kind, path: path if kind in ("state", "samples") else kind)
        out: dict[str, Usage] = {}
        chunks: set[str] = set()
        files: set[str] = set()
        records_seen: dict[bytes, set[int]] = {}  # referenced records charged, by database

        def charge(kind: str, key: str, logical: int, unique: int, slot_tables: Any = ()) -> None:
            if key not in out:
                out[key] = Usage(kind, slot_tables=key in slot_tables)
            out[key].logical += logical
            out[key].unique += unique

        def new_chunks(record: ArrayRecord) -> int:
            fresh = [(d, size) for d, size, _ in record.chunks if d not in chunks]
            chunks.update(d for d, _ in fresh)
            return sum(size for _, size in fresh)

        model = name("model", "")
        charge("model", model, 0, 0)
        counted, damaged = 0, []
        with self._env.read() as txn:
            for vid in self._history.ids(txn):
                try:  # everything a version's charges need is decoded before the first
                    manifest = self._history.manifest(txn, vid)
                    recs = tree_arrays(manifest["state"])
                    compacted = manifest.get("model")
                    weights = tree_arrays(compacted["tensors"]) if compacted is not None else []
                except CorruptionError as e:
                    damaged.append((vid, str(e)))
                    continue
                counted += 1
                tables = {name("state", p) for p, _, _ in references.referencing(recs)}
                for path, record in recs:
                    charge("state", name("state", path), record.nbytes, new_chunks(record), tables)
                for path, kind, ids in self._referenced(txn, vid, recs):
                    sizes = self._record_sizes(txn, kind, set(ids))
                    seen = records_seen.setdefault(kind.database, set())
                    unique = sum(s for i, s in sizes.items() if i not in seen)
                    component = kind.component
                    charge(component, name(component, path), sum(sizes.values()), unique)
                    seen.update(ids)
                ckpt = manifest["checkpoint"] or manifest.get("artifact")  # one or neither
                if ckpt is not None:
                    new = ckpt["file"] not in files
                    charge("model", model, ckpt["nbytes"], ckpt["nbytes"] if new else 0)
                    files.add(ckpt["file"])
                for _, record in weights:
                    charge("model", model, record.nbytes, new_chunks(record))
                size = len(manifest_bytes(manifest))
                charge("manifest", name("manifest", ""), size, size)
        return UsageReport(counted, out, tuple(damaged))

    def _referenced(
        self, txn: lmdb.Transaction, vid: int, recs: list[tuple[str, ArrayRecord]]
    ) -> Iterator[tuple[str, references.ReferenceKind, list[int]]]:
        """The ids each reference array of version ``vid`` holds (engram.store.references)."""
        for path, record, kind in references.referencing(recs):
            yield path, kind, references.referenced_ids(self._blobs, txn, record, vid, path)

    def _record_sizes(
        self, txn: lmdb.Transaction, kind: references.ReferenceKind, ids: set[int]
    ) -> dict[int, int]:
        sizes = {}
        for i in ids:
            value = self._env.get(txn, kind.database, kind.key(i))
            sizes[i] = 0 if value is None else len(value)
        return sizes


def disk_usage(root: Path, run_files: tuple[str, ...] = ()) -> dict[str, int]:
    """Bytes on disk under a store, by top-level entry (allocated, for sparse files):
    ``blobs``, ``checkpoints``, ``lmdb``, ``run_files`` (the entries named in
    ``run_files``: what a runner keeps beside the store) and ``other``."""
    usage = {"blobs": 0, "checkpoints": 0, "lmdb": 0, "other": 0, "run_files": 0}
    bucket = {fmt.BLOB_DIR: "blobs", fmt.CHECKPOINT_DIR: "checkpoints", fmt.LMDB_DIR: "lmdb"}
    for entry in root.iterdir():
        key = bucket.get(entry.name, "run_files" if entry.name in run_files else "other")
        # a link is counted as itself, never walked: it may lead anywhere (even /)
        files = _files_under(entry) if entry.is_dir() and not entry.is_symlink() else [entry]
        for f in files:
            try:
                st = f.lstat()
            except FileNotFoundError:  # removed by a concurrent gc
                continue
            usage[key] += min(st.st_size, st.st_blocks * 512)
    return usage


def _files_under(directory: Path) -> Iterator[Path]:
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            yield Path(dirpath) / name
