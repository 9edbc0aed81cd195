"""Classic benchmarks through Avalanche: split/permuted MNIST, split CIFAR-10/100.

The data is read from ``data_dir`` (torchvision's layout; default: Avalanche's
``~/.avalanche/data/<dataset>``) and downloaded there when missing and ``download`` is
true. Without network access and without the files, the run stops with a message
saying which files to put where, before anything is trained or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engram.errors import EngramError


@dataclass(frozen=True)
class _Dataset:
    subdir: str  # where torchvision keeps the files under the root
    files: tuple[str, ...]
    input_shape: tuple[int, ...]
    n_classes: int


_DATASETS = {  # keyed by Avalanche's default_dataset_location name
    "mnist": _Dataset(
        "MNIST/raw",
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
        (1, 28, 28), 10,
    ),
    "cifar10": _Dataset(
        "cifar-10-batches-py",
        (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
        (3, 32, 32), 10,
    ),
    "cifar100": _Dataset(
        "cifar-100-python", ("train", "test"), (3, 32, 32), 100,
    ),
}  # fmt: skip

BENCHMARKS = {
    "split_mnist": "mnist",
    "permuted_mnist": "mnist",
    "split_cifar10": "cifar10",
    "split_cifar100": "cifar100",
}


def data_root(dataset: str, data_dir: str | Path | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    from avalanche.benchmarks.datasets.dataset_utils import default_dataset_location

    return Path(default_dataset_location(dataset))


def missing_files(dataset: str, root: Path) -> list[str]:
    spec = _DATASETS[dataset]
    return [f for f in spec.files if not (root / spec.subdir / f).is_file()]


def classic_benchmark(
    name: str,
    n_experiences: int,
    *,
    task_labels: bool = False,
    seed: int = 0,
    data_dir: str | Path | None = None,
    download: bool = True,
) -> tuple[Any, tuple[int, ...], int]:
    """(benchmark, input_shape, n_classes) for one of :data:`BENCHMARKS`."""
    dataset = BENCHMARKS[name]
    spec = _DATASETS[dataset]
    root = data_root(dataset, data_dir)
    missing = missing_files(dataset, root)
    where = root / spec.subdir
    if missing and not download:
        raise EngramError(
            f"{name}: {len(missing)} data file(s) missing in {where} ({', '.join(missing)}); "
            "copy them there (torchvision's layout), set benchmark.data_dir to where they "
            "are, or set benchmark.download=true on a machine with network access"
        )
    from avalanche.benchmarks import classic

    make = {
        "split_mnist": lambda: classic.SplitMNIST(
            n_experiences, return_task_id=task_labels, seed=seed,
            class_ids_from_zero_in_each_exp=task_labels, dataset_root=root,
        ),
        "permuted_mnist": lambda: classic.PermutedMNIST(
            n_experiences, return_task_id=task_labels, seed=seed, dataset_root=root
        ),
        "split_cifar10": lambda: classic.SplitCIFAR10(
            n_experiences, return_task_id=task_labels, seed=seed,
            class_ids_from_zero_in_each_exp=task_labels, dataset_root=root,
        ),
        "split_cifar100": lambda: classic.SplitCIFAR100(
            n_experiences, return_task_id=task_labels, seed=seed,
            class_ids_from_zero_in_each_exp=task_labels, dataset_root=root,
        ),
    }  # fmt: skip
    try:
        benchmark = make[name]()
    except (OSError, RuntimeError) as e:  # torchvision: URLError is an OSError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if missing:
            raise EngramError(
                f"{name}: the data is not in {where} and downloading it failed ({first}). "
                "Without network access, copy the files there (torchvision's layout: "
                f"{', '.join(spec.files)}) or set benchmark.data_dir to where they are"
            ) from None
        raise EngramError(f"{name}: could not read the data in {where}: {first}") from None
    except ValueError as e:
        raise EngramError(f"{name}: {e}") from None
    return benchmark, spec.input_shape, spec.n_classes
