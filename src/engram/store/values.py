"""The store's value objects: what its verbs take and return (no I/O here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # an annotation only: the inspection commands import no torch
    import torch

Mode = Literal["r", "w", "c"]
VersionSpec = int | str | None


def version_name(version_id: int) -> str:
    return f"v{version_id:04d}"


@dataclass(frozen=True)
class VersionInfo:
    """Summary of one committed version."""

    id: int
    parent: int | None
    created_at: str
    message: str
    meta: dict[str, Any]
    nbytes: int  # logical bytes of the state and the checkpoint
    new_bytes: int  # bytes this commit actually wrote (new blobs + checkpoint)
    checkpoint: str | None  # None: no model, or its weights were compacted
    tags: tuple[str, ...] = ()
    compacted: bool = False  # model weights delta-coded in the blob store (no plain file)
    artifact: str | None = None  # the model artifact file (e.g. a .skops estimator), if any

    @property
    def name(self) -> str:
        return version_name(self.id)


NEW_VERSION = "new"  # RefMoves.head: the version being committed


@dataclass(frozen=True)
class RefMoves:
    """The refs a commit moves in the one transaction that publishes its version, so
    no crash leaves the version visible and its refs unmoved (the regression gate's
    verdict is atomic with the version it judges).

    Args:
        tags: tags pointed at the new version; ``{version}`` in a name stands for the
            new version's name (``gate-failed-{version}`` -> ``gate-failed-v0007``).
        head: where HEAD goes: the new version (the default), an existing version's
            id (the new version stays off HEAD), or None (HEAD is reset).
    """

    tags: tuple[str, ...] = ()
    head: int | Literal["new"] | None = NEW_VERSION

    def tag_names(self, version_id: int) -> tuple[str, ...]:
        return tuple(t.replace("{version}", version_name(version_id)) for t in self.tags)


@dataclass(frozen=True)
class Snapshot:
    """A loaded version: its summary, the committed state, and the model weights (or,
    for a model committed as an artifact, the artifact file's checked bytes)."""

    version: VersionInfo
    state: dict[str, Any]
    model: dict[str, torch.Tensor] | None
    artifact: bytes | None = None


@dataclass(frozen=True)
class Problem:
    """One integrity problem found by :meth:`Store.verify`."""

    version: int | None
    where: str
    message: str

    def __str__(self) -> str:
        at = version_name(self.version) if self.version is not None else "store"
        return f"{at} {self.where}: {self.message}"


@dataclass
class VerifyReport:
    """Result of :meth:`Store.verify`; truthy when nothing is wrong."""

    versions: list[int] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    # Not problems: e.g. that the store's records predate checksums (formats 1, 2).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class GcReport:
    """What :meth:`Store.gc` removed."""

    versions: tuple[int, ...]
    blobs: int
    blob_bytes: int
    files: tuple[str, ...]
    samples: int = 0  # replay samples no kept version references any more


@dataclass(frozen=True)
class CompactReport:
    """What :meth:`Store.compact` did."""

    versions: tuple[int, ...]  # versions whose blobs and weights were (newly) delta-coded
    blobs: int  # blobs written encoded (or, for weights leaving their file, plain)
    raw_bytes: int  # their size decoded
    stored_bytes: int  # their size as written
    files: tuple[str, ...]  # checkpoint and pack files removed
