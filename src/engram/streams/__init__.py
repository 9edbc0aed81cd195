"""Continual-learning streams for ``engram-train``: embedded digits, generated MNIST-1D,
classic datasets through Avalanche, and the user's own ``.npz`` files.

:func:`build_benchmark` turns a ``benchmark`` config into a :class:`Benchmark`; heavy
modules (torch, Avalanche) are imported only when a benchmark is built. The config group
keeps Avalanche's word, ``benchmark=``; the package is ``streams`` so that "benchmarks"
means one thing in this repository: the performance scripts in ``benchmarks/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engram.errors import EngramError

DIGITS = ("split_digits", "split_digits_task", "permuted_digits", "rotated_digits")
MNIST1D = ("split_mnist1d", "permuted_mnist1d")
CLASSIC = ("split_mnist", "permuted_mnist", "split_cifar10", "split_cifar100")
NAMES = (*DIGITS, *MNIST1D, *CLASSIC, "files")


@dataclass
class Benchmark:
    train_stream: Any
    test_stream: Any
    input_shape: tuple[int, ...]
    n_classes: int
    task_labels: bool
    # what each experience is (file name + content digest for ``files``): recorded in
    # every version so a resumed run can tell that its stream is the same
    experience_ids: list[str] = field(default_factory=list)


def build_benchmark(cfg: Mapping[str, Any], *, n_classes: int | None = None) -> Benchmark:
    """Build the benchmark ``cfg`` names (``cfg["name"]`` in :data:`NAMES`).

    ``n_classes``: for ``files`` without ``benchmark.n_classes``, the number of classes
    an existing store's model was built for.
    """
    name = cfg["name"]
    try:
        return _build(cfg, name, n_classes)
    except ValueError as e:  # Avalanche's checks, e.g. classes not divisible by experiences
        raise EngramError(f"benchmark {name}: {e}") from None


def _build(cfg: Mapping[str, Any], name: str, n_classes: int | None) -> Benchmark:
    n = cfg.get("n_experiences", 5)
    seed = cfg.get("seed", 0)
    task_labels = bool(cfg.get("task_labels", False))
    if name in DIGITS:
        from engram.streams import digits

        if name in ("split_digits", "split_digits_task"):
            task_labels = task_labels or name == "split_digits_task"
            bench = digits.split_digits(n, task_labels=task_labels, seed=seed)
        elif name == "permuted_digits":
            bench, task_labels = digits.permuted_digits(n, seed=seed), False
        else:
            max_angle = cfg.get("max_angle", 90.0)
            bench, task_labels = digits.rotated_digits(n, max_angle=max_angle, seed=seed), False
        shape, classes = digits.INPUT_SHAPE, digits.N_CLASSES
        return Benchmark(bench.train_stream, bench.test_stream, shape, classes, task_labels)
    if name in MNIST1D:
        from engram.streams import mnist1d

        if name == "split_mnist1d":
            bench = mnist1d.split_mnist1d(n, task_labels=task_labels, seed=seed)
        else:
            bench, task_labels = mnist1d.permuted_mnist1d(n, seed=seed), False
        shape, classes = mnist1d.INPUT_SHAPE, mnist1d.N_CLASSES
        return Benchmark(bench.train_stream, bench.test_stream, shape, classes, task_labels)
    if name in CLASSIC:
        from engram.streams.classic import classic_benchmark

        bench, shape, classes = classic_benchmark(
            name, n, task_labels=task_labels, seed=seed,
            data_dir=cfg.get("data_dir"), download=cfg.get("download", True),
        )  # fmt: skip
        return Benchmark(bench.train_stream, bench.test_stream, shape, classes, task_labels)
    if name == "files":
        from engram.streams.files import MAX_BYTES, files_benchmark, load_files

        if not cfg.get("path"):
            raise EngramError("benchmark=files needs benchmark.path=<directory of .npz files>")
        data = load_files(
            cfg["path"],
            n_classes=cfg.get("n_classes") or n_classes,
            test_fraction=cfg.get("test_fraction", 0.2),
            seed=seed,
            max_bytes=cfg.get("max_bytes") or MAX_BYTES,
        )
        bench = files_benchmark(data)
        ids = [f"{e.name}:{e.digest}" for e in data.experiences]
        return Benchmark(
            bench.train_stream, bench.test_stream, data.input_shape, data.n_classes,
            data.task_labels, ids,
        )  # fmt: skip
    raise EngramError(f"unknown benchmark {name!r}; available: {', '.join(NAMES)}")
