"""A remote's tags moved and deleted in place (``engram tag URL NAME [VERSION]
[--delete]``): one compare-and-swap each, a 412 changes nothing; a deleted tag reads as
missing (``ls``, ``URL@NAME``, a handle following it warns and keeps serving), and a
push from a clone that still has it at that version does not put it back."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import engram
from engram.cli import main as engram_cli
from engram.errors import RemoteConflictError, VersionNotFoundError
from engram.models import build_model
from engram.store import Store
from engram.store.remote import pull, push
from engram.store.remote.client import ObjectStore
from engram.store.remote.layout import Tag
from engram.store.remote.lineage import read_tag, read_tag_value, read_tags
from engram.store.remote.tags import _swap, delete_tag, set_tag

pytestmark = pytest.mark.timeout(120)
SPEC = {"name": "mlp", "args": {"input_shape": [4], "n_classes": 3, "hidden": [8]}}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))  # remotes read in place


def models_store(path: Path, n: int = 3) -> None:
    """``n`` versions with loadable models; prod on v1."""
    with Store.open(path, mode="c") as store:
        for seed in range(n):
            torch.manual_seed(seed)
            store.commit(model=build_model(SPEC), meta={"model_spec": SPEC})
        store.tag("prod", 1)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = engram_cli(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_deleting_a_remote_tag_from_the_cli(tmp_path, s3, remote_url, capsys):
    a = tmp_path / "a"
    models_store(a)
    push(a, remote_url)
    code, out, err = run(capsys, "tag", remote_url, "prod", "--delete")
    assert code == 0, err
    assert out == f"deleted tag prod on {remote_url} (was v0001)\n"
    assert read_tags(ObjectStore(remote_url)) == {}
    code, out, _ = run(capsys, "ls", remote_url, "--json")
    assert code == 0 and all(v["tags"] == [] for v in json.loads(out)["versions"])
    with pytest.raises(VersionNotFoundError, match="has no tag or version 'prod'"):
        engram.load_model(f"{remote_url}@prod")

    for argv, says in (
        (["tag", remote_url, "prod", "--delete"], "has no tag 'prod' (tags: none)"),
        (["tag", remote_url, "prod", "v0002", "--delete"], "takes no VERSION"),
        (["tag", remote_url, "prod", "v0009"], "no version or tag 'v0009'"),
        (["tag", remote_url, "HEAD"], "invalid tag name"),
    ):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and says in err, (argv, err)

    code, out, err = run(capsys, "tag", remote_url, "prod", "HEAD~1", "--json")
    assert code == 0, err
    assert json.loads(out) == {"remote": remote_url, "tag": "prod", "version": 2, "previous": None}
    tag, _ = read_tag(ObjectStore(remote_url), "prod")
    assert tag is not None and tag.target.version == 2 and tag.seq == 2  # created, deleted, set
    pull(remote_url, tmp_path / "b")
    with Store.open(tmp_path / "b") as store:
        assert store.tags() == {"prod": 2}


def test_a_delete_is_a_compare_and_swap(tmp_path, s3, remote_url):
    a = tmp_path / "a"
    models_store(a)
    push(a, remote_url)
    client = ObjectStore(remote_url)
    seen, etag = read_tag_value(client, "prod")  # what a deleter read first...
    with Store.open(a, mode="w") as store:
        store.tag("prod", 3)
    assert push(a).tags == ["prod"]  # ...before another writer moved it
    tombstone = Tag("prod", seen.seq + 1, seen.target, deleted=True)
    with pytest.raises(RemoteConflictError, match="412") as caught:
        _swap(client, tombstone, etag, "deleting")
    assert "\n" not in str(caught.value)
    tag, _ = read_tag(client, "prod")
    assert tag is not None and tag.target.version == 3  # nothing changed


def test_a_push_does_not_put_back_a_tag_deleted_at_the_version_it_names(
    tmp_path, s3, remote_url, capsys
):
    a = tmp_path / "a"
    models_store(a)
    push(a, remote_url)
    delete_tag(remote_url, "prod")
    report = push(a)  # a still has prod at v1: the deletion is newer than that
    assert report.tags == [] and report.tags_deleted_on_remote == ["prod"]
    assert read_tags(ObjectStore(remote_url)) == {}
    code, out, _ = run(capsys, "push", str(a))
    assert code == 0 and "tag prod was deleted on" in out and "left deleted" in out

    with Store.open(a, mode="w") as store:
        store.tag("prod", 2)  # promoted again, elsewhere: pushed
    assert push(a).tags == ["prod"]
    assert read_tags(ObjectStore(remote_url))["prod"].target.version == 2


def test_a_handle_following_a_deleted_tag_warns_and_keeps_serving(tmp_path, s3, remote_url):
    a = tmp_path / "a"
    models_store(a)
    push(a, remote_url)
    with engram.ModelHandle(f"{remote_url}@prod", check_every=0) as handle:
        assert handle.get()[1].id == 1
        delete_tag(remote_url, "prod")
        with pytest.warns(UserWarning, match="no tag or version 'prod'.*still serving v0001"):
            assert handle.get()[1].id == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one warning, not one per check
            assert handle.get()[1].id == 1
        set_tag(remote_url, "prod", "v0003")  # back, elsewhere: followed again
        assert handle.get()[1].id == 3


def test_a_file_remote_tag_deleted_and_set_back_to_the_same_version(tmp_path):
    pytest.importorskip("obstore")
    a, url = tmp_path / "a", f"file://{tmp_path}/shared"
    models_store(a, 2)
    push(a, url)
    delete_tag(url, "prod")
    assert read_tags(ObjectStore(url)) == {}
    # the same value as before the deletion, but a new seq: the claims never loop
    assert set_tag(url, "prod", "1")["version"] == 1
    assert set_tag(url, "prod", "prod")["version"] == 1  # a no-op
    tag, _ = read_tag(ObjectStore(url), "prod")
    assert tag is not None and tag.target.version == 1 and tag.seq == 2
    delete_tag(url, "prod")
    assert set_tag(url, "prod", "HEAD")["version"] == 2
    assert pull(url, tmp_path / "b").tags == ["prod"]
    with Store.open(tmp_path / "b") as store:
        assert store.tags() == {"prod": 2}
