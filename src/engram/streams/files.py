"""``files``: your own data, one ``.npz`` file per experience — the "new data arrived" path.

A directory of ``*.npz`` files, taken in name order (``000-first.npz``, ``001-...``);
file i is experience i. Each file holds:

* ``x``: ``(N, ...)`` inputs of any shape (flat vectors, images), a numeric dtype;
  integers are converted to float32 (``uint8`` is scaled by 1/255);
* ``y``: ``(N,)`` integer class labels in ``[0, n_classes)``; without ``n_classes``,
  below :data:`MAX_CLASSES`;
* ``task`` (optional): the experience's non-negative integer task label, below
  :data:`MAX_TASKS`: a scalar, or ``(N,)`` holding one value (a file is one experience,
  of one task);
* ``x_test`` and ``y_test`` (optional, both or neither): the experience's test split;
  without them a seeded ``test_fraction`` of ``x, y`` is held out.

Other arrays in a file are ignored (never decompressed). Adding a file and re-running the
same command trains exactly the new experience. Every file is checked before anything
is trained, so a malformed one stops the run with a one-line :class:`DataFileError`
naming the file and the problem, and the store is left untouched. Checks run in two
passes: first the zip directory and each array's ``.npy`` header (shape, dtype — no
data decompressed), which bounds what reading will cost (``max_bytes``, the compression
ratio); then the arrays are read, without pickle.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engram.errors import DataFileError  # DataFileError: importable from here too

# Without benchmark.n_classes the model gets one output per label up to the largest: a
# stray label of 10**6 would silently build a ~1 GB model, 2**40 a petabyte one.
MAX_CLASSES = 100_000
MAX_TASKS = 100_000  # task labels name heads; a label beyond this is a mistake
# Default memory ceiling for the loaded data: fixed, so the same files are accepted on
# every machine (a store resumes anywhere); load_files(max_bytes=...) changes it.
MAX_BYTES = 8 * 2**30
# An array that decompresses to more than _RATIO_MIN_BYTES at more than _MAX_RATIO times
# its compressed size is refused as a possible zip bomb (real data rarely exceeds ~20x).
_MAX_RATIO = 100
_RATIO_MIN_BYTES = 64 * 2**20
_KEYS = ("x", "y", "task", "x_test", "y_test")
_INPUTS = ("x", "x_test")  # kept as float32; labels as int64


@dataclass(frozen=True)
class Experience:
    name: str  # the file name
    digest: str  # xxh3-64 of the file's bytes: a trained file must not change
    x: np.ndarray  # (N, ...) float32
    y: np.ndarray  # (N,) int64
    task: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    task_test: np.ndarray


@dataclass(frozen=True)
class FilesData:
    experiences: list[Experience]
    input_shape: tuple[int, ...]
    n_classes: int
    task_labels: bool  # some file gives task labels


@dataclass(frozen=True)
class _Member:
    """One array of a file as its zip directory entry and ``.npy`` header declare it."""

    key: str  # x, y, ...
    name: str  # the zip member, x.npy
    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype
    offset: int  # bytes of .npy header before the data
    file_size: int  # uncompressed, from the zip directory

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def loaded_bytes(self) -> int:
        """Bytes once converted: float32 inputs, int64 labels."""
        return self.count * (4 if self.key in _INPUTS else 8)


def load_files(
    path: str | Path,
    *,
    n_classes: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_bytes: int = MAX_BYTES,
) -> FilesData:
    """Read and check every ``.npz`` file of ``path``.

    Args:
        n_classes: the number of classes the model is built for; labels must be below
            it. None: one more than the largest label in the files (at most
            :data:`MAX_CLASSES`).
        test_fraction: held out of ``x, y`` for files without ``x_test, y_test``.
        seed: with the file name, seeds which samples are held out.
        max_bytes: the most memory the loaded data may take (estimated from the
            headers, before anything is decompressed).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataFileError(f"benchmark.path {root} is not a directory of .npz files")
    files = sorted(p for p in root.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        raise DataFileError(f"no .npz files in {root}: add one per experience with arrays x and y")
    if not 0.0 < test_fraction < 1.0:
        raise DataFileError(f"benchmark.test_fraction must be in (0, 1), not {test_fraction}")
    if n_classes is not None and (not isinstance(n_classes, int) or n_classes < 1):
        raise DataFileError(f"benchmark.n_classes must be a positive integer, not {n_classes!r}")
    # 1. the zip directories and .npy headers only: nothing is decompressed yet
    declared = {file: _declared(file) for file in files}
    _check_memory(declared, max_bytes)
    # 2. the data
    experiences = []
    for file in files:
        digest, arrays = _read(file, declared[file])
        experiences.append(_experience(file.name, digest, arrays, test_fraction, seed, n_classes))
    shapes = {e.x.shape[1:] for e in experiences} | {e.x_test.shape[1:] for e in experiences}
    if len(shapes) > 1:
        detail = ", ".join(f"{e.name}: {list(e.x.shape[1:])}" for e in experiences)
        raise DataFileError(f"the files' inputs differ in shape ({detail}); they must agree")
    if n_classes is None:
        n_classes = 1 + max(int(max(e.y.max(), e.y_test.max())) for e in experiences)
    task_labels = any(bool(e.task.any()) or bool(e.task_test.any()) for e in experiences)
    return FilesData(experiences, tuple(int(d) for d in shapes.pop()), n_classes, task_labels)


def _size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _declared(file: Path) -> dict[str, _Member]:
    """The arrays ``file`` declares, checked against each other and the zip directory."""

    def fail(why: str) -> DataFileError:
        return DataFileError(f"{file.name}: {why}")

    members: dict[str, _Member] = {}
    try:
        with open(file, "rb") as f:
            if f.read(2) != b"PK":
                raise fail("not a readable .npz file (not a zip archive)")
        with zipfile.ZipFile(file) as zf:
            names = zf.namelist()
            for key in _KEYS:
                if f"{key}.npy" in names:
                    members[key] = _header(zf, zf.getinfo(f"{key}.npy"), fail)
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as e:
        raise fail(f"not a readable .npz file ({e})") from None
    for key in ("x", "y"):
        if key not in members:
            has = ", ".join(sorted(n.removesuffix(".npy") for n in names)) or "nothing"
            raise fail(f"missing array {key!r} (has: {has})")
    if ("x_test" in members) != ("y_test" in members):
        raise fail("give both x_test and y_test, or neither")
    return members


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, fail: Any) -> _Member:
    from numpy.lib import format as npy

    if info.flag_bits & 0x1:
        raise fail(f"{info.filename} is encrypted")
    key = info.filename.removesuffix(".npy")
    # zipfile decompresses a bzip2 or LZMA block whole, however little is read (only
    # deflate is read with a bound): a 1 KiB block of zeros is 200 MiB in memory at the
    # first read of the header. numpy writes stored and deflated members only.
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise fail(
            f"{info.filename} is compressed with method {info.compress_type}, not stored or "
            "deflated: write it with numpy.savez or numpy.savez_compressed"
        )
    # Checked before anything is read. The directory's compressed size may lie: a
    # member's compressed bytes are at most the archive's, which the disk does not lie about.
    compressed = min(info.compress_size, os.path.getsize(zf.filename))
    if info.file_size > _RATIO_MIN_BYTES and info.file_size > _MAX_RATIO * compressed:
        raise fail(
            f"{key} would expand from {_size(compressed)} to {_size(info.file_size)} "
            f"(over {_MAX_RATIO}x) when decompressed: refused as a possible zip bomb. If the "
            "data really is this redundant, save it uncompressed (numpy.savez)"
        )
    with zf.open(info) as fp:
        try:
            version = npy.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = npy.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = npy.read_array_header_2_0(fp)
            else:
                raise ValueError(f".npy format version {version} (save with numpy.savez)")
        except ValueError as e:
            raise fail(f"{info.filename} is not a readable .npy array ({e})") from None
        offset = fp.tell()
    if any(not isinstance(d, int) or d < 0 for d in shape):
        raise fail(f"{info.filename} declares an impossible shape {list(shape)}")
    if dtype.hasobject:
        raise fail(f"cannot be read without pickle ({key} holds Python objects, {dtype})")
    member = _Member(key, info.filename, tuple(shape), fortran, dtype, offset, info.file_size)
    data = member.count * dtype.itemsize
    if info.file_size != offset + data:
        raise fail(
            f"{key} declares shape {list(shape)} {dtype} ({_size(data)} of data) but the "
            f"archive holds {_size(max(info.file_size - offset, 0))}: the file is truncated "
            "or corrupt; write it again with numpy.savez"
        )
    return member


def _check_memory(declared: dict[Path, dict[str, _Member]], max_bytes: int) -> None:
    """Refuse data whose loading would need more than ``max_bytes`` of memory."""
    kept = {f: sum(m.loaded_bytes for m in ms.values()) for f, ms in declared.items()}
    # reading one file holds its raw arrays, their conversion and the train/test split
    reading = {
        f: sum(m.count * m.dtype.itemsize for m in ms.values()) + 2 * kept[f]
        for f, ms in declared.items()
    }
    largest = max(reading, key=lambda f: reading[f])
    peak = sum(kept.values()) + reading[largest] - kept[largest]
    if peak > max_bytes:
        raise DataFileError(
            f"{largest.name}: loading the {len(declared)} file(s) would take about "
            f"{_size(peak)} of memory ({largest.name}, the largest, {_size(reading[largest])} "
            f"while read), over the limit of {_size(max_bytes)}: use smaller files, or raise "
            "benchmark.max_bytes if the machine has the memory"
        )


def _read(file: Path, declared: dict[str, _Member]) -> tuple[str, dict[str, np.ndarray]]:
    """The file's digest and its declared arrays, each read into an array of its size."""
    import xxhash

    def fail(why: str) -> DataFileError:
        return DataFileError(f"{file.name}: {why}")

    digest = xxhash.xxh3_64()
    try:
        with open(file, "rb") as f:
            while chunk := f.read(2**20):
                digest.update(chunk)
        arrays = {}
        with zipfile.ZipFile(file) as zf:
            for key, member in declared.items():
                if _header(zf, zf.getinfo(member.name), fail) != member:
                    raise fail("changed while being read; run again once it is written")
                arrays[key] = _data(zf, member, fail)
    except (OSError, KeyError, zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as e:
        raise fail(f"not a readable .npz file ({e})") from None
    return digest.hexdigest(), arrays


def _data(zf: zipfile.ZipFile, member: _Member, fail: Any) -> np.ndarray:
    array = np.empty(member.count, dtype=member.dtype)
    with zf.open(member.name) as fp:
        fp.read(member.offset)
        if array.nbytes:
            view = memoryview(array.view(np.uint8))
            done = 0
            while done < len(view):
                n = fp.readinto(view[done : done + 2**24])
                if not n:
                    raise fail(f"{member.key} ends early: the file is truncated")
                done += n
    return array.reshape(member.shape, order="F" if member.fortran else "C")


def _experience(
    name: str,
    digest: str,
    a: dict[str, np.ndarray],
    test_fraction: float,
    seed: int,
    n_classes: int | None,
) -> Experience:
    def fail(why: str) -> DataFileError:
        return DataFileError(f"{name}: {why}")

    x, y = _inputs(a["x"], "x", fail), _labels(a["y"], "y", fail, n_classes)
    if len(x) != len(y):
        raise fail(f"x has {len(x)} samples but y has {len(y)} labels")
    if len(y) == 0:
        raise fail("x and y are empty")
    task = _tasks(a.get("task"), len(y), fail)
    if "x_test" in a:
        x_test = _inputs(a["x_test"], "x_test", fail)
        y_test = _labels(a["y_test"], "y_test", fail, n_classes)
        if len(x_test) != len(y_test) or len(y_test) == 0:
            raise fail(f"x_test has {len(x_test)} samples and y_test {len(y_test)} labels")
        if x_test.shape[1:] != x.shape[1:]:
            raise fail(f"x_test samples are {list(x_test.shape[1:])}, x's {list(x.shape[1:])}")
        task_test = np.full(len(y_test), task[0], dtype=np.int64)
    else:
        n_test = max(1, round(test_fraction * len(y)))
        if n_test >= len(y):
            raise fail(f"{len(y)} samples are too few to hold out a test split; add x_test")
        # seeded by (seed, file name): adding other files never changes this file's split
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        order = rng.permutation(len(y))
        test, train = order[:n_test], order[n_test:]
        x, y, x_test, y_test = x[train], y[train], x[test], y[test]
        task, task_test = task[train], task[test]
    return Experience(name, digest, x, y, task, x_test, y_test, task_test)


def _inputs(x: np.ndarray, key: str, fail: Any) -> np.ndarray:
    if x.ndim < 2:
        raise fail(f"{key} must be (samples, ...), got shape {list(x.shape)}")
    if 0 in x.shape[1:]:
        raise fail(f"{key}'s samples hold no features (shape {list(x.shape)})")
    if x.dtype == np.uint8:
        return (x.astype(np.float32) / 255.0).astype(np.float32)
    if x.dtype.kind not in "fiub":
        raise fail(f"{key} must be numeric, not {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise fail(f"{key} contains NaN or infinite values (after conversion to float32)")
    return x


def _labels(y: np.ndarray, key: str, fail: Any, n_classes: int | None) -> np.ndarray:
    if y.ndim != 1:
        raise fail(f"{key} must be one label per sample, got shape {list(y.shape)}")
    if y.dtype.kind not in "iu":
        raise fail(f"{key} must hold integer class labels, not {y.dtype}")
    if not len(y):
        return y.astype(np.int64)
    if int(y.min()) < 0:
        raise fail(f"{key} has a negative label ({int(y.min())})")
    # checked before the conversion: a uint64 label >= 2**63 would wrap negative
    largest = int(y.max())
    if n_classes is not None and largest >= n_classes:
        raise fail(
            f"label {largest} in {key} is out of range: the model has {n_classes} classes "
            f"(labels 0..{n_classes - 1}). A store keeps the number of classes it was "
            "created with; set benchmark.n_classes for a new store that leaves room for "
            "future classes"
        )
    if n_classes is None and largest >= MAX_CLASSES:
        raise fail(
            f"label {largest} in {key} is over the limit of {MAX_CLASSES:,} classes that "
            "applies without benchmark.n_classes (the model gets one output per label up "
            "to the largest): labels must be 0..n_classes-1; set benchmark.n_classes if "
            "you really have that many classes"
        )
    return y.astype(np.int64)


def _tasks(task: np.ndarray | None, n: int, fail: Any) -> np.ndarray:
    if task is None:
        return np.zeros(n, dtype=np.int64)
    if task.dtype.kind not in "iu" or task.ndim > 1 or (task.ndim == 1 and len(task) != n):
        raise fail(f"task must be one integer or one per sample, got {task.dtype} {task.shape}")
    if task.size and int(task.min()) < 0:
        raise fail("task labels must be non-negative")
    if task.size and int(task.max()) >= MAX_TASKS:  # before int64: uint64 would wrap
        raise fail(f"task label {int(task.max())} is over the limit of {MAX_TASKS:,}")
    if task.size and int(task.min()) != int(task.max()):
        # A multi-head model (the default with task labels) cannot train an experience of
        # several tasks (Avalanche's head masking), and a single head ignores them.
        raise fail(
            f"task holds several task labels ({int(task.min())}..{int(task.max())}); a file "
            "is one experience of one task: split it into one file per task"
        )
    return np.broadcast_to(task.astype(np.int64), (n,)).copy()


def files_benchmark(data: FilesData) -> Any:
    """An Avalanche benchmark with one train and one test experience per file."""
    import torch
    from avalanche.benchmarks import dataset_benchmark

    # Avalanche 0.6 exposes task-aware dataset construction only under this name.
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset as with_tasks

    from engram.streams.digits import LabelledTensors

    def dataset(x: np.ndarray, y: np.ndarray, task: np.ndarray) -> Any:
        tensors = LabelledTensors(torch.from_numpy(x), torch.from_numpy(y))
        return with_tasks(tensors, task_labels=task.tolist())

    train = [dataset(e.x, e.y, e.task) for e in data.experiences]
    test = [dataset(e.x_test, e.y_test, e.task_test) for e in data.experiences]
    return dataset_benchmark(train, test)
