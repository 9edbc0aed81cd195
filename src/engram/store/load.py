"""Reading a version back: its state and model weights, and a plain-file export.

Loading tensors imports torch; a ``raw`` load reads the stored bytes without it: a
model's (:func:`raw_weights`, ``engram export``), or a whole version's
(:meth:`~engram.store.inspect.Inspector.raw_snapshot`, ``engram diff``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from engram.errors import CorruptionError, EngramError, LockTableReplacedError
from engram.store import format as fmt
from engram.store.artifact import ArtifactInfo, read_artifact
from engram.store.blobs import Blobs
from engram.store.checkpoint import (
    CheckpointInfo,
    RawTensor,
    checkpoint_spans,
    fsync_dir,
    read_checkpoint,
    read_raw_checkpoint,
    weights_digest,
    write_checkpoint,
)
from engram.store.codec import ArrayRecord, decode_tree, iter_array_records
from engram.store.env import Env
from engram.store.history import History, version_info
from engram.store.values import Snapshot, VersionSpec, version_name

_LOAD_TRIES = 4


def load(
    env: Env,
    history: History,
    blobs: Blobs,
    version: VersionSpec,
    *,
    state: bool,
    model: bool,
    verify: bool,
    raw: bool = False,
) -> Snapshot:
    """:meth:`Store.load <engram.store.Store.load>`: one consistent read, retried only
    when a write happened while it ran. ``raw``: every array (the state's and
    the model's) as a :class:`~engram.store.checkpoint.RawTensor`, read without torch."""
    for _ in range(_LOAD_TRIES - 1):
        seen: list[int] = []  # the id of the snapshot the try read
        try:
            return _load(env, history, blobs, version, state, model, verify, seen, raw)
        except LockTableReplacedError:
            continue  # the next try reads through a fresh lock table
        except CorruptionError:
            # A concurrent gc may have moved or dropped packs (or a checkpoint file)
            # after the snapshot this try read: another try sees the new index (or no
            # such version). With no write after that snapshot, the bytes really are
            # damaged: one more full read would fail the same way. (The snapshot's own
            # id, not last_txnid read beforehand: LMDB may hand a reader an older one.)
            if seen and env.last_txnid() <= seen[0]:
                raise
    return _load(env, history, blobs, version, state, model, verify, [], raw)


def raw_weights(
    env: Env, history: History, blobs: Blobs, version: VersionSpec, *, verify: bool
) -> dict[str, RawTensor] | None:
    """:meth:`Store.raw_weights <engram.store.Store.raw_weights>`."""
    return load(
        env, history, blobs, version, state=False, model=True, verify=verify, raw=True
    ).model


def _raw_array(
    blobs: Blobs, txn: Any, record: ArrayRecord, vid: int, path: str, verify: bool
) -> RawTensor:
    """One compacted weight's bytes, checked as :meth:`Blobs.read_array` checks them."""
    data = np.empty(record.nbytes, dtype=np.uint8)
    blobs.read_into(txn, record, vid, path, verify, data)
    return RawTensor(record.dtype, record.shape, data)


def _load(
    env: Env,
    history: History,
    blobs: Blobs,
    version: VersionSpec,
    state: bool,
    model: bool,
    verify: bool,
    seen: list[int],
    raw: bool,
) -> Snapshot:
    """One try of :func:`load`: state and compacted weights in one read transaction,
    then a plain checkpoint file. Appends the transaction's snapshot id to ``seen``."""
    with env.read() as txn:
        seen.append(txn.id())
        vid = history.resolve(txn, version)
        manifest = history.manifest(txn, vid)
        info = version_info(manifest, history.tags(txn))
        loaded_state: dict[str, Any] = {}
        read = _raw_array if raw else Blobs.read_array
        if state:
            _check_memory(sum(r.nbytes for r in iter_array_records(manifest["state"])), vid)
            loaded_state = decode_tree(
                manifest["state"],
                lambda record, path: read(blobs, txn, record, vid, path, verify),
            )
        compacted = manifest.get("model")
        if model and compacted is not None:
            # As for the state: the sizes a manifest claims are checked before allocating.
            _check_memory(sum(r.nbytes for r in iter_array_records(compacted["tensors"])), vid)
            weights = decode_tree(
                compacted["tensors"],
                lambda record, path: read(blobs, txn, record, vid, f"model{path}", verify),
            )
            return Snapshot(info, loaded_state, weights)
    weights = None
    if model and manifest.get("artifact") is not None:
        art = ArtifactInfo(**manifest["artifact"])
        data = read_artifact(
            env.path / fmt.CHECKPOINT_DIR / art.file,
            art,
            verify=verify,
            what=f"{env.path} {version_name(vid)}",
        )
        return Snapshot(info, loaded_state, None, data)
    if model and manifest["checkpoint"] is not None:
        ckpt = CheckpointInfo(**manifest["checkpoint"])
        weights = (read_raw_checkpoint if raw else read_checkpoint)(
            env.path / fmt.CHECKPOINT_DIR / ckpt.file,
            ckpt,
            verify=verify,
            what=f"{env.path} {version_name(vid)}",
        )
    return Snapshot(info, loaded_state, weights)


def export_checkpoint(
    env: Env, history: History, blobs: Blobs, version: VersionSpec, path: str | os.PathLike[str]
) -> CheckpointInfo | None:
    """:meth:`Store.export_checkpoint <engram.store.Store.export_checkpoint>`."""
    snap = load(env, history, blobs, version, state=False, model=True, verify=False)
    if snap.model is None:
        return None
    with env.read() as txn:
        manifest = history.manifest(txn, snap.version.id)
    if manifest.get("model") is not None:
        metadata = manifest["model"]["metadata"]
    else:
        _, metadata = checkpoint_spans(env.path / fmt.CHECKPOINT_DIR / snap.version.checkpoint)
    dest = Path(path)
    digest = weights_digest(snap.model)
    info = write_checkpoint(dest.parent, dest.name, snap.model, metadata, digest)
    fsync_dir(dest.parent)
    return info


def _check_memory(nbytes: int, vid: int) -> None:
    """Refuse a load that could not fit in memory instead of letting the OS kill us."""
    try:
        with open("/proc/meminfo") as f:
            available = next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration, ValueError, IndexError):
        return
    if nbytes > available:
        raise EngramError(
            f"{version_name(vid)} holds {nbytes / 2**30:.1f} GiB of state, more than the "
            f"{available / 2**30:.1f} GiB of memory available; load it with state=False or on "
            "a larger machine"
        )
