"""Model cards (engram.card): written by every export, printed by `engram show --card`,
built from what the store records, and safe against a hostile store's strings."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import pytest
import torch
import xxhash
import yaml

import engram
from engram.card import card_path, card_text, collect
from engram.cli import main
from engram.store import Store
from engram.store.records import seal
from test_train import config, digit_files

HEADINGS = ["Data and lineage", "Metrics", "Signature", "Libraries", "How to load"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[list[float]]]:
    """A real two-experience run on data files (v0001, v0002 = prod): the store, the data
    directory and the accuracy matrix engram-train returned."""
    from engram.train import train

    root = tmp_path_factory.mktemp("card")
    digit_files(root / "data", range(2))
    cfg = config(root / "s", "benchmark=files", f"benchmark.path={root / 'data'}",
                 "benchmark.n_classes=4")  # fmt: skip
    matrix = train(cfg)
    with Store.open(root / "s", mode="w") as store:
        store.tag("prod", "HEAD")
    return root / "s", root / "data", matrix


def split(text: str) -> tuple[dict[str, Any], str]:
    """A card's front matter (parsed) and its body; fails unless it has exactly one."""
    lines = text.split("\n")
    assert lines[0] == "---", text[:200]
    end = lines.index("---", 1)
    body = "\n".join(lines[end + 1 :])
    assert "\n---\n" not in body
    return yaml.safe_load("\n".join(lines[1:end])), body


def headings(body: str) -> list[str]:
    return [line[3:] for line in body.split("\n") if line.startswith("## ")]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_writes_a_card_holding_the_versions_record(
    trained: tuple[Path, Path, list[list[float]]], tmp_path: Path, capsys, monkeypatch
) -> None:
    path, data, matrix = trained
    out = tmp_path / "model.safetensors"
    assert main(["export", str(path), "prod", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["card"] == str(card_path(out)) == str(out) + ".card.md"
    front, body = split(Path(result["card"]).read_text())
    e = front["engram"]
    with Store.open(path) as store:
        head = store.info("HEAD")
        assert (e["version"], e["store_tags"], e["store_id"]) == ("v0002", ["prod"], store.store_id)
        assert e["metrics"]["accuracy_matrix"] == matrix  # what the run computed
        assert e["metrics"]["forgetting"] == head.meta["metrics"]["forgetting"] > 0
        assert e["signature"] == head.meta["signature"]
        lineage = [(x["version"], x["experience"], x["sha256"]) for x in e["lineage"]]
        assert lineage == [(f"v000{v}", v - 1, sha256(store.checkpoint_path(v))) for v in (1, 2)]
    files = [(x["file"], x["xxh3"], x["version"]) for x in e["data"]["experiences"]]
    assert files == [(f"00{i}.npz", xxhash.xxh3_64(data.joinpath(f"00{i}.npz").read_bytes())
                      .hexdigest(), f"v000{i + 1}") for i in range(2)]  # fmt: skip
    assert e["export"]["sha256"] == sha256(out) and e["export"]["file"] == "model.safetensors"
    assert (front["library_name"], e["execution"]["torch"]) == ("pytorch", torch.__version__)
    assert headings(body) == HEADINGS
    # the card's own loading code, run beside the file, gives the stored model
    code = re.search(r"```python\n(.*?)\n```", body, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(code, scope)
    x = torch.rand(5, 64)
    stored = engram.load_model(path, "prod")
    assert torch.equal(scope["model"](x), stored(x))


def test_export_keeps_an_existing_card_unless_forced(
    trained: tuple[Path, Path, list[list[float]]], tmp_path: Path, capsys
) -> None:
    path, _, _ = trained
    out = tmp_path / "model.safetensors"
    card_path(out).write_text("mine")
    assert main(["export", str(path), "v0001", "--out", str(out)]) == 2
    assert "model.safetensors.card.md exists; pass --force" in capsys.readouterr().err
    assert not out.exists() and card_path(out).read_text() == "mine"
    assert main(["export", str(path), "v0001", "--out", str(out), "--force"]) == 0
    front, _ = split(card_path(out).read_text())
    assert front["engram"]["version"] == "v0001"
    assert front["engram"]["export"]["sha256"] == sha256(out)


def test_show_card_prints_the_card(trained: tuple[Path, Path, list[list[float]]], capsys) -> None:
    path, _, matrix = trained
    assert main(["show", str(path), "prod", "--card"]) == 0
    printed = capsys.readouterr().out
    with Store.open(path) as store:
        assert printed == card_text(store, "prod")
    front, body = split(printed)
    assert front["engram"]["version"] == "v0002" and "export" not in front["engram"]
    assert headings(body) == HEADINGS and "engram.load_model(" in body
    assert main(["show", str(path), "v0001", "--card", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["front_matter"] == split(result["card"])[0]
    assert result["front_matter"]["engram"]["metrics"]["accuracy_matrix"] == matrix[:1]


HOSTILE = ["x\n---\nevil: 1", "...", "a: b", '"q', "'q", "`x`|y", "- i", "*r", "&a", "# c",
           "!!python/object/apply:os.system", "\u202eevil", "\0", "{a: 1}", "yes", "1e3", ""]  # fmt: skip


def test_hostile_strings_stay_inside_their_values(tmp_path: Path) -> None:
    path = tmp_path / "s"
    meta = {"experience": 0, "kind": "experience", "strategy": HOSTILE[0],
            "experience_ids": [f"{HOSTILE[0]}.npz:ab"], "signature": {
                "input": {"dtype": HOSTILE[2], "shape": [8]}, "classes": HOSTILE},
            "execution": dict(zip(HOSTILE, HOSTILE, strict=True))}  # fmt: skip
    with Store.open(path, mode="c") as store:
        store.commit({"metrics": {"accuracy_matrix": [[0.5]]}}, message="\n---\n<script>",
                     meta=meta)  # fmt: skip
    env = lmdb.open(str(path / "memory.lmdb"), max_dbs=8)  # tags as a hostile tool writes them
    with env.begin(write=True) as txn:
        for name in HOSTILE[:-1]:  # (the empty name would be the prefix itself)
            key = b"tag/" + name.encode("ascii", "replace")
            txn.put(key, seal(b"refs", key, b"1"), db=env.open_db(b"refs", txn=txn))
    env.close()
    with Store.open(path) as store:
        tags = sorted(store.tags())
        text = card_text(store, 1)
    front, body = split(text)
    assert set(front) == {"library_name", "tags", "engram"}  # nothing injected
    e = front["engram"]
    assert e["store_tags"] == tags and len(tags) == len(HOSTILE) - 1
    assert (e["message"], e["strategy"]) == ("\n---\n<script>", HOSTILE[0])
    assert e["signature"]["classes"] == HOSTILE and e["execution"] == meta["execution"]
    assert e["data"]["experiences"][0]["file"] == f"{HOSTILE[0]}.npz"
    assert headings(body) == HEADINGS
    assert all(ord(c) < 128 for c in text.split("\n---\n")[0])  # escapes, no raw controls
    assert "<script>" not in body.replace("`\\n---\\n<script>`", "")  # only in a code span
    # every scalar is whole on its line (PyYAML alone would continue some on the next),
    # and quoted where a YAML 1.2 reader would take it for a number (1e3)
    for line in text.split("\n---\n")[0].split("\n")[1:]:
        yaml.safe_load(re.sub(r"^ *((- |\? |: )+)?", "", line) or "null")
    assert '\n  - "1e3"\n' in text


def test_building_a_card_imports_neither_torch_nor_avalanche(
    trained: tuple[Path, Path, list[list[float]]], tmp_path: Path
) -> None:
    path, _, _ = trained
    with Store.open(path) as store:
        collected = collect(store, "prod")
        expected = card_text(store, "prod")
    record = tmp_path / "collected.json"
    record.write_text(json.dumps(collected))
    code = (
        "import json, sys\n"
        "from engram.card import front_matter, render\n"
        f"text = render(front_matter(json.load(open({str(record)!r}))))\n"
        "heavy = sorted(m for m in ('torch', 'avalanche', 'numpy', 'lmdb') if m in sys.modules)\n"
        "print(json.dumps([heavy, text]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    heavy, text = json.loads(proc.stdout)
    assert heavy == [] and text == expected


def test_a_handle_reads_the_card_of_the_version_it_serves(
    trained: tuple[Path, Path, list[list[float]]],
) -> None:
    from engram import ModelHandle

    path, _, _ = trained
    with ModelHandle(path, "prod") as handle:
        card = handle.card
        assert handle.version is not None  # loaded first
        assert card == card_text(handle.store, handle.version.id)
        assert split(card)[0]["engram"]["version"] == handle.version.name == "v0002"
