"""A store is never written on a network or FUSE file system (LMDB's locks and memory
map are not safe there): refused in one line, unless allowed; reading is allowed.

No network mount can be made here, so the mount table is a file in the format of
/proc/self/mounts that puts the test's directory on NFS; the store and its directory
are real."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engram.errors import NetworkFilesystemError
from engram.store import Store
from engram.store import mounts as mounts_module
from engram.store.mounts import filesystem, network_filesystem


def table(path: Path, where: Path, kind: str) -> Path:
    lines = ["/dev/vda / ext4 rw,relatime 0 0", "tmpfs /tmp tmpfs rw 0 0",
             f"server:/export {str(where).replace(' ', chr(92) + '040')} {kind} rw 0 0"]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("kind", ["nfs4", "cifs", "lustre", "gpfs", "fuse.sshfs", "fuse"])
def test_network_kinds_are_recognised_by_the_longest_mount_point(tmp_path: Path, kind: str) -> None:
    mounts = table(tmp_path / "mounts", tmp_path / "shared dir", kind)
    (tmp_path / "shared dir").mkdir()
    assert network_filesystem(tmp_path / "shared dir" / "new" / "store", mounts) == (
        kind, str(tmp_path / "shared dir"),
    )  # fmt: skip
    assert network_filesystem(tmp_path / "local", mounts) is None  # tmpfs or ext4
    assert filesystem(tmp_path / "local", mounts)[0] in ("tmpfs", "ext4")


def test_the_real_mount_table_says_this_machine_s_temp_dir_is_local(tmp_path: Path) -> None:
    assert network_filesystem(tmp_path) is None
    assert filesystem(tmp_path) is not None  # /proc/self/mounts was read


def test_writing_on_a_network_mount_is_refused_and_reading_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "nfs"
    shared.mkdir()
    with Store.open(shared / "s", mode="c") as store:  # made while the mount was local
        store.commit({"x": torch.ones(2)})
    monkeypatch.setattr(mounts_module, "MOUNTS", table(tmp_path / "mounts", shared, "nfs4"))
    for mode in ("w", "c"):
        with pytest.raises(NetworkFilesystemError, match=r"on a network file system \(nfs4 at "):
            Store.open(shared / "s", mode=mode)
    with pytest.raises(NetworkFilesystemError, match="store.remote="):
        Store.open(shared / "new", mode="c")
    assert not (shared / "new").exists()
    with Store.open(shared / "s") as store:  # read-only
        assert store.head.id == 1
    with Store.open(shared / "s", mode="w", allow_network_fs=True) as store:
        store.commit({"x": torch.zeros(2)})
