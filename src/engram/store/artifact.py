"""Model artifact files: a version's model as one opaque file in a named format.

A model that is not a set of tensors (a scikit-learn estimator, written with
``skops.io``) is committed as an *artifact*: its bytes, in a file named like the
checkpoints beside it (``checkpoints/model-v0007-exp3.skops``), written atomically
and durably, hashed into the manifest (``"artifact"``; :mod:`engram.store.format`).
The store never parses it: turning the bytes back into a model is the job of the
room that made them (:mod:`engram.sklearn.persist` for ``skops``, through an
allowlist), so a store from an untrusted source can be opened and verified without
executing anything from it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from engram.errors import CorruptionError, EncodingError
from engram.store import format as fmt
from engram.store.codec import checksum
from engram.store.files import create_new, open_read
from engram.store.history import is_count
from engram.store.values import version_name


@dataclass(frozen=True)
class Artifact:
    """What a commit is given: the file's format (its suffix) and its bytes."""

    format: str  # one of format.ARTIFACT_FORMATS
    data: bytes

    def __post_init__(self) -> None:
        if self.format not in fmt.ARTIFACT_FORMATS:
            raise EncodingError(
                f"unknown artifact format {self.format!r}; known: {', '.join(fmt.ARTIFACT_FORMATS)}"
            )
        if not isinstance(self.data, bytes | bytearray | memoryview):
            raise EncodingError(f"artifact data must be bytes, not {type(self.data).__name__}")


@dataclass(frozen=True)
class ArtifactInfo:
    """What a manifest records about an artifact file."""

    file: str
    format: str
    sha256: str  # of the whole file, as `sha256sum` prints it
    nbytes: int
    xxh3: int  # XXH3-64 of the whole file, checked on every load

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "format": self.format,
            "sha256": self.sha256,
            "nbytes": self.nbytes,
            "xxh3": self.xxh3,
        }


def write_artifact(directory: Path, file: str, artifact: Artifact) -> ArtifactInfo:
    """Write the bytes to ``directory/file`` atomically: temp file, fsync, rename.

    The caller fsyncs ``directory`` (once for everything a commit wrote there).
    """
    data = bytes(artifact.data)
    final, tmp = directory / file, directory / f".{file}.tmp-{os.getpid()}"
    try:
        with os.fdopen(create_new(tmp), "wb") as f:  # never through a planted link
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sha256 = hashlib.sha256(data).hexdigest()
    return ArtifactInfo(file, artifact.format, sha256, len(data), checksum(data))


def read_artifact(path: Path, info: ArtifactInfo, *, verify: bool, what: str) -> bytes:
    """The file's bytes, checked against the manifest (XXH3; SHA-256 too if ``verify``).

    Raises:
        CorruptionError: the file is missing, truncated, or its bytes do not match.
    """
    try:
        with open_read(path) as f:  # never a link, never a FIFO (it would block)
            data = f.read(info.nbytes + 1)  # one more: a longer file is caught too
    except FileNotFoundError:
        raise CorruptionError(f"{what}: model file {path} is missing") from None
    if len(data) != info.nbytes:
        raise CorruptionError(
            f"{what}: model file {path.name} has {len(data)} bytes, the manifest says "
            f"{info.nbytes}; the file was truncated or replaced"
        )
    if checksum(data) != info.xxh3 or (verify and hashlib.sha256(data).hexdigest() != info.sha256):
        raise CorruptionError(
            f"{what}: model file {path.name} does not match its recorded hash; the file is "
            "corrupted. Roll back to an earlier version or restore it."
        )
    return data


def model_file_name(version_id: int, experience: object, suffix: str) -> str:
    """``model-v0007-exp3.<suffix>``: the name of a new version's checkpoint or artifact
    file (``experience``: its ``meta["experience"]``, named when it is a count)."""
    name = f"model-{version_name(version_id)}"
    if is_count(experience):
        name += f"-exp{experience}"
    return f"{name}.{suffix}"
