"""The streams engram-train builds: embedded digits variants, classic datasets, user files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.errors import EngramError
from engram.streams import build_benchmark, digits
from engram.streams.classic import classic_benchmark
from engram.streams.files import DataFileError, load_files


def test_permuted_digits_is_domain_incremental() -> None:
    b = build_benchmark({"name": "permuted_digits", "n_experiences": 3, "seed": 0})
    x_train, *_ = digits.digits_tensors(0)
    exps = list(b.train_stream)
    assert len(exps) == 3 and b.input_shape == (64,) and not b.task_labels
    for e in exps:
        assert sorted(e.classes_in_this_experience) == list(range(10))
    first = torch.stack([exps[0].dataset[i][0] for i in range(5)])
    assert torch.equal(first, x_train[:5])  # experience 0: the identity permutation
    second = torch.stack([exps[1].dataset[i][0] for i in range(5)])
    assert not torch.equal(second, first)
    assert torch.equal(second.sort(dim=1).values, first.sort(dim=1).values)  # same pixels


def test_rotation_by_90_degrees_is_exact() -> None:
    x = torch.rand(4, 64)
    turned = digits.rotate(x, 90.0).reshape(4, 8, 8)
    images = x.reshape(4, 8, 8)
    assert any(
        torch.allclose(turned, torch.rot90(images, k, dims=(1, 2)), atol=1e-5) for k in (1, 3)
    )
    assert torch.allclose(digits.rotate(x, 0.0), x, atol=1e-6)


def test_rotated_digits_rotates_each_experience_more() -> None:
    b = build_benchmark({"name": "rotated_digits", "n_experiences": 3, "max_angle": 90.0})
    x0 = b.train_stream[0].dataset[0][0]
    x2 = b.train_stream[2].dataset[0][0]
    assert torch.allclose(digits.rotate(x0[None], 90.0)[0], x2, atol=1e-5)


def _idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (the format torchvision reads)."""
    code = 0x08  # unsigned byte
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, n: int = 40) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)


def test_split_mnist_reads_local_files_offline(tmp_path: Path) -> None:
    fake_mnist(tmp_path)
    b = build_benchmark(
        {"name": "split_mnist", "n_experiences": 5, "data_dir": str(tmp_path), "download": False}
    )
    assert b.input_shape == (1, 28, 28) and b.n_classes == 10
    assert len(b.train_stream) == 5
    x, *_ = b.train_stream[0].dataset[0]
    assert tuple(x.shape) == (1, 28, 28)


def test_split_mnist_run_from_local_files_sizes_a_cnn_by_the_data(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_module

    from engram.store import Store
    from engram.train import train

    fake_mnist(tmp_path / "data")
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        cfg = compose("train", overrides=[
            f"store.path={tmp_path / 's'}", "benchmark=split_mnist", "benchmark.download=false",
            f"benchmark.data_dir={tmp_path / 'data'}", "model=cnn", "training.epochs=1",
            "run.max_experiences=1", "run.quiet=true", "logger=none",
        ])  # fmt: skip
    assert len(train(cfg)) == 1
    with Store.open(tmp_path / "s") as store:
        args = store.head.meta["model_spec"]["args"]
    assert args["input_shape"] == [1, 28, 28] and args["n_classes"] == 10


@pytest.mark.parametrize(
    "name", ["split_mnist", "permuted_mnist", "split_cifar10", "split_cifar100"]
)
def test_classic_without_files_and_download_says_what_to_do(tmp_path: Path, name: str) -> None:
    with pytest.raises(EngramError, match="missing in .*copy them there"):
        classic_benchmark(name, 5, data_dir=tmp_path, download=False)


# ------------------------------------------------------------------------ files


def write(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def experience_file(root: Path, name: str, classes: list[int], n: int = 60, **extra) -> Path:
    rng = np.random.default_rng(len(name))
    y = np.array([classes[i % len(classes)] for i in range(n)], dtype=np.int64)
    x = rng.normal(size=(n, 3, 4)).astype(np.float32) + y[:, None, None]
    return write(root / name, x=x, y=y, **extra)


def test_files_are_experiences_in_name_order_with_a_seeded_split(tmp_path: Path) -> None:
    experience_file(tmp_path, "001.npz", [2, 3])
    experience_file(tmp_path, "000.npz", [0, 1])
    data = load_files(tmp_path, test_fraction=0.25, seed=0)
    assert [e.name for e in data.experiences] == ["000.npz", "001.npz"]
    assert data.input_shape == (3, 4) and data.n_classes == 4 and not data.task_labels
    first = data.experiences[0]
    assert len(first.y) == 45 and len(first.y_test) == 15
    again = load_files(tmp_path, test_fraction=0.25, seed=0).experiences[0]
    assert np.array_equal(again.y_test, first.y_test) and np.array_equal(again.x, first.x)
    other = load_files(tmp_path, test_fraction=0.25, seed=1).experiences[0]
    assert not np.array_equal(other.x_test, first.x_test)


def test_files_explicit_test_split_uint8_images_and_tasks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    write(
        tmp_path / "a.npz",
        x=rng.integers(0, 256, (10, 5, 5), dtype=np.uint8), y=np.arange(10) % 2,
        x_test=rng.integers(0, 256, (4, 5, 5), dtype=np.uint8), y_test=np.array([0, 1, 0, 1]),
        task=np.array(3),
    )  # fmt: skip
    data = load_files(tmp_path)
    e = data.experiences[0]
    assert e.x.dtype == np.float32 and e.x.min() >= 0.0 and e.x.max() <= 1.0
    assert len(e.y) == 10 and len(e.y_test) == 4 and data.task_labels
    assert set(e.task.tolist()) == {3} and set(e.task_test.tolist()) == {3}
    bench = build_benchmark({"name": "files", "path": str(tmp_path)})
    assert bench.train_stream[0].task_labels == [3] and bench.input_shape == (5, 5)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 2))}, "missing array 'y'"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, dtype=np.int64)}, "4 samples but y has 3"),
        ({"x": np.zeros(4), "y": np.zeros(4, dtype=np.int64)}, "x must be \\(samples, ...\\)"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "integer class labels"),
        ({"x": np.zeros((4, 2)), "y": -np.ones(4, dtype=np.int64)}, "negative label"),
        ({"x": np.full((4, 2), np.nan), "y": np.zeros(4, dtype=np.int64)}, "NaN"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4, dtype=np.int64), "x_test": np.zeros((2, 2))},
         "both x_test and y_test"),
        ({"x": np.array([[object()]] * 4), "y": np.zeros(4, dtype=np.int64)}, "without pickle"),
    ],
)  # fmt: skip
def test_a_malformed_file_is_named_with_its_problem(
    tmp_path: Path, arrays: dict, message: str
) -> None:
    experience_file(tmp_path, "000.npz", [0, 1])
    if any(a.dtype == object for a in arrays.values()):
        np.savez(tmp_path / "001.npz", **arrays)  # savez pickles object arrays
    else:
        write(tmp_path / "001.npz", **arrays)
    with pytest.raises(DataFileError, match=f"001.npz: .*{message}"):
        load_files(tmp_path)


def test_files_label_out_of_range_and_shape_mismatch(tmp_path: Path) -> None:
    experience_file(tmp_path, "000.npz", [0, 1])
    experience_file(tmp_path, "001.npz", [5, 6])
    with pytest.raises(DataFileError, match="001.npz: label 6 .* out of range: the model has 4"):
        load_files(tmp_path, n_classes=4)
    write(tmp_path / "002.npz", x=np.zeros((8, 12)), y=np.zeros(8, dtype=np.int64))
    with pytest.raises(DataFileError, match="differ in shape"):
        load_files(tmp_path)


def test_files_not_a_zip_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DataFileError, match="no .npz files"):
        load_files(tmp_path)
    (tmp_path / "000.npz").write_bytes(gzip.compress(b"nonsense"))
    with pytest.raises(DataFileError, match="000.npz: not a readable .npz"):
        load_files(tmp_path)
