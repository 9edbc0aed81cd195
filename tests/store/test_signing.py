"""Signed versions: a manifest edited with its XXH3 seal recomputed passes every seal
check (undetectable without a key) but fails ``--trust``, as do unsigned versions and
versions signed by another key; load_model and ModelHandle refuse them."""

from __future__ import annotations

import json
import stat
import sys
import warnings
from pathlib import Path

import lmdb
import pytest
import torch

import engram
from engram.cli import main as cli
from engram.errors import EngramError, UntrustedVersionError
from engram.models import build_model
from engram.store import Store
from engram.store.format import DB_VERSIONS, LMDB_DIR
from engram.store.records import SEAL_BYTES, seal
from engram.store.signing import generate_key, load_trusted

MLP = {"name": "mlp", "args": {"input_shape": [8], "n_classes": 3, "hidden": [4]}}


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Two key pairs, outside any store: ``a`` (trusted) and ``b`` (another writer's)."""
    out = {}
    for name in ("a", "b"):
        public, _ = generate_key(tmp_path / f"{name}.key")
        out[name], out[f"{name}.pub"] = tmp_path / f"{name}.key", public
    return out


def commit(store: Store, accuracy: float, seed: int = 0) -> int:
    torch.manual_seed(seed)
    meta = {"model_spec": MLP, "metrics": {"average_accuracy": accuracy}}
    return store.commit({"w": torch.rand(3)}, model=build_model(MLP), meta=meta).id


def signed_store(path: Path, key: Path, n: int = 2) -> None:
    with Store.open(path, mode="c") as store:
        store.sign_with(key)
        for i in range(n):
            commit(store, 0.5 + i / 10, seed=i)


def forge(path: Path, vid: int, accuracy: float) -> None:
    """The issue's attack: edit a manifest's JSON and recompute its XXH3 seal with the
    store's own seal function, written back with plain lmdb (no engram, no key)."""
    env = lmdb.open(str(path / LMDB_DIR), max_dbs=8)
    key = vid.to_bytes(8, "big")
    with env.begin(write=True) as txn:
        db = env.open_db(DB_VERSIONS, txn=txn)
        manifest = json.loads(bytes(txn.get(key, db=db))[:-SEAL_BYTES])
        manifest["meta"]["metrics"]["average_accuracy"] = accuracy
        payload = json.dumps(manifest, separators=(",", ":")).encode()
        txn.put(key, seal(DB_VERSIONS, key, payload), db=db)
    env.close()


def test_a_signed_store_verifies_against_its_key(tmp_path: Path, keys) -> None:
    signed_store(tmp_path / "s", keys["a"])
    with Store.open(tmp_path / "s") as store:
        assert store.verify(all=True, trust=keys["a.pub"]).ok
        report = store.verify(all=True, trust=keys["b.pub"])  # the other writer's key
    assert [(p.version, p.where) for p in report.problems] == [(1, "signature"), (2, "signature")]
    assert "signed by key" in report.problems[0].message


def test_the_forged_seal_passes_every_check_but_trust(tmp_path: Path, keys, capsys) -> None:
    path = tmp_path / "s"
    signed_store(path, keys["a"])
    forge(path, 1, 0.99)
    with Store.open(path) as store:
        assert store.info(1).meta["metrics"]["average_accuracy"] == 0.99  # what `ls` shows
    # Without a key the forgery is undetectable: every seal and hash checks out.
    assert cli(["verify", str(path), "--all"]) == 0
    assert cli(["verify", str(path), "--all", "--untrusted"]) == 0
    capsys.readouterr()
    assert cli(["verify", str(path), "--all", "--trust", str(keys["a.pub"])]) == 1
    out = capsys.readouterr().out
    assert "v0001 signature: its signature by key" in out and "edited after signing" in out
    assert "v0002" not in out.split("problem(s)")[1]  # the untouched version still verifies
    assert cli(["verify", str(path), "--all", "--untrusted", "--trust", str(keys["a.pub"])]) == 1
    capsys.readouterr()
    assert cli(["verify", str(path), "HEAD", "--trust", str(keys["a.pub"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trusted_key"]


def test_unsigned_and_other_key_versions_fail(tmp_path: Path, keys, capsys) -> None:
    path = tmp_path / "s"
    signed_store(path, keys["a"], n=1)
    with Store.open(path, mode="w") as store:
        commit(store, 0.9)  # v0002: unsigned
        store.sign_with(keys["b"])
        commit(store, 0.9)  # v0003: signed by another key
    assert cli(["verify", str(path), "--all", "--trust", str(keys["a.pub"]), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    found = {(p["version"], p["message"].split(",")[0]) for p in result["problems"]}
    key_b = load_trusted(keys["b.pub"]).key_id
    assert found == {("v0002", "not signed"), ("v0003", f"signed by key {key_b}")}
    assert result["exit"] == 1
    # A key file that is not a key is the user's error (exit 2), as is a key made twice.
    assert cli(["verify", str(path), "--trust", str(keys["a"])]) == 2  # the private one
    assert cli(["keygen", str(keys["a"])]) == 2


def test_load_model_and_handle_refuse_what_is_not_signed(tmp_path: Path, keys) -> None:
    path = tmp_path / "s"
    signed_store(path, keys["a"], n=1)
    with Store.open(path, mode="w") as store:
        store.tag("prod", 1)
        commit(store, 0.9, seed=1)  # v0002: unsigned
    assert engram.load_model(path, 1, trust=keys["a.pub"]) is not None
    with pytest.raises(UntrustedVersionError, match=r"v0002: not signed; refusing"):
        engram.load_model(path, "HEAD", trust=keys["a.pub"])
    with pytest.raises(UntrustedVersionError, match="signed by key"):
        engram.load_model(path, 1, trust=keys["b.pub"])
    with Store.open(path, mode="w") as store:
        handle = engram.ModelHandle(store, "prod", check_every=0, trust=keys["a.pub"])
        assert handle.get()[1].id == 1
        store.tag("prod", 2)  # the tag moves to the unsigned version
        with pytest.warns(UserWarning, match=r"UntrustedVersionError.*still serving v0001"):
            assert handle.get()[1].id == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning, not one per retry
            assert handle.get()[1].id == 1
    with pytest.raises(UntrustedVersionError):  # nothing cached: the first load raises
        engram.ModelHandle(path, "HEAD", trust=keys["a.pub"]).get()


def edit_record(path: Path, db: bytes, key: bytes, edit) -> None:
    """Replace a JSON record with ``edit(record)``, its XXH3 seal recomputed (the attack
    of :func:`forge`, on any record)."""
    env = lmdb.open(str(path / LMDB_DIR), max_dbs=8)
    with env.begin(write=True) as txn:
        handle = env.open_db(db, txn=txn)
        record = json.loads(bytes(txn.get(key, db=handle))[:-SEAL_BYTES])
        payload = json.dumps(edit(record), separators=(",", ":")).encode()
        txn.put(key, seal(db, key, payload), db=handle)
    env.close()


def test_compaction_and_gc_keep_signatures_valid(tmp_path: Path, keys, capsys) -> None:
    path, pub = tmp_path / "s", str(keys["a.pub"])
    signed_store(path, keys["a"], n=4)
    weights = {v: engram.load_model(path, v).state_dict() for v in (1, 3)}
    with Store.open(path, mode="w") as store:
        assert store.compact().versions == (1, 2, 3)  # signed versions are compacted too
        store.gc(drop=[2])  # v0003 is re-linked to v0001: the parent is not signed
        assert store.info(3).parent == 1 and store.info(3).compacted
        assert store.verify(all=True, trust=keys["a.pub"]).ok
    assert not list((path / "checkpoints").glob("model-v0001*"))  # its file went to blobs
    assert cli(["verify", str(path), "--all", "--trust", pub]) == 0
    assert cli(["verify", str(path), "--all", "--untrusted", "--trust", pub]) == 0
    for v, expected in weights.items():
        loaded = engram.load_model(path, v, trust=keys["a.pub"]).state_dict()
        assert all(torch.equal(loaded[k], t) for k, t in expected.items())
    with Store.open(path) as store, store.env.read() as txn:  # gc dropped v0002's
        kept = list(store.env.keys(txn, b"meta", b"signature/"))
    assert kept == [b"signature/1", b"signature/3", b"signature/4"]
    capsys.readouterr()


@pytest.mark.parametrize("tamper, says", [
    ("meta", "v0001 signature: its signature by key"),  # the forged accuracy
    ("weights", "v0001 signature: its compacted weights are not the checkpoint it signed: "
                "their bytes do not hash"),  # v0003's weights under v0001's name
    ("header", "v0001 signature: its compacted weights are not the checkpoint it signed: "
               "another file name, weights digest or metadata"),
    ("signed_checkpoint", "v0001 signature: its signature by key"),
])  # fmt: skip
def test_tampering_after_compaction_is_caught(tmp_path: Path, keys, capsys, tamper, says) -> None:
    import base64

    path, pub = tmp_path / "s", str(keys["a.pub"])
    signed_store(path, keys["a"], n=4)
    with Store.open(path, mode="w") as store:
        store.compact()
        v3 = store.manifest(3)["model"]["tensors"]
    v1 = (1).to_bytes(8, "big")
    if tamper == "meta":
        forge(path, 1, 0.99)
    elif tamper == "weights":  # compaction's manifest is not signed: swap in other weights
        edit_record(path, DB_VERSIONS, v1, lambda m: {**m, "model": {**m["model"], "tensors": v3}})
    else:  # the record compaction extended: the header kept, the checkpoint as signed

        def edit(record: dict) -> dict:
            kept = record["compacted"]
            if tamper == "header":
                header = base64.b64decode(kept["header"])
                kept["header"] = base64.b64encode(header.replace(b'"engram"', b'"ENGRAM"')).decode()
            else:
                kept["checkpoint"]["sha256"] = "0" * 64
            return record

        edit_record(path, b"meta", b"signature/1", edit)
    capsys.readouterr()
    assert cli(["verify", str(path), "--all", "--trust", pub]) == 1
    out = capsys.readouterr().out
    assert says in out, out
    assert "v0003" not in out.split("problem(s)")[1]
    with pytest.raises(UntrustedVersionError, match="v0001: "):
        engram.load_model(path, 1, trust=keys["a.pub"])


def test_the_private_key_never_reaches_the_store(tmp_path: Path, keys, capsys) -> None:
    path = tmp_path / "s"
    signed_store(path, keys["a"])
    assert stat.S_IMODE(keys["a"].stat().st_mode) == 0o600
    secret = keys["a"].read_bytes()
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(secret, password=None)
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())  # fmt: skip
    for file in path.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            assert raw not in data and secret not in data, file
    with Store.open(path, mode="w") as store:
        store.sign_with(keys["a"])
        assert "PRIVATE" not in repr(store.signer)


def test_a_bad_key_file_or_no_library_is_one_line(tmp_path: Path, keys, monkeypatch) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with (
        Store.open(tmp_path / "s", mode="c") as store,
        pytest.raises(EngramError, match="cannot read signing key .*engram keygen"),
    ):
        store.sign_with(bad)
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives", None)  # not installed
    with pytest.raises(EngramError, match=r"pip install 'engram-cl\[sign\]'"):
        engram.load_model(tmp_path / "s", trust=keys["a.pub"])


def test_engram_train_signs_with_store_signing_key(tmp_path: Path, keys) -> None:
    from hydra import compose, initialize_config_module

    from engram.train import train

    overrides = [f"store.path={tmp_path / 'run'}", "training.epochs=1", "run.quiet=true",
                 "run.max_experiences=1", "logger=none", f"store.signing_key={keys['a']}"]  # fmt: skip
    with initialize_config_module(version_base="1.3", config_module="engram.configs"):
        train(compose("train", overrides=overrides))
    with Store.open(tmp_path / "run") as store:
        assert store.versions() and store.verify(all=True, trust=keys["a.pub"]).ok
    for file in (tmp_path / "run").rglob("*"):  # the Hydra outputs name the path only
        assert not file.is_file() or b"PRIVATE KEY" not in file.read_bytes(), file
