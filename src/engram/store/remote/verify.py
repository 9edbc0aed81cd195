"""``engram verify REMOTE``: re-hash what a remote holds.

``--all`` (:func:`verify_remote` with ``all=True``) downloads and hashes every object the
remote references, reporting each problem rather than stopping at the first: HEAD,
every marker of its lineage (against the SHA-256 its referrer names), every segment
(against its marker's), every file a segment names (a pack, checkpoint or model file,
against the segment's SHA-256 and size), and every tag (it must name a version of the
lineage). Each file the local copy (:mod:`~engram.store.remote.cache`) lacks is kept
there as it is checked, so nothing is downloaded twice. If every object checks, the copy
is then verified as a store (:meth:`Store.verify` with ``all=True``: each manifest,
chunk, delta chain, record seal and signature), which the objects' hashes alone do not
cover (a segment pushed from a store already damaged hashes fine).

Without ``--all``, a version of the copy is verified after fetching its files (each
checked against its SHA-256 on the way in; a file the copy already holds is checked
there).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram.errors import RemoteError
from engram.store.remote.cache import RemoteStore, _FileMap, cache_path, split_ref
from engram.store.remote.client import ObjectStore
from engram.store.remote.layout import HEAD_KEY, Ref, Segment, local_dir, object_key
from engram.store.remote.lineage import read_head, read_marker, read_tags
from engram.store.remote.pull import _remote_store_id, download_checked
from engram.store.values import Problem, VerifyReport, VersionSpec


@dataclass
class RemoteCheck:
    """What re-hashing the remote's objects found (``--json``: ``remote``)."""

    url: str
    objects: int = 0  # objects downloaded and hashed
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "objects": self.objects, "bytes": self.bytes}


class _Sink:
    """Where a hashed object goes when the copy needs none of it."""

    def write(self, data: Any) -> int:
        return len(data)


def verify_remote(
    target: str,
    version: VersionSpec = "HEAD",
    *,
    all: bool = False,
    trust: Any = None,
    cache_dir: Any = None,
) -> tuple[VerifyReport, RemoteCheck | None]:
    """Verify the remote ``target`` (``URL`` or ``URL@REF``; see the module docstring).
    The report's problems include the objects'; the check is None without ``all``.

    Raises:
        RemoteError: the remote cannot be read or holds no store (not a problem of it).
    """
    if not all:  # about the remote: a copy served offline would not say it
        with RemoteStore.open_url(target, cache_dir=cache_dir, offline=False) as store:
            return store.verify(version, trust=trust), None
    url, _ = split_ref(target)
    client = ObjectStore(url)
    _remote_store_id(client)  # a remote holding no store is an error, not a problem
    check = RemoteCheck(client.url)
    lineage, segments = _walk(client, check)
    _check_tags(client, check, lineage)
    copy = cache_path(url, cache_dir)
    if check.problems:  # the copy cannot follow a broken chain: the objects still are checked
        _check_files(client, check, segments, None)
        return VerifyReport(problems=list(check.problems)), check
    # synced and held open: a prune elsewhere waits while the files go into the copy
    with RemoteStore.open_url(url, cache_dir=cache_dir, offline=False) as store:
        _check_files(client, check, segments, copy)
        if check.problems:
            return VerifyReport(problems=list(check.problems)), check
        report = store.verify(all=True, trust=trust)
    report.problems[:0] = check.problems
    return report, check


def _walk(client: ObjectStore, check: RemoteCheck) -> tuple[set[Ref], list[Segment]]:
    """HEAD, then each marker and segment back to the root, each checked by hash."""
    before = client.traffic.down
    refs: set[Ref] = set()
    segments: list[Segment] = []
    try:
        ref, _ = read_head(client)
    except RemoteError as e:
        check.problems.append(Problem(None, f"remote {HEAD_KEY}", str(e)))
        return refs, segments
    check.objects += 1
    while ref is not None:
        refs.add(ref)
        try:
            marker = read_marker(client, ref)
        except RemoteError as e:
            check.problems.append(Problem(ref.version, f"remote {ref.marker}", str(e)))
            break
        key = object_key(marker.segment_sha256)
        got = client.get(key)
        check.objects += 2
        if got is None:
            check.problems.append(Problem(ref.version, f"remote {key}", "the segment is missing"))
        else:
            try:
                segments.append(Segment.decode(got.data, marker, key))
            except RemoteError as e:
                check.problems.append(Problem(ref.version, f"remote {key}", str(e)))
        ref = marker.parent
    check.bytes += client.traffic.down - before
    return refs, segments


def _check_files(
    client: ObjectStore, check: RemoteCheck, segments: list[Segment], copy: Path | None
) -> None:
    """Every file object the segments name, downloaded and hashed once; kept in the copy
    (``copy``) if it lacks it."""
    files = _FileMap(copy).read() if copy is not None else {}
    local = {v: k for k, v in files.items()}  # (sha256, nbytes) -> local name
    done: set[str] = set()
    for segment in sorted(segments, key=lambda s: s.version):
        for name, digest, nbytes in segment.files:
            if digest in done:
                continue
            done.add(digest)
            where = f"remote {object_key(digest)} ({name})"
            target = None
            if (digest, nbytes) in local:
                target = copy / local_dir(local[(digest, nbytes)]) / local[(digest, nbytes)]
            try:
                if target is not None and not target.is_file():
                    check.bytes += download_checked(client, [(name, digest, nbytes, target)])
                else:
                    h = hashlib.sha256()
                    size = client.get_into(object_key(digest), _Sink(), h.update)
                    if size is None:
                        raise RemoteError("the object is missing")
                    check.bytes += size
                    if size != nbytes or h.hexdigest() != digest:
                        raise RemoteError(
                            f"it fails its SHA-256 ({size} bytes, {nbytes} named by the segment)"
                        )
            except RemoteError as e:
                check.problems.append(Problem(segment.version, where, str(e)))
            check.objects += 1


def _check_tags(client: ObjectStore, check: RemoteCheck, lineage: set[Ref]) -> None:
    try:
        tags = read_tags(client)
    except RemoteError as e:
        check.problems.append(Problem(None, "remote refs/tags/", str(e)))
        return
    for name, tag in tags.items():
        check.objects += 1
        if tag.target not in lineage:
            check.problems.append(
                Problem(
                    tag.target.version,
                    f"remote refs/tags/{name}",
                    f"names {tag.target.marker}, which is not on the remote HEAD's history",
                )
            )
