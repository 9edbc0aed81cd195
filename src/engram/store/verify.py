"""Integrity checks: re-hash what versions reference, and (``all``) the whole index."""

from __future__ import annotations

import os

import lmdb

from engram.errors import CorruptionError, DamagedDatabaseError, StoreFormatError
from engram.store import format as fmt
from engram.store import references
from engram.store.artifact import ArtifactInfo, read_artifact
from engram.store.blobs import Blobs, EncodedBlob, chunk_problem, decode_entry
from engram.store.checkpoint import CheckpointInfo, check_file
from engram.store.env import Env
from engram.store.history import History, version_arrays
from engram.store.signing import TrustedKey, load_trusted, signature_problem
from engram.store.values import Problem, VerifyReport, VersionSpec, version_name


def verify(
    env: Env,
    history: History,
    blobs: Blobs,
    version: VersionSpec,
    *,
    all: bool,
    trust: str | os.PathLike[str] | TrustedKey | None = None,
) -> VerifyReport:
    """:meth:`Store.verify <engram.store.Store.verify>`; never raises for corruption
    (a ``trust`` key that cannot be read raises, before anything is checked)."""
    trusted = None if trust is None else load_trusted(trust)
    try:
        return _verify(env, history, blobs, version, all=all, trusted=trusted)
    except (lmdb.Error, DamagedDatabaseError) as e:  # LMDB's page checks (MDB_CORRUPTED, ...)
        lmdb_error = e.__cause__ if isinstance(e, DamagedDatabaseError) else e
        report = VerifyReport()
        report.problems.append(Problem(None, "LMDB", f"the database is damaged: {lmdb_error}"))
        return report


def _verify(
    env: Env,
    history: History,
    blobs: Blobs,
    version: VersionSpec,
    *,
    all: bool,
    trusted: TrustedKey | None,
) -> VerifyReport:
    report = VerifyReport()
    checked: set[str] = set()  # digests and checkpoint files found intact
    rooted: set[int] = set()
    with env.read() as txn:
        ids = history.ids(txn) if all else [history.resolve(txn, version)]
        for vid in ids:
            report.versions.append(vid)
            _verify_version(env, history, blobs, txn, vid, report, checked)
            if trusted is not None:
                _verify_signature(env, history, txn, vid, trusted, report)
            problem = history.ancestry_problem(txn, vid, rooted)
            if problem is not None:
                report.problems.append(problem)
        if all:
            _verify_index(blobs, txn, report, checked)
            for db, _key, problem in env.damaged_records(txn):
                report.problems.append(Problem(None, f"record {db.decode()}", problem))
    if not env.sealed:
        report.notes.append(
            f"the store's LMDB records predate checksums (format {env.format_version}): "
            f"manifests, refs and replay samples are unchecked; `engram upgrade {env.path}` "
            "seals them"
        )
    return report


def _verify_version(
    env: Env,
    history: History,
    blobs: Blobs,
    txn: lmdb.Transaction,
    vid: int,
    report: VerifyReport,
    checked: set[str],
) -> None:
    """Add version ``vid``'s problems to ``report`` (``checked``: chunks already read).
    Long because it checks, in order, the manifest, its arrays, checkpoint and artifact."""
    try:
        manifest = history.manifest(txn, vid)
        records = version_arrays(manifest)
    except (CorruptionError, StoreFormatError) as e:
        report.problems.append(Problem(vid, "manifest", str(e)))
        return
    for path, record in records:
        for digest, size, check in record.chunks:
            if digest in checked:
                continue
            try:
                problem = chunk_problem(blobs.blob(txn, digest), digest, size, check, True)
            except CorruptionError as e:
                problem = str(e)
            if problem:
                report.problems.append(Problem(vid, path, problem))
            else:
                checked.add(digest)
                report.blobs += 1
                report.bytes += size
        kind = references.kind_of(record)  # the records it names, in their database
        if kind is not None and not any(p.version == vid for p in report.problems):
            missing, damaged = [], []
            for i in references.referenced_ids(blobs, txn, record, vid, path):
                try:
                    if env.get(txn, kind.database, kind.key(i)) is None:
                        missing.append(i)
                except CorruptionError:
                    damaged.append(i)
            if missing:
                why = f"{len(missing)} {kind.noun}s missing, e.g. {missing[0]}"
                report.problems.append(Problem(vid, path, why))
            if damaged:
                why = f"{len(damaged)} {kind.noun}s fail their checksum, e.g. {damaged[0]}"
                report.problems.append(Problem(vid, path, why))
    if manifest.get("artifact") is not None:
        art = ArtifactInfo(**manifest["artifact"])
        try:
            read_artifact(env.path / fmt.CHECKPOINT_DIR / art.file, art, verify=True,
                          what=version_name(vid))  # fmt: skip
            report.bytes += art.nbytes
        except CorruptionError as e:
            report.problems.append(Problem(vid, art.file, str(e)))
    if manifest["checkpoint"] is not None and manifest["checkpoint"]["file"] not in checked:
        ckpt = CheckpointInfo(**manifest["checkpoint"])
        try:
            check_file(env.path / fmt.CHECKPOINT_DIR / ckpt.file, ckpt, what=version_name(vid))
            report.bytes += ckpt.nbytes
            checked.add(ckpt.file)  # shared by versions whose weights did not change
        except CorruptionError as e:
            report.problems.append(Problem(vid, ckpt.file, str(e)))


def _verify_signature(
    env: Env,
    history: History,
    txn: lmdb.Transaction,
    vid: int,
    trusted: TrustedKey,
    report: VerifyReport,
) -> None:
    try:
        manifest = history.manifest(txn, vid)
    except (CorruptionError, StoreFormatError):
        return  # reported as the manifest's problem already
    problem = signature_problem(env, txn, manifest, trusted)
    if problem is not None:
        report.problems.append(Problem(vid, "signature", problem))


def _verify_index(
    blobs: Blobs, txn: lmdb.Transaction, report: VerifyReport, checked: set[str]
) -> None:
    """Every indexed blob not checked yet, referenced or not."""
    for key, entry in blobs.raw_entries(txn, skip_damaged=True):  # reported as records
        digest = key.hex()
        if digest in checked:
            continue
        try:
            location = decode_entry(entry, digest)
            view = blobs.entry_bytes(txn, location, digest)
            check = None if isinstance(location, EncodedBlob) else location.xxh3
            problem = chunk_problem(view, digest, location.nbytes, check, True)
        except CorruptionError as e:
            problem = str(e)
        if problem:
            report.problems.append(Problem(None, f"blob {digest[:12]}", problem))
        else:
            report.blobs += 1
            report.bytes += location.nbytes
