"""Model checkpoint files: plain safetensors, written atomically and durably.

A checkpoint is loadable by anyone with ``safetensors`` alone::

    from safetensors.torch import load_file
    weights = load_file("runs/x/checkpoints/model-v0007-exp3.safetensors")

:func:`write_checkpoint` writes the file itself (:func:`safetensors_layout`: the bytes
``safetensors.torch.save_file`` writes, tensors in its order, metadata sorted) so that it
can hash the bytes while they are written instead of reading the file back.

:func:`checkpoint_spans` reads a file's header only: where each tensor's bytes are
(compaction chunks them, and a delta's base can be a span of HEAD's file).
:func:`read_raw_checkpoint` and :func:`save_raw` read and write the tensors' bytes as
they are, without torch (``engram export`` imports none).

Only the functions that take or make tensors import torch (keeps the inspection
commands light): checking a file's hashes and reading its header need none.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash
from safetensors import SafetensorError

from engram.errors import CorruptionError, EncodingError
from engram.store.codec import TENSOR_ITEMSIZES, checksum
from engram.store.files import create_new, open_read
from engram.store.writeback import Writeback

if TYPE_CHECKING:
    import torch


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
    import torch  # only for tensors: keeps the inspection commands (engram ls...) light

    h = xxhash.xxh3_128()
    for name, tensor in weights.items():
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.numel():
            h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def prepare_weights(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors; tensors sharing memory (tied weights) are copied.

    Raises:
        EncodingError: a value is not a tensor, or of a dtype a checkpoint cannot hold
            (before anything is written).
    """
    import torch  # only for tensors: keeps the inspection commands (engram ls...) light

    out: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise EncodingError(
                f"model weight {name!r} is a {type(value).__qualname__}, not a tensor; "
                "pass model.state_dict() or a mapping of tensors"
            )
        _dtype(name, value)
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

    The file's SHA-256 and XXH3 are computed from the tensors' memory by a second
    thread while this one writes the same memory (hashlib and writes release the GIL),
    instead of reading the file back after its fsync: the hashes overlap the write, and
    no page of the file is mapped into this process.
    The caller fsyncs ``directory`` (once for everything a commit wrote there).

    Raises:
        EncodingError: a weight's dtype has no safetensors name.
    """
    header, views = safetensors_layout(weights, metadata)
    final = directory / file
    tmp = directory / f".{file}.tmp-{os.getpid()}"
    fd = create_new(tmp)
    try:
        if sum(len(v) for v in views) <= _INLINE_HASH_BYTES:
            write_safetensors(fd, header, views)
            sha256, xxh = _file_hashes(header, views)
            os.fsync(fd)
        else:
            with ThreadPoolExecutor(1, thread_name_prefix="engram-ckpt-hash") as pool:
                hashes = pool.submit(_file_hashes, header, views)
                try:
                    write_safetensors(fd, header, views)
                    os.fsync(fd)  # while the hashes finish
                finally:  # on an error too: the hashing thread reads the tensors until it ends
                    concurrent.futures.wait([hashes])
                sha256, xxh = hashes.result()
        nbytes = os.fstat(fd).st_size
        os.close(fd)
        fd = -1
        os.replace(tmp, final)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return CheckpointInfo(file, sha256, nbytes, xxh, digest)


def safetensors_layout(
    weights: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[bytes, list[memoryview]]:
    """The safetensors file of ``weights`` as its header bytes and the tensors' bytes
    that follow it, in file order (views of the tensors' memory: nothing is copied).

    The tensors come in the order ``safetensors.torch.save_file`` writes them (asked of
    safetensors itself, for tensors of no bytes); the metadata is written with sorted
    keys (safetensors writes hash-map order), so the same weights give the same file.
    """
    import torch  # only for tensors: keeps the inspection commands (engram ls...) light

    entries, order = {}, _file_order(weights)
    offset = 0
    for name in order:
        tensor = weights[name]
        end = offset + tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _ST_NAMES[_dtype(name, tensor)], "shape": list(tensor.shape),
                         "data_offsets": [offset, end]}  # fmt: skip
        offset = end
    top = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    text = json.dumps({**top, **entries}, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads: the data starts 8-aligned
    views = [
        memoryview(weights[name].reshape(-1).view(torch.uint8).numpy())
        for name in order
        if weights[name].numel()
    ]
    return struct.pack("<Q", len(text)) + text, views


def write_safetensors(fd: int, header: bytes, views: list[memoryview]) -> None:
    """Write a safetensors file's bytes (:func:`safetensors_layout`) to ``fd``, the
    disk starting on them as they come (:class:`Writeback`)."""
    writeback = Writeback(fd)
    _write_all(fd, header)
    end = len(header)
    for view in views:
        for offset in range(0, len(view), _SLICE_BYTES):
            piece = view[offset : offset + _SLICE_BYTES]
            _write_all(fd, piece)
            end += len(piece)
            writeback.wrote(end)


# Weights up to this size are hashed in the writing thread: starting a thread costs a
# GIL hand-off (up to the 5 ms switch interval), more than hashing a few MiB.
_INLINE_HASH_BYTES = 4 << 20
# Hashed and written in slices: both hashes of a slice read it while it is in the CPU's
# cache, and no write is longer than Linux's largest (2 GiB less a page).
_SLICE_BYTES = 1 << 20


def _file_hashes(header: bytes, views: list[memoryview]) -> tuple[str, int]:
    """SHA-256 (hex) and XXH3-64 of the file :func:`write_safetensors` writes."""
    sha, xxh = hashlib.sha256(header), xxhash.xxh3_64(header)
    for view in views:
        for offset in range(0, len(view), _SLICE_BYTES):
            piece = view[offset : offset + _SLICE_BYTES]
            sha.update(piece)
            xxh.update(piece)
    return sha.hexdigest(), xxh.intdigest()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _file_order(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of ``weights`` in the order safetensors writes them: its own
    ``serialize`` of tensors of no bytes (the order depends on dtypes and names only)."""
    from safetensors import serialize

    specs: dict[str, Any]
    try:
        from safetensors import TensorSpec  # safetensors >= 0.8
    except ImportError:  # older ones take the bytes themselves
        specs = {n: {"dtype": _dtype(n, t), "shape": [0], "data": b""} for n, t in weights.items()}
    else:
        specs = {
            n: TensorSpec(dtype=_dtype(n, t), shape=[0], data_ptr=0, data_len=0)
            for n, t in weights.items()
        }
    raw = serialize(specs)
    (n,) = struct.unpack_from("<Q", raw)
    return [name for name in json.loads(raw[8 : 8 + n]) if name != "__metadata__"]


def _dtype(name: str, tensor: torch.Tensor) -> str:
    """The store's name of ``tensor``'s dtype, one a checkpoint file can hold."""
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in _ST_NAMES:
        raise EncodingError(
            f"model weight {name!r} has dtype {tensor.dtype}, which a checkpoint file cannot "
            f"hold; convert it to one of {', '.join(sorted(_ST_NAMES))}"
        )
    return dtype


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_checkpoint(path: Path, info: CheckpointInfo, *, verify: bool, what: str) -> dict:
    """Load the weights of a checkpoint file, checking it against its manifest entry.

    The XXH3 checksum is always checked; ``verify=True`` also re-checks SHA-256. The file
    is opened once: the bytes checked are the bytes decoded, even if a concurrent ``gc``
    unlinks or a rename replaces the name meanwhile (the open descriptor keeps the file).

    Raises:
        CorruptionError: the file is missing, truncated, or its bytes do not match.
    """
    from safetensors.torch import load as st_load  # imports torch: tensors only
    from safetensors.torch import load_file as st_load_file

    try:
        with open_read(path) as f:  # never a link, never a FIFO (it would block)
            _check_open(f, path, info, verify=verify, what=what)
            by_fd = Path(f"/proc/self/fd/{f.fileno()}")
            try:
                if by_fd.exists():  # Linux: safetensors opens this very file again
                    return st_load_file(by_fd)
                f.seek(0)
                return st_load(f.read())
            except (SafetensorError, ValueError) as e:
                raise CorruptionError(
                    f"{what}: checkpoint {path.name} is not valid safetensors: {e}"
                ) from e
    except FileNotFoundError:
        raise CorruptionError(f"{what}: checkpoint file {path} is missing") from None


def read_raw_checkpoint(
    path: Path, info: CheckpointInfo, *, verify: bool, what: str
) -> dict[str, RawTensor]:
    """The tensors of a checkpoint file as their stored bytes, in file order, checked
    as :func:`read_checkpoint` checks them; reads no torch.

    Raises:
        CorruptionError: the file is missing, truncated, or its bytes do not match.
    """
    try:
        with open_read(path) as f:  # one open: the bytes checked are the bytes read
            _check_open(f, path, info, verify=verify, what=what)
            spans, _ = _read_spans(f, f"{what}: checkpoint {path.name}")
            weights = {}
            for span in spans:
                f.seek(span.offset)
                data = np.empty(span.nbytes, dtype=np.uint8)
                if f.readinto(data) != span.nbytes:  # the size was checked: only a race
                    raise CorruptionError(f"{what}: checkpoint {path.name} changed while read")
                weights[span.name] = RawTensor(span.dtype, span.shape, data)
            return weights
    except FileNotFoundError:
        raise CorruptionError(f"{what}: checkpoint file {path} is missing") from None


def save_raw(weights: Mapping[str, RawTensor], path: Path, metadata: dict[str, str]) -> None:
    """Write ``weights`` to a safetensors file at ``path``: the bytes
    ``safetensors.torch.save_file`` writes for the same tensors, without torch."""
    from safetensors import serialize_file

    try:
        from safetensors import TensorSpec  # safetensors >= 0.8 takes the bytes by pointer
    except ImportError:  # older ones take the bytes themselves
        specs: dict[str, Any] = {
            name: {"dtype": t.dtype, "shape": list(t.shape), "data": t.data.tobytes()}
            for name, t in weights.items()
        }
    else:
        specs = {
            name: TensorSpec(
                dtype=t.dtype,
                shape=list(t.shape),
                data_ptr=t.data.ctypes.data,
                data_len=t.data.nbytes,
            )
            for name, t in weights.items()
        }
    serialize_file(specs, path, metadata=metadata)  # ``weights`` keeps the pointed bytes alive


def check_file(path: Path, info: CheckpointInfo, *, what: str, sha256: bool = True) -> None:
    """Re-hash a checkpoint file (XXH3, and SHA-256 unless told not) without decoding it."""
    try:
        with open_read(path) as f:
            _check_open(f, path, info, verify=sha256, what=what)
    except FileNotFoundError:
        raise CorruptionError(f"{what}: checkpoint file {path} is missing") from None


def _check_open(f: Any, path: Path, info: CheckpointInfo, *, verify: bool, what: str) -> None:
    size = os.fstat(f.fileno()).st_size
    if size != info.nbytes:
        raise CorruptionError(
            f"{what}: checkpoint {path.name} has {size} bytes, the manifest says "
            f"{info.nbytes}; the file was truncated or replaced"
        )
    # mmap, not read(): the checksum runs straight over the page cache.
    empty = contextlib.nullcontext(b"")  # mmap refuses an empty file
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else empty as mm:
        if checksum(mm) != info.xxh3 or (verify and hashlib.sha256(mm).hexdigest() != info.sha256):
            raise CorruptionError(
                f"{what}: checkpoint {path.name} does not match its recorded hash; "
                "the file is corrupted. Roll back to an earlier version or restore it."
            )


@dataclass(frozen=True)
class RawTensor:
    """A tensor's stored bytes, read without torch (:func:`read_raw_checkpoint`)."""

    dtype: str  # the store's dtype name (torch's, safetensors' TensorSpec's)
    shape: tuple[int, ...]
    data: np.ndarray  # (nbytes,) uint8, C order, little-endian


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor's bytes are in a safetensors file."""

    name: str
    dtype: str  # the store's dtype name
    shape: tuple[int, ...]
    offset: int
    nbytes: int


# safetensors' dtype names → the store's (codec.TENSOR_ITEMSIZES); what torch writes.
_ST_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32",
    "I64": "int64", "U16": "uint16", "U32": "uint32", "U64": "uint64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}  # fmt: skip
_ST_NAMES = {name: st for st, name in _ST_DTYPES.items()}  # the store's -> safetensors'


# safetensors refuses a header over 100 MB (``MAX_HEADER_SIZE`` in its Rust source);
# this parser reads headers of files safetensors itself never opened, so it applies
# the same cap before it reads (a hostile length must not become a 16 EiB read).
MAX_HEADER_BYTES = 100_000_000


def checkpoint_spans(path: Path) -> tuple[list[TensorSpan], dict[str, str]]:
    """The tensors of a safetensors file, in file order, and its ``__metadata__``.

    Validates what safetensors validates before anything is trusted: the header's
    length (capped), that each tensor's byte count is its shape times its dtype's
    size, and that the tensors tile the data section exactly (no overlap, no gap).
    Long because it is a flat list of independent checks of untrusted bytes.

    Raises:
        CorruptionError: the header is malformed or names a dtype the store lacks.
    """
    what = f"checkpoint {path.name}"
    try:
        with open_read(path) as f:
            return _read_spans(f, what)
    except FileNotFoundError:
        raise CorruptionError(f"{what} is missing") from None


def _read_spans(f: Any, what: str) -> tuple[list[TensorSpan], dict[str, str]]:
    """:func:`checkpoint_spans` of an open file; ``what`` names it in errors."""
    f.seek(0)
    size = os.fstat(f.fileno()).st_size
    try:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise CorruptionError(f"{what}: header of {n} bytes exceeds the 100 MB cap")
        if n > size - 8:
            raise CorruptionError(f"{what}: header longer than the file")
        header = json.loads(f.read(n))
    except (struct.error, ValueError, RecursionError) as e:
        raise CorruptionError(f"{what}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CorruptionError(f"{what}: malformed safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptionError(f"{what}: __metadata__ is not a map of strings")
    spans = []
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            if not all(
                isinstance(x, int) and not isinstance(x, bool) for x in (begin, end, *shape)
            ):
                raise TypeError
            if min(shape, default=0) < 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CorruptionError(f"{what}: cannot compact tensor {name!r}") from None
        span = TensorSpan(name, dtype, shape, 8 + n + begin, end - begin)
        if not 0 <= 8 + n <= span.offset <= span.offset + span.nbytes <= size:
            raise CorruptionError(f"{what}: tensor {name!r} lies outside the file")
        numel = 1
        for x in shape:
            numel *= x
        if numel * TENSOR_ITEMSIZES[dtype] != span.nbytes:
            raise CorruptionError(
                f"{what}: tensor {name!r} holds {span.nbytes} bytes, its shape needs "
                f"{numel * TENSOR_ITEMSIZES[dtype]}"
            )
        spans.append(span)
    spans.sort(key=lambda s: (s.offset, s.nbytes))  # the order safetensors' load_file returns
    at = 8 + n
    for span in spans:  # safetensors' own rule: the tensors tile the data section
        if span.offset != at:
            raise CorruptionError(f"{what}: tensor {span.name!r} overlaps another or leaves a gap")
        at += span.nbytes
    if at != size:
        raise CorruptionError(f"{what}: {size - at} bytes after the last tensor")
    return spans, metadata
