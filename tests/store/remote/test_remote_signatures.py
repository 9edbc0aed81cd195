"""Signed versions travel: a push carries each version's signature record (in its
marker), a pull writes it back, so a clone and a remote read in place check
``--trust`` as the origin does — and a version forged on the remote (its manifest
edited, the whole hash chain rebuilt by someone who can write the bucket) is refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import engram
from engram.cli import main as engram_cli
from engram.errors import UntrustedVersionError
from engram.models import build_model
from engram.store import Store
from engram.store.remote import pull, push
from engram.store.remote.client import ObjectStore
from engram.store.remote.layout import HEAD_KEY, Marker, Segment, canonical, object_key
from engram.store.remote.lineage import read_head, read_marker

pytestmark = pytest.mark.timeout(120)
MLP = {"name": "mlp", "args": {"input_shape": [8], "n_classes": 3, "hidden": [4]}}


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Two key pairs: ``a`` (trusted) and ``b`` (another writer's)."""
    pytest.importorskip("cryptography")
    from engram.store.signing import generate_key

    out = {}
    for name in ("a", "b"):
        public, _ = generate_key(tmp_path / f"{name}.key")
        out[name], out[f"{name}.pub"] = tmp_path / f"{name}.key", public
    return out


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))  # remotes read in place


def commit(store: Store, accuracy: float, seed: int) -> int:
    torch.manual_seed(seed)
    meta = {"model_spec": MLP, "metrics": {"average_accuracy": accuracy}}
    return store.commit({"w": torch.rand(3)}, model=build_model(MLP), meta=meta).id


def signed_then_unsigned(path: Path, key: Path) -> None:
    """v1, v2 signed by ``key`` (v2 tagged prod); v3 unsigned."""
    with Store.open(path, mode="c") as store:
        store.sign_with(key)
        commit(store, 0.5, seed=0)
        commit(store, 0.6, seed=1)
        store.tag("prod", 2)
        store.sign_with(None)
        commit(store, 0.7, seed=2)


def verify(target: str | Path, key: Path, capsys: pytest.CaptureFixture) -> tuple[int, dict]:
    capsys.readouterr()
    code = engram_cli(["verify", str(target), "--all", "--trust", str(key), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_signatures_are_pushed_and_pulled(tmp_path, s3, remote_url, keys, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    signed_then_unsigned(a, keys["a"])
    push(a, remote_url)
    pull(remote_url, b)
    for target in (b, remote_url):  # a clone, and the remote read in place
        code, result = verify(target, keys["a.pub"], capsys)
        found = {(p["version"], p["message"].split(",")[0]) for p in result["problems"]}
        assert code == 1 and found == {("v0003", "not signed")}, (target, result)
    with Store.open(b) as store:
        assert store.verify(2, trust=keys["a.pub"]).ok
        assert not store.verify(2, trust=keys["b.pub"]).ok  # another key does not pass

    assert engram.load_model(f"{remote_url}@prod", trust=keys["a.pub"]) is not None
    with pytest.raises(UntrustedVersionError, match="v0003: not signed; refusing"):
        engram.load_model(remote_url, trust=keys["a.pub"])
    with pytest.raises(UntrustedVersionError, match="signed by key"):
        engram.load_model(f"{remote_url}@prod", trust=keys["b.pub"])


def test_a_version_forged_on_the_remote_is_refused(tmp_path, s3, remote_url, keys, capsys):
    a = tmp_path / "a"
    with Store.open(a, mode="c") as store:
        store.sign_with(keys["a"])
        commit(store, 0.5, seed=0)
    push(a, remote_url)

    # Someone who can write the bucket edits HEAD's manifest (accuracy 0.5 -> 0.99) and
    # rebuilds the chain over it: a new segment, a new marker keeping the signature, HEAD.
    client = ObjectStore(remote_url)
    head, _ = read_head(client)
    marker = read_marker(client, head)
    key = object_key(marker.segment_sha256)
    segment = Segment.decode(client.get(key).data, marker, key)
    manifest = json.loads(segment.manifest_payload())
    manifest["meta"]["metrics"]["average_accuracy"] = 0.99
    payload = json.dumps(manifest).encode()
    records = tuple((db, k, payload if db == "versions" else p) for db, k, p in segment.records)
    forged = Segment(segment.store_id, segment.version, segment.files, records).encode()
    forged_marker = Marker(
        marker.store_id, marker.version, marker.created_at, hashlib.sha256(payload).hexdigest(),
        marker.parent, hashlib.sha256(forged).hexdigest(), len(forged), marker.signature,
    )  # fmt: skip
    ref = forged_marker.ref()
    s3.overwrite(remote_url, object_key(forged_marker.segment_sha256), forged)
    s3.overwrite(remote_url, ref.marker, forged_marker.encode())
    s3.overwrite(remote_url, HEAD_KEY, canonical(ref.to_json()))

    pull(remote_url, tmp_path / "b")
    with Store.open(tmp_path / "b") as store:  # every hash and seal checks out...
        assert store.info(1).meta["metrics"]["average_accuracy"] == 0.99
        assert store.verify(all=True).ok
    code, result = verify(tmp_path / "b", keys["a.pub"], capsys)  # ...but the signature
    assert code == 1 and "edited after signing" in result["problems"][0]["message"]
    with pytest.raises(UntrustedVersionError, match="edited after signing"):
        engram.load_model(remote_url, trust=keys["a.pub"])


def test_a_compacted_signed_store_pushes_its_signatures(tmp_path, s3, remote_url, keys, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    with Store.open(a, mode="c") as store:
        store.sign_with(keys["a"])
        for i in range(3):
            commit(store, 0.5 + i / 10, seed=i)
        assert store.compact().versions  # delta-coded: their signature records grow
    push(a, remote_url)
    pull(remote_url, b)
    code, result = verify(b, keys["a.pub"], capsys)
    assert code == 0, result
