"""Model checkpoint files: plain safetensors, written atomically and durably.

A checkpoint is loadable by anyone with ``safetensors`` alone::

    from safetensors.torch import load_file
    weights = load_file("runs/x/checkpoints/model-v0007-exp3.safetensors")
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

from engram.errors import CorruptionError, EncodingError
from engram.store.codec import checksum


@dataclass(frozen=True)
class CheckpointInfo:
    """What a manifest records about a checkpoint file."""

    file: str
    sha256: str  # of the whole file, as `sha256sum` prints it
    nbytes: int
    xxh3: int  # XXH3-64 of the whole file, checked on every load
    weights: str  # XXH3-128 of the tensors alone (names, dtypes, shapes, bytes)

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "nbytes": self.nbytes,
            "xxh3": self.xxh3,
            "weights": self.weights,
        }


def weights_digest(weights: Mapping[str, torch.Tensor]) -> str:
    """XXH3-128 of the tensors' names, dtypes, shapes and bytes (not the file's metadata).

    Equal digests mean equal weights, so a version whose model did not change since
    its parent shares the parent's checkpoint file instead of writing a copy. Only a
    version's parent is compared, so no birthday bound applies to the 128 bits.
    """
    h = xxhash.xxh3_128()
    for name, tensor in weights.items():
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def prepare_weights(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors; tensors sharing memory (tied weights) are copied."""
    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise EncodingError(
                f"model weight {name!r} is a {type(value).__qualname__}, not a tensor; "
                "pass model.state_dict() or a mapping of tensors"
            )
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen_storage and t.numel() > 0:
            t = t.clone()
        seen_storage.add(ptr)
        out[name] = t
    return out


def write_checkpoint(
    directory: Path,
    file: str,
    weights: dict[str, torch.Tensor],
    metadata: dict[str, str],
    digest: str,
) -> CheckpointInfo:
    """Write ``weights`` to ``directory/file`` atomically: temp file, fsync, rename.

    The caller fsyncs ``directory`` (once for everything a commit wrote there).
    """
    final = directory / file
    tmp = directory / f".{file}.tmp-{os.getpid()}"
    try:
        # save_file streams tensor by tensor; save() would build the whole file in memory.
        try:
            st_save_file(weights, tmp, metadata=metadata)
        except SafetensorError as e:  # how safetensors reports I/O errors (disk full, EFBIG)
            raise OSError(f"cannot write checkpoint {tmp.name}: {e}") from e
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
            nbytes = os.fstat(f.fileno()).st_size
            with (
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm,
                ThreadPoolExecutor(1) as pool,  # both hashes release the GIL
            ):
                sha = pool.submit(lambda: hashlib.sha256(mm).hexdigest())
                xxh = checksum(mm)
                sha256 = sha.result()
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return CheckpointInfo(file, sha256, nbytes, xxh, digest)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path, info: CheckpointInfo, *, verify: bool, what: str) -> dict:
    """Load the weights of a checkpoint file, checking it against its manifest entry.

    The XXH3 checksum is always checked; ``verify=True`` also re-checks SHA-256.

    Raises:
        CorruptionError: the file is missing, truncated, or its bytes do not match.
    """
    _check(path, info, verify=verify, what=what)
    try:
        return st_load_file(path)
    except (SafetensorError, ValueError) as e:
        raise CorruptionError(
            f"{what}: checkpoint {path.name} is not valid safetensors: {e}"
        ) from e


def check_file(path: Path, info: CheckpointInfo, *, what: str) -> None:
    """Re-hash a checkpoint file (SHA-256 and XXH3) without decoding it."""
    _check(path, info, verify=True, what=what)


def _check(path: Path, info: CheckpointInfo, *, verify: bool, what: str) -> None:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != info.nbytes:
                raise CorruptionError(
                    f"{what}: checkpoint {path.name} has {size} bytes, the manifest says "
                    f"{info.nbytes}; the file was truncated or replaced"
                )
            # mmap, not read(): the checksum runs straight over the page cache.
            empty = contextlib.nullcontext(b"")  # mmap refuses an empty file
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else empty as mm:
                if checksum(mm) != info.xxh3 or (
                    verify and hashlib.sha256(mm).hexdigest() != info.sha256
                ):
                    raise CorruptionError(
                        f"{what}: checkpoint {path.name} does not match its recorded hash; "
                        "the file is corrupted. Roll back to an earlier version or restore it."
                    )
    except FileNotFoundError:
        raise CorruptionError(f"{what}: checkpoint file {path} is missing") from None
