"""``files``: your own data, one ``.npz`` file per experience — the "new data arrived" path.

A directory of ``*.npz`` files, taken in name order (``000-first.npz``, ``001-...``);
file i is experience i. Each file holds:

* ``x``: ``(N, ...)`` inputs of any shape (flat vectors, images), a numeric dtype;
  integers are converted to float32 (``uint8`` is scaled by 1/255);
* ``y``: ``(N,)`` integer class labels in ``[0, n_classes)``;
* ``task`` (optional): a scalar or ``(N,)`` non-negative integer task labels;
* ``x_test`` and ``y_test`` (optional, both or neither): the experience's test split;
  without them a seeded ``test_fraction`` of ``x, y`` is held out.

Adding a file and re-running the same command trains exactly the new experience. Every
file is checked before anything is trained, so a malformed one stops the run with a
message naming the file and the problem, and the store is left untouched. Files are
read with ``allow_pickle=False``: object arrays are refused.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engram.errors import EngramError


class DataFileError(EngramError):
    """A file of the ``files`` benchmark is missing, unreadable or malformed."""


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


def load_files(
    path: str | Path,
    *,
    n_classes: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FilesData:
    """Read and check every ``.npz`` file of ``path``.

    Args:
        n_classes: the number of classes the model is built for; labels must be below
            it. None: one more than the largest label in the files.
        test_fraction: held out of ``x, y`` for files without ``x_test, y_test``.
        seed: with the file name, seeds which samples are held out.
    """
    import xxhash

    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataFileError(f"benchmark.path {root} is not a directory of .npz files")
    files = sorted(p for p in root.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        raise DataFileError(f"no .npz files in {root}: add one per experience with arrays x and y")
    if not 0.0 < test_fraction < 1.0:
        raise DataFileError(f"benchmark.test_fraction must be in (0, 1), not {test_fraction}")
    experiences = []
    for file in files:
        raw = file.read_bytes()
        arrays = _read(file, raw)
        experiences.append(
            _experience(file.name, xxhash.xxh3_64_hexdigest(raw), arrays, test_fraction, seed)
        )
    shapes = {e.x.shape[1:] for e in experiences} | {e.x_test.shape[1:] for e in experiences}
    if len(shapes) > 1:
        detail = ", ".join(f"{e.name}: {list(e.x.shape[1:])}" for e in experiences)
        raise DataFileError(f"the files' inputs differ in shape ({detail}); they must agree")
    largest = max(int(max(e.y.max(), e.y_test.max())) for e in experiences)
    if n_classes is None:
        n_classes = largest + 1
    for e in experiences:
        for split, y in (("y", e.y), ("y_test", e.y_test)):
            if int(y.max()) >= n_classes:
                raise DataFileError(
                    f"{e.name}: label {int(y.max())} in {split} is out of range: the model "
                    f"has {n_classes} classes (labels 0..{n_classes - 1}). A store keeps the "
                    "number of classes it was created with; set benchmark.n_classes for a "
                    "new store that leaves room for future classes"
                )
    task_labels = any(bool(e.task.any()) or bool(e.task_test.any()) for e in experiences)
    return FilesData(experiences, tuple(int(d) for d in shapes.pop()), n_classes, task_labels)


def _read(file: Path, raw: bytes) -> dict[str, np.ndarray]:
    import io

    if not raw.startswith(b"PK"):  # np.load would take other bytes for a pickle
        raise DataFileError(f"{file.name}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as e:  # object arrays need pickle
        raise DataFileError(f"{file.name}: cannot be read without pickle ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataFileError(f"{file.name}: not a readable .npz file ({e})") from None


def _experience(
    name: str, digest: str, a: dict[str, np.ndarray], test_fraction: float, seed: int
) -> Experience:
    def fail(why: str) -> DataFileError:
        return DataFileError(f"{name}: {why}")

    for key in ("x", "y"):
        if key not in a:
            raise fail(f"missing array {key!r} (has: {', '.join(sorted(a)) or 'nothing'})")
    if ("x_test" in a) != ("y_test" in a):
        raise fail("give both x_test and y_test, or neither")
    x, y = _inputs(a["x"], "x", fail), _labels(a["y"], "y", fail)
    if len(x) != len(y):
        raise fail(f"x has {len(x)} samples but y has {len(y)} labels")
    if len(y) == 0:
        raise fail("x and y are empty")
    task = _tasks(a.get("task"), len(y), fail)
    if "x_test" in a:
        x_test, y_test = _inputs(a["x_test"], "x_test", fail), _labels(a["y_test"], "y_test", fail)
        if len(x_test) != len(y_test) or len(y_test) == 0:
            raise fail(f"x_test has {len(x_test)} samples and y_test {len(y_test)} labels")
        if x_test.shape[1:] != x.shape[1:]:
            raise fail(f"x_test samples are {list(x_test.shape[1:])}, x's {list(x.shape[1:])}")
        if len(set(task.tolist())) > 1:
            raise fail("with per-sample task labels, give no x_test (a split is held out)")
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
    if x.dtype == np.uint8:
        return (x.astype(np.float32) / 255.0).astype(np.float32)
    if x.dtype.kind not in "fiub":
        raise fail(f"{key} must be numeric, not {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise fail(f"{key} contains NaN or infinite values")
    return x


def _labels(y: np.ndarray, key: str, fail: Any) -> np.ndarray:
    if y.ndim != 1:
        raise fail(f"{key} must be one label per sample, got shape {list(y.shape)}")
    if y.dtype.kind not in "iu":
        raise fail(f"{key} must hold integer class labels, not {y.dtype}")
    if len(y) and int(y.min()) < 0:
        raise fail(f"{key} has a negative label ({int(y.min())})")
    return y.astype(np.int64)


def _tasks(task: np.ndarray | None, n: int, fail: Any) -> np.ndarray:
    if task is None:
        return np.zeros(n, dtype=np.int64)
    if task.dtype.kind not in "iu" or task.ndim > 1 or (task.ndim == 1 and len(task) != n):
        raise fail(f"task must be one integer or one per sample, got {task.dtype} {task.shape}")
    task = np.broadcast_to(task.astype(np.int64), (n,)).copy()
    if int(task.min()) < 0:
        raise fail("task labels must be non-negative")
    return task


def files_benchmark(data: FilesData) -> Any:
    """An Avalanche benchmark with one train and one test experience per file."""
    import torch
    from avalanche.benchmarks import dataset_benchmark

    # Avalanche 0.6 exposes task-aware dataset construction only under this name.
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset as with_tasks

    from engram.benchmarks.digits import LabelledTensors

    def dataset(x: np.ndarray, y: np.ndarray, task: np.ndarray) -> Any:
        tensors = LabelledTensors(torch.from_numpy(x), torch.from_numpy(y))
        return with_tasks(tensors, task_labels=task.tolist())

    train = [dataset(e.x, e.y, e.task) for e in data.experiences]
    test = [dataset(e.x_test, e.y_test, e.task_test) for e in data.experiences]
    return dataset_benchmark(train, test)
