"""The version tree: manifests (read and validated), HEAD, tags, and version specs.

A version is its manifest (:mod:`engram.store.format`) under its id in the
``versions`` database; ``refs`` holds ``HEAD`` and the tags. Every manifest read is
validated (:func:`_check_manifest`) before anything uses it: a manifest is untrusted
input, never a reason to crash, import or allocate.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import lmdb

from engram.errors import CorruptionError, EngramError, StoreFormatError, VersionNotFoundError
from engram.store import format as fmt
from engram.store.codec import TAG_MAP, ArrayRecord, decode_tree
from engram.store.env import Env
from engram.store.values import Problem, VersionInfo, VersionSpec, version_name

_TAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,127}")
_VERSION_NAME = re.compile(r"v?(\d{1,18})")
_HEAD_ANCESTOR = re.compile(r"HEAD~(\d{1,9})")
# A survey's damaged versions, under (LMDB environment, snapshot id, ``last``).
_Verdicts = tuple[tuple[Any, int, int | None], tuple[tuple[int, str], ...]]


def is_valid_tag_name(name: object) -> bool:
    """Whether :meth:`Store.tag` accepts ``name`` (checked before a run, e.g. gate.promote)."""
    return (
        isinstance(name, str)
        and _TAG_NAME.fullmatch(name) is not None
        and name != "HEAD"
        and _VERSION_NAME.fullmatch(name) is None
    )


def is_count(x: Any) -> bool:
    """A non-negative int (not a bool): what ids, sizes and ``meta["experience"]`` are."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def version_key(version_id: int) -> bytes:
    return version_id.to_bytes(8, "big")


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """A manifest as stored: compact UTF-8 JSON."""
    return json.dumps(manifest, separators=(",", ":")).encode()


def tree_arrays(tree: Any) -> list[tuple[str, ArrayRecord]]:
    """``(path, record)`` of every array of a state tree (or subtree), validated, in
    tree order; reads no bytes."""
    found: list[tuple[str, ArrayRecord]] = []
    decode_tree(tree, lambda record, path: found.append((path, record)))
    return found


def version_arrays(manifest: dict[str, Any]) -> list[tuple[str, ArrayRecord]]:
    """``(path, record)`` of every array of a version, reading no bytes: its state
    (paths ``/key/...``), then a compacted version's weights (``model/<name>``)."""
    records = tree_arrays(manifest["state"])
    if manifest.get("model") is not None:
        records += [(f"model{p}", r) for p, r in tree_arrays(manifest["model"]["tensors"])]
    return records


def version_info(manifest: dict[str, Any], tags: dict[str, int]) -> VersionInfo:
    """The summary of a (validated) manifest; ``tags``: every tag of the store."""
    vid, ckpt = manifest["id"], manifest["checkpoint"]
    return VersionInfo(
        id=vid,
        parent=manifest["parent"],
        created_at=manifest["created_at"],
        message=manifest["message"],
        meta=manifest["meta"],
        nbytes=manifest["nbytes"],
        new_bytes=manifest["new_bytes"],
        checkpoint=None if ckpt is None else ckpt["file"],
        tags=tuple(sorted(name for name, t in tags.items() if t == vid)),
        compacted=manifest.get("model") is not None,
        artifact=manifest["artifact"]["file"] if manifest.get("artifact") else None,
    )


def relinks(
    kept: set[int], dropped: set[int], parent_of: Callable[[int], int | None]
) -> dict[int, int | None]:
    """New parents for kept versions whose parent is dropped: the nearest kept ancestor
    (None when every ancestor goes), so ``HEAD~N``, diffs and rollbacks keep working
    after mid-experience versions are pruned. A parent that is already missing (a store
    pruned by an older engram) is left as it is: ``verify`` reports it."""
    out: dict[int, int | None] = {}
    for vid in kept:
        parent, seen = parent_of(vid), {vid}
        if parent not in dropped:
            continue
        while parent in dropped and parent not in seen:  # a cycle ends the walk
            seen.add(parent)
            parent = parent_of(parent)
        out[vid] = None if parent in seen else parent
    return out


class History:
    """The versions and refs of the store behind ``env``."""

    def __init__(self, env: Env) -> None:
        self.env = env
        # (environment, snapshot id, last) of the latest survey and its damaged
        # versions: a snapshot's bytes never change, so neither do its verdicts.
        self._damaged_seen: _Verdicts | None = None

    # ------------------------------------------------------------------ refs

    def ref(self, txn: lmdb.Transaction, key: bytes) -> int | None:
        raw = self.env.get(txn, fmt.DB_REFS, key)
        if raw is None:
            return None
        try:
            return int(bytes(raw).decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise CorruptionError(
                f"store {self.env.path}: ref {key.decode('ascii', 'replace')!r} is malformed"
            ) from None

    def head(self, txn: lmdb.Transaction) -> int | None:
        return self.ref(txn, fmt.HEAD_REF)

    def tags(self, txn: lmdb.Transaction) -> dict[str, int]:
        out = {}
        for key in self.env.keys(txn, fmt.DB_REFS, fmt.TAG_PREFIX):
            name = key[len(fmt.TAG_PREFIX) :]
            try:  # a hostile or damaged store may hold any bytes as a key
                out[name.decode("ascii")] = self.ref(txn, key)
            except UnicodeDecodeError:
                raise CorruptionError(
                    f"store {self.env.path}: a tag key is not a tag name ({name.hex()[:32]}); "
                    "the refs database is damaged: restore the store from a copy"
                ) from None
        return out

    def set_head(self, txn: lmdb.Transaction, vid: int) -> None:
        self.env.put(txn, fmt.DB_REFS, fmt.HEAD_REF, str(vid).encode())

    def reset_head(self, txn: lmdb.Transaction) -> None:
        self.env.delete(txn, fmt.DB_REFS, fmt.HEAD_REF)

    def set_tag(self, txn: lmdb.Transaction, name: str, vid: int) -> None:
        self.env.put(txn, fmt.DB_REFS, fmt.TAG_PREFIX + name.encode(), str(vid).encode())

    def tag(self, name: str, version: VersionSpec) -> int:
        """Point tag ``name`` at ``version``; returns its id."""
        if not is_valid_tag_name(name):
            raise ValueError(
                f"invalid tag name {name!r}: use letters, digits, '.', '_' or '-', starting with "
                "a letter or '_', not 'HEAD' and not a version name like 'v0003'"
            )
        with self.env.read() as txn:
            vid = self.resolve(txn, version)
        self.env.write(lambda txn: self.set_tag(txn, name, vid))
        return vid

    def untag(self, name: str) -> None:
        key = fmt.TAG_PREFIX + name.encode()
        if not self.env.write(lambda txn: self.env.delete(txn, fmt.DB_REFS, key)):
            raise VersionNotFoundError(f"no tag {name!r} in store {self.env.path}")

    def rollback(self, version: VersionSpec | None) -> int | None:
        """Move HEAD to ``version`` (its id), or reset it (None)."""
        if version is None:
            self.env.write(self.reset_head)
            return None
        with self.env.read() as txn:
            vid = self.resolve(txn, version)
        self.env.write(lambda txn: self.set_head(txn, vid))
        return vid

    # ------------------------------------------------------------- versions

    def ids(self, txn: lmdb.Transaction, *, since: int = 0) -> list[int]:
        """Every version id (``since``: from that id on), oldest first, from the keys
        alone. A key that is not 8 bytes (damaged pages) names no version and is left
        out; ``verify --all`` reports its record (its seal fails)."""
        with txn.cursor(db=self.env.dbs[fmt.DB_VERSIONS]) as cur:
            if not cur.set_range(version_key(since)):
                return []
            return [int.from_bytes(k, "big") for k in cur.iternext(values=False)
                    if len(k) == 8]  # fmt: skip

    def newest_ids(self, txn: lmdb.Transaction, last: int) -> list[int]:
        """The ``last`` highest version ids, oldest first: a walk back from the end of
        the keys, whatever the history's length (ids only grow, so the newest versions)."""
        out: list[int] = []
        with txn.cursor(db=self.env.dbs[fmt.DB_VERSIONS]) as cur:
            if last > 0 and cur.last():
                for key in cur.iterprev(values=False):
                    if len(key) == 8:
                        out.append(int.from_bytes(key, "big"))
                        if len(out) == last:
                            break
        return out[::-1]

    def count(self, txn: lmdb.Transaction) -> int:
        """How many versions (records of the versions database; no manifest is read)."""
        return self.env.count(txn, fmt.DB_VERSIONS)

    def has(self, txn: lmdb.Transaction, vid: int) -> bool:
        # The key alone: a damaged manifest (a failed checksum) still names a version.
        key = version_key(vid)
        return next(self.env.keys(txn, fmt.DB_VERSIONS, key), None) == key

    def manifest(self, txn: lmdb.Transaction, vid: int) -> dict[str, Any]:
        raw = self.env.get(txn, fmt.DB_VERSIONS, version_key(vid))
        if raw is None:
            raise VersionNotFoundError(
                f"version {version_name(vid)} is not in store {self.env.path}"
            )
        try:
            manifest = json.loads(bytes(raw))
        except (ValueError, RecursionError) as e:
            raise CorruptionError(
                f"{version_name(vid)}: manifest is not valid JSON ({e})"
            ) from None
        _check_manifest(manifest, vid)
        return manifest

    def put_manifest(self, txn: lmdb.Transaction, vid: int, payload: bytes) -> None:
        """Store a manifest (:func:`manifest_bytes`) under ``vid``."""
        self.env.put(txn, fmt.DB_VERSIONS, version_key(vid), payload)

    def delete(self, txn: lmdb.Transaction, vid: int) -> None:
        self.env.delete(txn, fmt.DB_VERSIONS, version_key(vid))

    def info(self, txn: lmdb.Transaction, vid: int, tags: dict[str, int]) -> VersionInfo:
        return version_info(self.manifest(txn, vid), tags)

    def survey(
        self, txn: lmdb.Transaction, *, last: int | None = None
    ) -> tuple[list[VersionInfo], list[tuple[int, str]]]:
        """The summary of every version whose manifest reads, oldest first, and
        ``(id, reason)`` of every *damaged* one (not JSON, a failed record checksum,
        malformed fields): one damaged old version must not hide the others.

        ``last``: only the ``last`` newest versions (:meth:`newest_ids`), reading only
        their manifests: what a paged listing needs of a long history.
        """
        ids = self.ids(txn) if last is None else self.newest_ids(txn, last)
        tags = self.tags(txn)
        good: list[VersionInfo] = []
        damaged: list[tuple[int, str]] = []
        for vid in ids:
            try:
                good.append(self.info(txn, vid, tags))
            except CorruptionError as e:
                damaged.append((vid, str(e)))
        return good, damaged

    def versions(self, *, last: int | None = None) -> list[VersionInfo]:
        """:meth:`survey`'s readable versions, in a read transaction of their own."""
        with self.env.read() as txn:
            good, damaged = self.survey(txn, last=last)
            # a read transaction's id names its snapshot (a write's, one not yet made)
            self._damaged_seen = ((self.env.checked(), txn.id(), last), tuple(damaged))
            return good

    def damaged(self, *, last: int | None = None) -> list[tuple[int, str]]:
        """:meth:`survey`'s damaged versions, in a read transaction of their own.

        Right after :meth:`versions` with nothing committed since — the same LMDB
        snapshot — it reuses that survey's verdicts instead of parsing every manifest
        again (``engram ls`` asks for both)."""
        with self.env.read() as txn:
            key = (self.env.checked(), txn.id(), last)
            if self._damaged_seen is not None and self._damaged_seen[0] == key:
                return list(self._damaged_seen[1])
            return self.survey(txn, last=last)[1]

    def resolve(self, txn: lmdb.Transaction, spec: VersionSpec) -> int:
        """The id that ``spec`` names: an int, ``"v0007"``, ``"HEAD"``, ``"HEAD~N"``, a tag."""
        if spec is None or spec == "HEAD":
            head = self.head(txn)
            if head is None:
                raise VersionNotFoundError(
                    f"store {self.env.path} has no HEAD (no versions yet, or HEAD was reset by "
                    "a failed gate); name a version or tag"
                )
            return head
        if isinstance(spec, bool) or not isinstance(spec, int | str):
            raise TypeError(
                f"a version is an int id, 'vNNNN', 'HEAD', 'HEAD~N' or a tag, not {spec!r}"
            )
        if isinstance(spec, int):
            vid = spec
        elif m := _VERSION_NAME.fullmatch(spec):
            vid = int(m.group(1))
        elif m := _HEAD_ANCESTOR.fullmatch(spec):
            vid = self._ancestor(txn, spec, int(m.group(1)))
        else:
            tagged = self.ref(txn, fmt.TAG_PREFIX + spec.encode())
            if tagged is None:
                tags = ", ".join(sorted(self.tags(txn))) or "none"
                raise VersionNotFoundError(
                    f"no version or tag {spec!r} in store {self.env.path} (tags: {tags}); "
                    "list versions with Store.versions() or `engram ls`"
                )
            vid = tagged
        if not self.has(txn, vid):
            raise VersionNotFoundError(
                f"version {version_name(vid)} is not in store {self.env.path}"
            )
        return vid

    def _ancestor(self, txn: lmdb.Transaction, spec: str, generations: int) -> int:
        """``HEAD~N``: HEAD's ``generations``-th parent."""
        vid = self.resolve(txn, "HEAD")
        seen = {vid}
        for _ in range(generations):
            parent = self.manifest(txn, vid).get("parent")
            if parent is None:
                raise VersionNotFoundError(f"{spec}: {version_name(vid)} has no parent")
            if parent in seen:
                raise CorruptionError(
                    f"store {self.env.path}: the parents of {version_name(vid)} form a cycle "
                    f"(through {version_name(parent)}); run `engram verify {self.env.path} --all`"
                )
            if not self.has(txn, parent):
                raise VersionNotFoundError(
                    f"{spec}: the parent of {version_name(vid)}, {version_name(parent)}, is "
                    f"not in store {self.env.path} (deleted by gc); name the version instead"
                )
            seen.add(parent)
            vid = parent
        return vid

    def ancestry_problem(self, txn: lmdb.Transaction, vid: int, rooted: set[int]) -> Problem | None:
        """Whether the parent chain of ``vid`` reaches a root: no missing parent, no cycle.
        ``rooted`` holds versions already known to reach one (shared across a verify)."""
        chain, child = [vid], vid
        while child not in rooted:
            try:
                parent = self.manifest(txn, child)["parent"]
            except EngramError:
                return None  # reported with that version's manifest
            if parent is None:
                break
            if parent in chain:
                why = "names itself as parent" if parent == child else "is in a cycle of parents"
                return Problem(vid, "parent", f"{version_name(child)} {why}")
            if not self.has(txn, parent):
                return Problem(vid, "parent", f"{version_name(child)}'s parent "
                               f"{version_name(parent)} is not in the store")  # fmt: skip
            chain.append(parent)
            child = parent
        rooted.update(chain)
        return None


_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _check_manifest(m: Any, vid: int) -> None:
    """Validate a manifest's own fields (its trees are validated as they are decoded).

    Long because it is a flat list of independent checks, one a line or two.
    """

    def bad(why: str) -> CorruptionError:
        return CorruptionError(f"{version_name(vid)}: malformed manifest: {why}")

    if not isinstance(m, dict):
        raise bad("not a JSON object")
    fv = m.get("format_version")
    if not isinstance(fv, int) or isinstance(fv, bool):
        raise bad("format_version missing")
    if fv > fmt.FORMAT_VERSION:
        raise StoreFormatError(
            f"{version_name(vid)} was written in format version {fv}; upgrade engram to read it"
        )
    if m.get("id") != vid:
        raise bad(f"id {m.get('id')!r} does not match its key")
    parent = m.get("parent")
    if parent is not None and not is_count(parent):
        raise bad("parent must be a version id or null")
    for key, typ in (("created_at", str), ("message", str), ("meta", dict)):
        if not isinstance(m.get(key), typ):
            raise bad(f"{key} must be a {typ.__name__}")
    for key in ("nbytes", "new_bytes"):
        if not is_count(m.get(key)):
            raise bad(f"{key} must be a non-negative integer")
    if "state" not in m:
        raise bad("state missing")
    ckpt = m.get("checkpoint")
    if ckpt is not None:
        if not (
            isinstance(ckpt, dict) and set(ckpt) == {"file", "sha256", "nbytes", "xxh3", "weights"}
        ):
            raise bad("checkpoint must hold file, sha256, nbytes, xxh3, weights")
        if not (isinstance(ckpt["weights"], str) and _HEX32.fullmatch(ckpt["weights"])):
            raise bad("checkpoint weights digest is malformed")
        if not (isinstance(ckpt["file"], str) and fmt.CHECKPOINT_NAME.fullmatch(ckpt["file"])):
            raise bad("checkpoint file name is not a checkpoint name")  # no path traversal
        if not (isinstance(ckpt["sha256"], str) and _HEX64.fullmatch(ckpt["sha256"])):
            raise bad("checkpoint sha256 is malformed")
        if not (is_count(ckpt["nbytes"]) and is_count(ckpt["xxh3"]) and ckpt["xxh3"] < 2**64):
            raise bad("checkpoint nbytes/xxh3 malformed")
    if m.get("artifact") is not None:
        _check_artifact(m["artifact"], fv, ckpt, bad)
    model = m.get("model")
    if model is not None:
        if ckpt is not None or fv < 2:
            raise bad("a compacted model needs format version 2 and no checkpoint file")
        if not (
            isinstance(model, dict) and set(model) == {"file", "weights", "metadata", "tensors"}
        ):
            raise bad("model must hold file, weights, metadata, tensors")
        if not (isinstance(model["file"], str) and fmt.CHECKPOINT_NAME.fullmatch(model["file"])):
            raise bad("model file name is not a checkpoint name")
        if not (isinstance(model["weights"], str) and _HEX32.fullmatch(model["weights"])):
            raise bad("model weights digest is malformed")
        metadata = model["metadata"]
        if not (
            isinstance(metadata, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise bad("model metadata must map strings to strings")
        if not (isinstance(model["tensors"], dict) and set(model["tensors"]) == {TAG_MAP}):
            raise bad("model tensors must be a map of tensors")


def _check_artifact(art: Any, fv: int, ckpt: Any, bad: Callable[[str], Exception]) -> None:
    """A manifest's ``artifact`` entry (format 4): a file name, never a path."""
    if fv < fmt.ARTIFACT_FORMAT_VERSION or ckpt is not None:
        raise bad("a model artifact needs format version 4 and no checkpoint file")
    if not (isinstance(art, dict) and set(art) == {"file", "format", "sha256", "nbytes", "xxh3"}):
        raise bad("artifact must hold file, format, sha256, nbytes, xxh3")
    if not (isinstance(art["file"], str) and fmt.ARTIFACT_NAME.fullmatch(art["file"])):
        raise bad("artifact file name is not a model file name")  # no path traversal
    if art["format"] not in fmt.ARTIFACT_FORMATS or not art["file"].endswith(f".{art['format']}"):
        raise bad(f"artifact format {art['format']!r} is unknown or not the file's suffix")
    if not (isinstance(art["sha256"], str) and _HEX64.fullmatch(art["sha256"])):
        raise bad("artifact sha256 is malformed")
    if not (is_count(art["nbytes"]) and is_count(art["xxh3"]) and art["xxh3"] < 2**64):
        raise bad("artifact nbytes/xxh3 malformed")
