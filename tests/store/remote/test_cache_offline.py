"""A remote that cannot be reached (moto's S3 server, conftest.py; a closed port, a
server stopped): reads of a copy that holds what they need serve it, with one warning
naming when it was synced and the version served; a handle keeps serving and follows the
remote again once it is back; with no copy, or a file the copy lacks, one line as before.
"""

from __future__ import annotations

import re
import socket
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engram
from engram.cli import main as engram_cli
from engram.errors import RemoteUnreachableError
from engram.models import build_model
from engram.store import Store
from engram.store.remote import push
from engram.store.remote.cache import OfflineWarning

pytestmark = pytest.mark.timeout(120)

SPEC = {"name": "mlp", "args": {"input_shape": [4], "n_classes": 3, "hidden": [8]}}
WHEN = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = engram_cli(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def trained(path: Path, versions: int, prod: int) -> list[dict[str, torch.Tensor]]:
    """A store of ``versions`` models (prod on ``prod``); each version's weights."""
    weights = []
    with Store.open(path, mode="c") as store:
        for seed in range(versions):
            torch.manual_seed(seed)
            model = build_model(SPEC)
            weights.append({k: v.clone() for k, v in model.state_dict().items()})
            store.commit(model=model, meta={"model_spec": SPEC})
        store.tag("prod", prod)
    return weights


def same(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    mine = model.state_dict()
    return mine.keys() == weights.keys() and all(torch.equal(mine[k], weights[k]) for k in mine)


def offline_lines(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, OfflineWarning)]


def test_cli_and_load_model_serve_the_copy_when_the_remote_is_unreachable(
    tmp_path, s3, remote_url, cache, capsys, monkeypatch
):
    a = tmp_path / "a"
    weights = trained(a, 2, prod=1)
    push(a, remote_url)
    out_file = tmp_path / "prod.safetensors"
    assert run(capsys, "export", f"{remote_url}@prod", "--out", str(out_file))[0] == 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")

    code, out, err = run(capsys, "ls", remote_url)
    assert code == 0 and "v0001" in out and "* v0002" in out.replace("*  ", "* "), out
    line = (f"engram: warning: remote {remote_url} unreachable, serving the local copy as of "
            f"{WHEN}, version v0002\n")  # fmt: skip
    assert re.fullmatch(line, err), err
    code, out, err = run(capsys, "show", f"{remote_url}@prod", "--json")
    assert code == 0 and '"name": "v0001"' in out
    assert re.fullmatch(line.replace("v0002", "v0001"), err), err
    code, _, err = run(capsys, "export", f"{remote_url}@prod", "--out", str(out_file), "--force")
    assert code == 0 and err.count("\n") == 1, err  # the checkpoint is in the copy
    assert load_file(out_file).keys() == weights[0].keys()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert same(engram.load_model(f"{remote_url}@prod"), weights[0])
    assert len(offline_lines(caught)) == 1 and "version v0001" in offline_lines(caught)[0]

    # what the copy lacks: v0002's checkpoint was never fetched; no copy at all
    code, _, err = run(capsys, "export", remote_url, "--out", str(tmp_path / "head.st"))
    assert code == 2 and "endpoint cannot be reached" in err.splitlines()[-1], err
    assert "Traceback" not in err
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "empty-cache"))
    code, _, err = run(capsys, "ls", remote_url)
    assert code == 2 and err.count("\n") == 1 and "endpoint cannot be reached" in err, err
    with pytest.raises(RemoteUnreachableError, match="endpoint cannot be reached"):
        engram.load_model(remote_url)


def test_a_handle_serves_the_copy_while_the_server_is_stopped_and_follows_it_back(
    tmp_path, s3, remote_url, cache, monkeypatch
):
    from moto.server import ThreadedMotoServer

    a = tmp_path / "a"
    weights = trained(a, 3, prod=1)
    push(a, remote_url)

    def serve() -> ThreadedMotoServer:
        # moto's backend is per process: this server sees the module server's bucket
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        _, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        return server

    server = serve()
    try:
        assert same(engram.load_model(f"{remote_url}@prod"), weights[0])  # the copy has prod
    finally:
        server.stop()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = engram.ModelHandle(f"{remote_url}@prod", check_every=0)
        for _ in range(3):  # every call checks (check_every=0): one warning in all
            model, version = handle.get()
            assert version.id == 1 and same(model, weights[0])
        assert handle.refresh() is False
    assert [w for w in caught if w.category is not OfflineWarning] == []
    (line,) = offline_lines(caught)
    assert re.fullmatch(f"remote {remote_url} unreachable, serving the local copy as of "
                        f"{WHEN}, version v0001", line), line  # fmt: skip
    assert handle.store.offline == line
    with Store.open(a, mode="w") as store:  # meanwhile prod moved (pushed elsewhere)
        store.tag("prod", 3)
    server = serve()  # back up
    try:
        push(a)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, version = handle.get()  # the next check reaches it: synced, reloaded
        assert version.id == 3 and same(model, weights[2]) and caught == []
        assert handle.store.offline is None
        handle.close()
    finally:
        server.stop()
