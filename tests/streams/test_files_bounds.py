"""``benchmark=files`` bounds what the file says with what is on disk: a zip directory
that lies about a member's compressed size, impossible shapes and samples with no
features are refused in one line naming the file, before anything is decompressed."""

from __future__ import annotations

import io
import re
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engram.streams.files import DataFileError, load_files


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array(out, array)
    return out.getvalue()


def lying_bomb(path: Path, method: int, mib: int = 200) -> None:
    """x_test: ``mib`` MiB of zeros compressed with ``method`` to a few hundred bytes (a
    few hundred KiB deflated), whose zip directory and local header claim half the
    uncompressed size as compressed."""
    n = mib * 2**20 // 4
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (n,)}
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        zf.writestr("x.npy", npy(np.zeros((8, 8), np.float32)))
        zf.writestr("y.npy", npy(np.arange(8) % 2))
        zf.writestr("x_test.npy", header.getvalue() + bytes(n * 4))
        zf.writestr("y_test.npy", npy(np.zeros(8, np.int64)))
    raw = bytearray(buf.getvalue())
    info = zipfile.ZipFile(io.BytesIO(bytes(raw))).getinfo("x_test.npy")
    lie = info.file_size // 2
    at = raw.find(b"PK\x01\x02")
    while at != -1:  # central directory entries: compressed size at +20, name at +46
        (name_len,) = struct.unpack_from("<H", raw, at + 28)
        if raw[at + 46 : at + 46 + name_len] == b"x_test.npy":
            struct.pack_into("<I", raw, at + 20, lie)
        at = raw.find(b"PK\x01\x02", at + 4)
    struct.pack_into("<I", raw, info.header_offset + 18, lie)  # the local header's
    path.write_bytes(bytes(raw))
    assert zipfile.ZipFile(path).getinfo("x_test.npy").compress_size == lie


@pytest.mark.parametrize("method, why", [
    (zipfile.ZIP_DEFLATED, "x_test would expand from .* when decompressed: refused as a possible zip bomb"),
    (zipfile.ZIP_BZIP2, "x.npy is compressed with method 12, not stored or deflated"),
    (zipfile.ZIP_LZMA, "x.npy is compressed with method 14, not stored or deflated"),
])  # fmt: skip
def test_a_bomb_whose_directory_lies_about_its_compressed_size_is_refused(
    tmp_path: Path, method: int, why: str
) -> None:
    lying_bomb(tmp_path / "000.npz", method)
    assert (tmp_path / "000.npz").stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(DataFileError) as error:
            load_files(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert re.match(f"000.npz: {why}", str(error.value)), error.value
    assert peak < 8 * 2**20  # the 200 MiB were never decompressed


def test_samples_without_features_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "000.npz", x=np.zeros((200, 0), np.float32), y=np.arange(200) % 2)
    with pytest.raises(
        DataFileError, match=r"^000.npz: x's samples hold no features \(shape \[200, 0\]\)$"
    ):
        load_files(tmp_path)


def test_a_negative_dimension_in_a_header_is_refused_naming_the_file(tmp_path: Path) -> None:
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (-5, 8), }"
    text += " " * (117 - 10 - len(text)) + "\n"
    raw = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode()
    with zipfile.ZipFile(tmp_path / "007.npz", "w") as zf:
        zf.writestr("x.npy", raw)
        zf.writestr("y.npy", npy(np.arange(8)))
    with pytest.raises(
        DataFileError, match=r"^007.npz: x.npy declares an impossible shape \[-5, 8\]$"
    ):
        load_files(tmp_path)
