"""The commit's checkpoint file is hashed while it is written (issue 25).

``write_checkpoint`` writes the safetensors file itself, from the tensors' memory, while
a second thread computes the file's SHA-256 and XXH3: the file must be what
``safetensors.torch.save_file`` writes, the recorded hashes those of its bytes, and the
commit must not read the file back (its pages never enter the process's memory).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import load_file, save_file

from engram.errors import EncodingError
from engram.store import Store
from engram.store import checkpoint as checkpoint_module
from engram.store.format import CHECKPOINT_DIR


def _parts(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed, in file order) and the bytes after it."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0  # the data section starts 8-aligned, as safetensors pads
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _every_dtype() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=gen)
    weights = {
        "float32": base,
        "float64": base.double(),
        "bfloat16": base.bfloat16(),
        "float16": base.half(),
        "int64": torch.arange(7),
        "int32": torch.arange(7, dtype=torch.int32),
        "int16": torch.arange(7, dtype=torch.int16),
        "int8": torch.arange(7, dtype=torch.int8),
        "uint8": torch.arange(7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "complex64": torch.complex(base, -base),
        "scalar": torch.tensor(2.5),  # 0-dim
        "empty": torch.zeros(0, 4),
        "a.same-dtype-as-float32": base + 1,  # order among one dtype: by name
    }
    for name in ("uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):  # newer torch
            weights[name] = base.abs().to(getattr(torch, name))
    return weights


def test_checkpoint_file_is_what_safetensors_writes(store: Store, tmp_path: Path) -> None:
    weights = _every_dtype()
    info = store.commit({}, model=weights, meta={"experience": 2})
    path = store.path / CHECKPOINT_DIR / info.checkpoint
    header, data = _parts(path)
    reference = tmp_path / "reference.safetensors"
    save_file(weights, reference, metadata=header["__metadata__"])
    ref_header, ref_data = _parts(reference)
    assert header == ref_header and data == ref_data
    order = [k for k in header if k != "__metadata__"]
    assert order == [k for k in ref_header if k != "__metadata__"]  # the tensors' order too
    assert header["__metadata__"]["experience"] == "2"
    loaded = load_file(path)  # anyone with safetensors alone
    assert loaded.keys() == weights.keys()
    for name, tensor in weights.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("numel", [10, (9 << 20) // 4 + 3])  # hashed inline; in a thread
def test_recorded_hashes_are_those_of_the_file(store: Store, numel: int) -> None:
    gen = torch.Generator().manual_seed(numel)
    weights = {"w": torch.randn(numel, generator=gen), "b": torch.randn(7, generator=gen)}
    store.commit({}, model=weights)
    ckpt = store.manifest()["checkpoint"]
    raw = (store.path / CHECKPOINT_DIR / ckpt["file"]).read_bytes()
    assert ckpt["nbytes"] == len(raw)
    assert ckpt["sha256"] == hashlib.sha256(raw).hexdigest()
    assert ckpt["xxh3"] == xxhash.xxh3_64_intdigest(raw)
    assert ckpt["weights"] == checkpoint_module.weights_digest(weights)
    store.load(verify=True)  # every hash re-checked against the file


def test_same_metadata_in_another_order_gives_the_same_file(tmp_path: Path) -> None:
    """The metadata is written sorted (safetensors writes hash-map order)."""
    weights = {"w": torch.arange(6.0)}
    a = checkpoint_module.write_checkpoint(
        tmp_path, "a.safetensors", weights, {"x": "1", "a": "2"}, "d"
    )
    b = checkpoint_module.write_checkpoint(
        tmp_path, "b.safetensors", weights, {"a": "2", "x": "1"}, "d"
    )
    assert a.sha256 == b.sha256 and a.nbytes == b.nbytes


def _peak_rss_rise(fn) -> int:
    """How far this process's peak resident memory rises above its level during ``fn``."""
    status = Path("/proc/self/status")

    def field(name: str) -> int:
        line = next(x for x in status.read_text().splitlines() if x.startswith(name))
        return int(line.split()[1]) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = field("VmRSS:")
    fn()
    return field("VmHWM:") - before


@pytest.mark.skipif(sys.platform != "linux", reason="VmHWM and clear_refs are Linux's")
def test_commit_does_not_read_its_checkpoint_back(store: Store) -> None:
    """Before, the file was mapped and hashed after its fsync: the commit's peak memory
    rose by the model's bytes (its file pages). Now the hashes read the tensors."""
    weights = {f"layer{i}": torch.randn(4 << 20) for i in range(2)}  # 32 MiB
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    store.commit({}, model={"warm": torch.zeros(1)})  # the first commit's one-off imports
    rise = _peak_rss_rise(lambda: store.commit({}, model=weights))
    assert rise < nbytes / 4, f"the commit's peak RSS rose by {rise / nbytes:.2f}x the weights"


def test_a_dtype_no_checkpoint_holds_is_refused_before_anything_is_written(
    store: Store,
) -> None:
    store.commit({"a": torch.ones(3)}, model={"w": torch.ones(2)})
    files = sorted(p.name for p in store.path.rglob("*") if p.is_file())
    weights = {"w": torch.ones(2), "phase": torch.ones(2, dtype=torch.complex128)}
    with pytest.raises(EncodingError, match="'phase' has dtype torch.complex128"):
        store.commit({"b": torch.zeros(5)}, model=weights)
    assert sorted(p.name for p in store.path.rglob("*") if p.is_file()) == files
    assert store.head.id == 1
