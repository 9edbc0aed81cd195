"""``benchmark=files`` refuses, within bounds and before training, what would otherwise
exhaust memory, wrap around or fail mid-training; a changed file is refused on resume,
the file of an interrupted experience included. Real files, real stores."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hydra import compose, initialize_config_module

from engram.store import Store
from engram.streams import build_benchmark
from engram.streams import files as files_module
from engram.streams.files import MAX_CLASSES, DataFileError, load_files
from engram.train import train


def write(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def experience(root: Path, name: str, classes: list[int], n: int = 40, **extra) -> Path:
    rng = np.random.default_rng([len(name), *classes])
    y = np.array([classes[i % len(classes)] for i in range(n)], dtype=np.int64)
    x = rng.normal(size=(n, 8)).astype(np.float32) + y[:, None]
    return write(root / name, x=x, y=y, **extra)


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, array)
    return out.getvalue()


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return out.getvalue()


def raw_npz(path: Path, members: dict[str, bytes]) -> None:
    """An .npz written member by member: its bytes are exactly what the test says."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


# ------------------------------------------------------------------ labels


@pytest.mark.parametrize(
    "label, dtype", [(10**6, np.int64), (2**40, np.int64), (2**63, np.uint64), (2**64 - 1, np.uint64)]
)  # fmt: skip
def test_labels_beyond_the_ceiling_are_refused_without_n_classes(
    tmp_path: Path, label: int, dtype: type
) -> None:
    experience(tmp_path, "000.npz", [0, 1])
    y = np.zeros(10, dtype=dtype)
    y[3] = label
    write(tmp_path / "001.npz", x=np.zeros((10, 8), np.float32), y=y)
    with pytest.raises(DataFileError, match=f"^001.npz: label {label} in y is over the limit"):
        load_files(tmp_path)
    # with n_classes, n_classes is the bound; a uint64 label is compared before any wrap
    with pytest.raises(DataFileError, match=f"^001.npz: label {label} .* the model has 4"):
        load_files(tmp_path, n_classes=4)


def test_labels_up_to_the_ceiling_size_the_model(tmp_path: Path) -> None:
    y = np.array([0, MAX_CLASSES - 1] * 5, dtype=np.uint64)
    write(tmp_path / "000.npz", x=np.zeros((10, 8), np.float32), y=y)
    data = load_files(tmp_path)
    assert data.n_classes == MAX_CLASSES
    e = data.experiences[0]
    assert e.y.dtype == np.int64 and set(e.y.tolist()) | set(e.y_test.tolist()) == {
        0, MAX_CLASSES - 1}  # fmt: skip


def test_a_uint64_task_label_does_not_wrap(tmp_path: Path) -> None:
    experience(tmp_path, "000.npz", [0, 1], task=np.array(2**63 + 5, dtype=np.uint64))
    with pytest.raises(DataFileError, match=f"^000.npz: task label {2**63 + 5} is over the limit"):
        load_files(tmp_path)


# ------------------------------------------------------------------ per-sample task labels


def test_several_task_labels_in_one_file_are_refused(tmp_path: Path) -> None:
    experience(tmp_path, "000.npz", [0, 1], task=np.arange(40) % 2)
    with pytest.raises(DataFileError, match="^000.npz: task holds several task labels .* one file"):
        load_files(tmp_path)


def test_one_task_label_per_sample_all_equal_is_the_experience_task(tmp_path: Path) -> None:
    experience(tmp_path, "000.npz", [0, 1], task=np.full(40, 2))
    experience(tmp_path, "001.npz", [2, 3], task=np.full(40, 5, dtype=np.uint8))
    bench = build_benchmark({"name": "files", "path": str(tmp_path)})
    assert bench.task_labels
    assert [e.task_labels for e in bench.train_stream] == [[2], [5]]
    assert [e.task_labels for e in bench.test_stream] == [[2], [5]]


# ------------------------------------------------------------------ sizes, from the headers


def test_a_declared_shape_beyond_the_data_is_refused_from_the_header(tmp_path: Path) -> None:
    # x.npy claims (10**12, 64) float32, 256 TiB: np.load raises MemoryError allocating it
    raw_npz(tmp_path / "000.npz", {
        "x.npy": npy_header((10**12, 64)) + bytes(256), "y.npy": npy(np.zeros(1, np.int64)),
    })  # fmt: skip
    with pytest.raises(DataFileError, match=r"^000.npz: x declares shape \[1000000000000, 64\]"):
        load_files(tmp_path)


def test_a_truncated_member_is_refused(tmp_path: Path) -> None:
    raw_npz(tmp_path / "000.npz", {
        "x.npy": npy_header((10, 8)) + bytes(10 * 8 * 4 - 1), "y.npy": npy(np.zeros(10, np.int64)),
    })  # fmt: skip
    with pytest.raises(DataFileError, match="^000.npz: x declares shape .* truncated"):
        load_files(tmp_path)


def bomb(path: Path, member: str) -> None:
    """A small valid .npz (x, y) plus ``member``, which decompresses to just over the
    zip-bomb threshold (a few hundred KB of deflated zeros)."""
    n = (files_module._RATIO_MIN_BYTES + 2**20) // 4
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", npy(np.zeros((8, 8), np.float32)))
        zf.writestr("y.npy", npy(np.arange(8) % 2))
        with zf.open(member, "w", force_zip64=True) as f:
            f.write(npy_header((n,)))
            zeros = bytes(2**20)
            for _ in range(n * 4 // len(zeros)):
                f.write(zeros)


def peak_memory(call) -> tuple[object, int]:
    tracemalloc.start()
    try:
        try:
            result = call()
        except DataFileError as e:
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_zip_bomb_is_refused_before_it_is_decompressed(tmp_path: Path) -> None:
    bomb(tmp_path / "000.npz", "x_test.npy")
    assert (tmp_path / "000.npz").stat().st_size < 2**20
    error, peak = peak_memory(lambda: load_files(tmp_path))
    assert isinstance(error, DataFileError)
    assert str(error).startswith("000.npz: x_test would expand from ") and "zip bomb" in str(error)
    assert peak < 8 * 2**20  # nothing near the 65 MiB was decompressed


def test_arrays_other_than_the_known_ones_are_never_decompressed(tmp_path: Path) -> None:
    bomb(tmp_path / "000.npz", "notes.npy")
    data, peak = peak_memory(lambda: load_files(tmp_path, test_fraction=0.25))
    assert [len(data.experiences[0].y), len(data.experiences[0].y_test)] == [6, 2]
    assert peak < 8 * 2**20


def test_the_memory_ceiling_is_checked_from_the_headers(tmp_path: Path) -> None:
    experience(tmp_path, "000.npz", [0, 1], n=100)  # x: 100 x 8 float32, 3.2 KB
    experience(tmp_path, "001.npz", [2, 3], n=400)  # the largest
    with pytest.raises(DataFileError, match="^001.npz: loading the 2 file.* limit of 10.0 KiB"):
        load_files(tmp_path, max_bytes=10 * 2**10)
    with pytest.raises(DataFileError, match="limit of 10.0 KiB"):
        build_benchmark({"name": "files", "path": str(tmp_path), "max_bytes": 10 * 2**10})
    assert len(load_files(tmp_path, max_bytes=2**20).experiences) == 2


def test_the_digest_is_of_the_file_bytes(tmp_path: Path) -> None:
    # recorded in every version: a change of how files are read must not change it
    path = experience(tmp_path, "000.npz", [0, 1])
    digest = load_files(tmp_path).experiences[0].digest
    assert digest == xxhash.xxh3_64_hexdigest(path.read_bytes())


# ------------------------------------------------------------------ through engram-train


def config(store: Path, data: Path, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[
            f"store.path={store}", "benchmark=files", f"benchmark.path={data}",
            "benchmark.n_classes=4", "training.epochs=1", "training.batch_size=8",
            "run.quiet=true", "logger=none", "model.hidden=[16]", *overrides,
        ])  # fmt: skip


def snapshot(path: Path) -> tuple:
    """Versions, HEAD, tags and every data file of the store (name, size, mtime); not the
    lock file, which the run takes before it checks the stream against HEAD."""
    with Store.open(path) as store:
        versions = [(v.id, v.tags, v.meta.get("kind")) for v in store.versions()]
        refs = store.head.id, store.tags()
    files = sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.rglob("*")
        if p.is_file() and "memory.lmdb" not in p.parts and p.name != "writer.lock"
    )  # fmt: skip
    return versions, refs, files


def test_a_refused_new_file_leaves_the_store_untouched(tmp_path: Path) -> None:
    data, store = tmp_path / "data", tmp_path / "s"
    experience(data, "000.npz", [0, 1])
    train(config(store, data))
    before = snapshot(store)
    for arrays in (
        {"x": np.zeros((10, 8), np.float32), "y": np.full(10, 2**63, dtype=np.uint64)},
        {"x": np.zeros((10, 8), np.float32), "y": np.zeros(10, np.int64), "task": np.arange(10)},
    ):
        write(data / "001.npz", **arrays)
        with pytest.raises(DataFileError, match="^001.npz: ") as error:
            train(config(store, data))
        assert "\n" not in str(error.value)
        assert snapshot(store) == before
    raw_npz(data / "001.npz", {
        "x.npy": npy_header((10**12, 64)) + bytes(64), "y.npy": npy(np.zeros(1, np.int64)),
    })  # fmt: skip
    with pytest.raises(DataFileError, match="^001.npz: x declares shape"):
        train(config(store, data))
    assert snapshot(store) == before


def test_a_file_changed_during_its_interrupted_experience_is_refused(tmp_path: Path) -> None:
    data, store = tmp_path / "data", tmp_path / "s"
    experience(data, "000.npz", [0, 1])
    original = experience(data, "001.npz", [2, 3]).read_bytes()
    # 32 training samples, batch 8: 4 iterations, a mid-experience version every 2
    args = ("training.commit_every_iterations=2", "store.keep_mid_experience=true")
    train(config(store, data, *args))
    with Store.open(store, mode="w") as s:
        mid = [v for v in s.versions() if v.meta.get("kind") == "mid-experience"
               and v.meta["experience"] == 1]  # fmt: skip
        assert mid
        s.rollback(mid[0].id)  # as if the run had been killed there
    before = snapshot(store)
    experience(data, "001.npz", [3, 2])  # other data under the same name
    with pytest.raises(DataFileError) as error:
        train(config(store, data, *args))
    message = str(error.value)
    assert message.startswith("experience 1 was being trained on '001.npz' when the run stopped")
    assert "changed" in message and "\n" not in message
    assert snapshot(store) == before
    (data / "001.npz").write_bytes(original)  # restored: the experience resumes
    assert len(train(config(store, data, *args))) == 2
    with Store.open(store) as s:
        assert s.head.meta["kind"] == "experience" and s.head.meta["experience"] == 1
