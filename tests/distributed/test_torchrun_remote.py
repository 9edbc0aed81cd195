"""``torchrun`` (2 ranks, gloo, CPU) with ``store.remote=``: the writing rank pushes, the
other never contacts the remote, and another machine resumes from what was pushed.

One launch (the tiny split-digits run, its first experience of two); moto's S3 server
from tests/store/remote/conftest.py. Rank 1's ``AWS_ENDPOINT_URL`` is pointed at a
listening socket that nothing answers (``sitecustomize`` on ``PYTHONPATH`` sets it in
every process whose ``RANK`` is not 0): any request it made would be a connection there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from engram.store import Store
from engram.store.remote import pull
from engram.store.remote.client import ObjectStore
from engram.store.remote.lineage import read_head
from engram.train import train

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux"),
              pytest.mark.timeout(300)]  # fmt: skip

REMOTE_TESTS = Path(__file__).parents[1] / "store" / "remote"


def _module(name: str):  # the remote tests' own helpers, not importable from here by name
    spec = importlib.util.spec_from_file_location(f"_remote_{name}", REMOTE_TESTS / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_conftest = _module("conftest")
s3_server, s3, remote_url = _conftest.s3_server, _conftest.s3, _conftest.remote_url  # fixtures
assert_same_store = _module("remote_helpers").assert_same_store

BIN = Path(sys.executable).parent
TINY = ["benchmark.n_experiences=2", "training.epochs=1", "logger=none", "run.quiet=true",
        "training.threads=1"]  # fmt: skip
SITECUSTOMIZE = """
import os
if os.environ.get("RANK", "0") != "0":  # torchrun's ranks but the writing one
    os.environ["AWS_ENDPOINT_URL"] = os.environ["ENGRAM_TEST_TRAP_ENDPOINT"]
"""


def config(store: Path, *overrides: str):
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        return compose("train", overrides=[f"store.path={store}", *TINY, *overrides])


def head_of(path: Path) -> tuple[list, dict[str, torch.Tensor]]:
    with Store.open(path) as store:
        assert store.verify(all=True).ok
        snap = store.load()
        return snap.state["metrics"]["accuracy_matrix"], dict(snap.model)


@pytest.mark.filterwarnings("ignore:resuming .* world_size. store 2 vs now 1")  # 2 -> 1: expected
def test_rank_0_alone_pushes_and_a_new_machine_resumes_from_the_remote(
    tmp_path: Path, s3, remote_url: str
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    first = tmp_path / "first"
    with socket.socket() as trap:  # listens, never accepts: a connection would queue here
        trap.bind(("127.0.0.1", 0))
        trap.listen(16)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(site),
               "ENGRAM_TEST_TRAP_ENDPOINT": f"http://127.0.0.1:{trap.getsockname()[1]}"}  # fmt: skip
        argv = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m",
                "engram.train", f"store.path={first}", f"store.remote={remote_url}",
                "run.max_experiences=1", *TINY]  # fmt: skip
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
        trap.setblocking(False)
        with pytest.raises(BlockingIOError):  # no connection from rank 1
            trap.accept()

    with Store.open(first) as store:
        local = [v.id for v in store.versions()]
        assert len(store.load().state["ranks"]) == 1  # a 2-rank version
    head, _ = read_head(ObjectStore(remote_url))
    assert head is not None and head.version == local[-1]  # pushed by rank 0, all of it
    markers = [k for k in s3.keys(remote_url) if k.startswith("versions/")]
    assert len(markers) == len(local)  # one marker per version: nothing pushed twice
    clone = tmp_path / "clone"  # what the remote holds is the 2-rank run, bit for bit
    pull(remote_url, clone)
    assert_same_store(first, clone)

    # Another machine, one process: a new, empty directory resumes from the remote. The
    # same continuation from the first machine's own store (no remote) is the reference.
    second = tmp_path / "second"
    second.mkdir()
    matrix = train(config(second, f"store.remote={remote_url}"))
    reference = tmp_path / "reference"
    shutil.copytree(first, reference)
    assert matrix == train(config(reference)) and len(matrix) == 2
    (acc_a, weights_a), (acc_b, weights_b) = head_of(second), head_of(reference)
    assert acc_a == acc_b and weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    head, _ = read_head(ObjectStore(remote_url))
    assert head.version == local[-1] + 1  # the second machine pushed its experience
