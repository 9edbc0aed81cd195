"""The inspection commands import neither torch nor Avalanche (issue 26 item 3).

Each command runs in a fresh interpreter against a real small store (two versions, the
first compacted, so both a checkpoint file and delta-coded weights are read; ``diff``
compares the two), which then reports what it found in ``sys.modules``. The exported
safetensors file, written without torch, holds what ``safetensors.torch.save_file``
writes for the same weights; that ``diff`` prints what torch's tensors give is
tests/test_diff_numpy.py's.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engram.cli import main
from engram.store import SampleIds, Store

# Weights of several dtypes, float8_e8m0fnu included (one numpy has no dtype for).
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool,
          torch.float8_e8m0fnu)  # fmt: skip

COMMANDS = {  # each split into arguments before {store} and {out} are filled in
    "ls": "ls {store}",
    "ls --json": "ls {store} --json",
    "show": "show {store} v0002",
    "show compacted": "show {store} v0001",
    "show --card": "show {store} v0002 --card",
    "verify --all": "verify {store} --all",
    "du": "du {store}",
    "tag": "tag {store} prod v0001",
    "rollback": "rollback {store} v0002",
    "diff": "diff {store} v0001 v0002",
    "diff --json": "diff {store} v0002 v0001 --json",
    "export plain": "export {store} v0002 --format safetensors --out {out}/a.safetensors",
    "export compacted": "export {store} v0001 --format safetensors --out {out}/b.safetensors",
}


def _weights(scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(int(scale))
    return {f"w_{str(d).removeprefix('torch.')}": (scale * torch.randn(6, 5, generator=gen)).to(d)
            for d in DTYPES}  # fmt: skip


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inspect") / "store"
    with Store.open(path, mode="c") as store:
        for e in range(2):
            ids = store.samples.append([bytes([e]) * 16 for _ in range(3)])
            state = {
                "ewc": {"fisher": torch.rand(6, 5), "anchor": torch.randn(6, 5)},
                "replay": {"slots": SampleIds.of(ids)},
                "scaler": np.arange(4, dtype=np.float32) * e,
                "clock": {"experience": e},
            }
            meta = {"experience": e, "metrics": {"average_accuracy": 0.9 - 0.1 * e}}
            store.commit(state, model=_weights(e + 1), message=f"experience {e}", meta=meta)
        assert store.compact().versions == (1,)  # v0001's weights delta-coded into blobs
    return path


def _run_fresh(argv: list[str]) -> tuple[int, list[str]]:
    """``engram <argv>`` in a fresh interpreter: its exit code and the heavy modules it
    imported."""
    code = textwrap.dedent(f"""
        import contextlib, io, sys
        from engram.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main({argv!r})
        print(rc, sorted(m for m in ("torch", "avalanche") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rc, modules = proc.stdout.split(" ", 1)
    return int(rc), json.loads(modules.replace("'", '"'))


@pytest.mark.parametrize("name", COMMANDS)
def test_inspection_command_imports_neither_torch_nor_avalanche(
    small_store: Path, tmp_path: Path, name: str
) -> None:
    argv = [a.format(store=small_store, out=tmp_path) for a in COMMANDS[name].split()]
    rc, modules = _run_fresh(argv)
    assert rc == 0, argv
    assert modules == [], f"engram {COMMANDS[name]} imported {modules}"


def _parts(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (parsed) and the bytes after it."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@pytest.mark.parametrize("version", ["v0001", "v0002"])  # compacted, plain
def test_export_without_torch_writes_what_safetensors_torch_writes(
    small_store: Path, tmp_path: Path, version: str
) -> None:
    out = tmp_path / "model.safetensors"
    assert main(["export", str(small_store), version, "--out", str(out)]) == 0
    header, data = _parts(out)
    with Store.open(small_store) as store:
        weights = store.load(version, state=False).model
    reference = tmp_path / "reference.safetensors"
    save_file(weights, reference, metadata=header["__metadata__"])
    # safetensors writes __metadata__ in hash-map order (it differs between two runs of
    # save_file): the headers are compared parsed, their lengths and the data as bytes
    assert out.stat().st_size == reference.stat().st_size
    ref_header, ref_data = _parts(reference)
    assert header == ref_header and data == ref_data
    tensors = [k for k in header if k != "__metadata__"]
    assert tensors == [k for k in ref_header if k != "__metadata__"]  # their order too


def test_the_dtype_table_read_without_torch_agrees_with_torch() -> None:
    """Records are checked against codec.TENSOR_ITEMSIZES (no torch): torch's sizes."""
    from engram.store.codec import TENSOR_ITEMSIZES, TORCH_DTYPES

    assert set(TORCH_DTYPES) == set(TENSOR_ITEMSIZES)  # every name exists in this torch
    assert {n: d.itemsize for n, d in TORCH_DTYPES.items()} == TENSOR_ITEMSIZES
