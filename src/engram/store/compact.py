"""History compaction: older versions delta-coded against their neighbour towards HEAD.

Crash-safe in three steps (:mod:`engram.store.format`): (1) encoded (and plain) blobs
appended to a new pack, fsynced; (2) one LMDB transaction (:meth:`Compaction.run`'s
``swap``) puts their index entries and the compacted manifests; (3) as ``gc``: files
nothing references any more are removed.

(A little over the ~400-line budget: :class:`Compaction` is one plan over shared chunk
tables — planning, delta chains, keyframes, manifests — that only makes sense whole.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import lmdb

from engram.errors import CorruptionError
from engram.store import format as fmt
from engram.store.blobs import Blobs, EncodedBlob, FileBlob, IndexEntry, hash_chunk
from engram.store.checkpoint import (
    CheckpointInfo,
    TensorSpan,
    check_file,
    checkpoint_spans,
    fsync_dir,
)
from engram.store.codec import (
    NUMPY_DTYPES,
    TAG_MAP,
    TAG_NDARRAY,
    TAG_TENSOR,
    TENSOR_ITEMSIZES,
    ArrayRecord,
    checksum,
)
from engram.store.delta import CODEC_ZSTD, MAX_CHAIN, MIN_SAVING, encode, itemsize_for
from engram.store.env import Env
from engram.store.gc import collect
from engram.store.history import History, manifest_bytes, version_arrays
from engram.store.packs import NewPack
from engram.store.signing import checkpoint_header, compaction_record, signature_key, signed_ids
from engram.store.values import CompactReport, version_name


@dataclass(frozen=True)
class _Chunk:
    """One chunk of a version's tensor, as compaction sees it."""

    digest: bytes
    nbytes: int
    xxh3: int
    itemsize: int
    source: FileBlob | None  # where the bytes are when the blob index lacks them


class Compaction:
    """One run of :meth:`Store.compact <engram.store.Store.compact>`.

    Everything is read in one LMDB read transaction; what it plans to write is
    collected in :attr:`pending` (digest → new index entry) and a new pack.
    """

    def __init__(self, env: Env, history: History, blobs: Blobs, *, tagged: bool) -> None:
        self.env, self.history, self.blobs = env, history, blobs
        self.tagged = tagged
        self.pending: dict[bytes, IndexEntry] = {}
        self.chunk_of: dict[bytes, _Chunk] = {}  # chunks compacted (or kept) so far
        self.stats = [0, 0, 0]  # blobs, raw bytes, stored bytes
        self._current: dict[bytes, IndexEntry | None] = {}  # the index as it was

    def run(self) -> CompactReport:
        self.env.check_writable()
        with self.env.read() as txn:
            self.txn = txn
            head = self.history.head(txn)
            if head is None:
                return CompactReport((), 0, 0, 0, ())
            self._plan(head)
            self.pack = NewPack(self.env.path / fmt.BLOB_DIR, self.next_pack)
            with self.pack:  # finished (fsynced) here, or removed on an error
                compacted = self._encode()
        if self.pack.written:
            fsync_dir(self.env.path / fmt.BLOB_DIR)
        payloads = {v: manifest_bytes(m) for v, m in self._compacted_manifests(compacted).items()}
        signatures = {
            v: compaction_record(raw, self.manifests[v], self.headers[self.files_of[v]])
            for v, raw in self.signatures.items()
            if v in payloads
        }
        pending, written = self.pending, self.pack.written

        def swap(txn: lmdb.Transaction) -> None:
            for digest, entry in pending.items():
                self.blobs.put(txn, digest, entry.encode())
            for v, payload in payloads.items():
                self.history.put_manifest(txn, v, payload)
            for v, record in signatures.items():  # with the manifest it checks
                self.env.put(txn, fmt.DB_META, signature_key(v), record)
            if written:
                self.env.set_counter(txn, b"next_pack", self.next_pack + 1)
            if pending or payloads:  # delta-coded blobs and compacted manifests: format 2
                self.env.raise_format(txn, fmt.COMPACTED_FORMAT_VERSION)

        if pending or payloads:
            reserve = 128 * len(pending) + sum(map(len, [*payloads.values(), *signatures.values()]))
            self.env.write(swap, reserve=reserve)
        report = collect(
            self.env, self.history, self.blobs, None, set(self.manifests), repack_at=0.25
        )
        return CompactReport(tuple(sorted(compacted)), *self.stats, report.files)

    # ------------------------------------------------------------------ planning

    def _plan(self, head: int) -> None:
        """Read every manifest and chunk table; decide which versions stay plain."""
        txn = self.txn
        try:
            self.manifests = {v: self.history.manifest(txn, v) for v in self.history.ids(txn)}
        except CorruptionError as e:
            raise CorruptionError(
                f"{e}; compaction rewrites every version, so it changes nothing while one "
                f"is damaged: `engram ls {self.env.path}` names the command that drops it"
            ) from e
        tags = self.history.tags(txn)
        self.plain = {head} if self.tagged else {head, *tags.values()}
        missing = sorted(self.plain - set(self.manifests))  # the versions database's damage
        if missing:
            raise CorruptionError(
                f"store {self.env.path}: HEAD or a tag names {version_name(missing[0])}, which "
                f"has no manifest; compaction changes nothing: run `engram verify --untrusted "
                f"{self.env.path}` to see what is affected"
            )
        self.order = compaction_order(
            {v: m["parent"] for v, m in self.manifests.items()}, [head, *sorted(self.plain)]
        )
        self.files_of = files_of = {
            v: m["checkpoint"]["file"] for v, m in self.manifests.items() if m["checkpoint"]
        }
        self.staying_files = {files_of[v] for v in self.plain if v in files_of}
        ckpt_dir = self.env.path / fmt.CHECKPOINT_DIR
        # Compaction re-hashes the weights it moves into blobs: a file damaged on disk
        # would be laundered into blobs that verify. So each file is checked against
        # its manifest first (XXH3: the chunking reads every byte anyway).
        self.spans: dict[str, tuple[list[TensorSpan], dict[str, str]]] = {}
        for v, file in sorted(files_of.items()):
            if file not in self.spans:
                info = CheckpointInfo(**self.manifests[v]["checkpoint"])
                check_file(ckpt_dir / file, info, what=version_name(v), sha256=False)
                self.spans[file] = checkpoint_spans(ckpt_dir / file)
        # A signature covers the manifest compaction rewrites, and compaction has no key:
        # the signature records of signed versions keep what checks them after
        # (engram.store.signing), the checkpoint's header among it.
        self.signatures = {
            v: bytes(self.env.get(txn, fmt.DB_META, signature_key(v)))
            for v in signed_ids(self.env, txn) & (set(files_of) - self.plain)
        }
        self.headers = {
            files_of[v]: checkpoint_header(ckpt_dir / files_of[v]) for v in self.signatures
        }
        self.tables = {v: self._chunk_table(m, v) for v, m in self.manifests.items()}
        # A chunk a plain version references keeps its form; if it is served from a
        # file that goes away, it is served from a staying file or copied plain.
        self.staying_source: dict[bytes, FileBlob] = {}
        self.plain_digests: set[bytes] = set()
        for v in self.plain:
            for chunk in self.tables[v].values():
                self.plain_digests.add(chunk.digest)
                if chunk.source is not None and chunk.source.file in self.staying_files:
                    self.staying_source.setdefault(chunk.digest, chunk.source)
        self.next_pack = self.env.counter(txn, b"next_pack")

    def _chunk_table(self, manifest: dict, vid: int) -> dict[str, _Chunk]:
        """Every chunk of a version's state and weights, keyed ``path#index``."""
        table: dict[str, _Chunk] = {}
        for path, record in version_arrays(manifest):
            size = _element_size(record)
            for i, (digest, nbytes, check) in enumerate(record.chunks):
                table[f"{path}#{i}"] = _Chunk(
                    bytes.fromhex(digest), nbytes, check, itemsize_for(size, nbytes), None
                )
        if manifest["checkpoint"] is not None:
            file = manifest["checkpoint"]["file"]
            view = self.blobs.files.view(
                FileBlob(file, 0, manifest["checkpoint"]["nbytes"], 0), f"{vid}"
            )
            for span in self.spans[file][0]:
                for i, off in enumerate(range(0, span.nbytes, fmt.CHUNK_BYTES)):
                    n = min(fmt.CHUNK_BYTES, span.nbytes - off)
                    piece = view[span.offset + off : span.offset + off + n]
                    digest, check = hash_chunk(piece)
                    table[f"model/{span.name}#{i}"] = _Chunk(
                        digest,
                        n,
                        check,
                        itemsize_for(TENSOR_ITEMSIZES[span.dtype], n),
                        FileBlob(file, span.offset + off, n, check),
                    )
        return table

    # ------------------------------------------------------------------ encoding

    def _encode(self) -> list[int]:
        """Step (1): code every chunk of every non-plain version (bases first), keep
        plain versions' chunks servable, cut long chains; the versions compacted."""
        compacted: list[int] = []
        for v, b in self.order:
            table = self.tables[v]
            if v in self.plain or (not table and self.manifests[v]["checkpoint"] is None):
                continue
            base_table = self.tables[b] if b is not None else {}
            for where, chunk in table.items():
                if chunk.digest in self.chunk_of:
                    continue
                self.chunk_of[chunk.digest] = chunk
                if chunk.digest in self.plain_digests:
                    self.keep_servable(chunk)
                else:
                    self.compact_chunk(chunk, base_table.get(where))
            if self.manifests[v]["checkpoint"] is not None or any(
                chunk.digest in self.pending for chunk in table.values()
            ):
                compacted.append(v)
        for v in self.plain:  # HEAD's state decodes no delta (it may after a rollback)
            for chunk in self.tables[v].values():
                if isinstance(self.entry_of(chunk.digest), EncodedBlob):
                    self.store_bytes(chunk, bytes(self.original(chunk)), None, 0)
                else:
                    self.keep_servable(chunk)
        coded = self.blobs.encoded_digests(self.txn)
        self._cut_long_chains([*self.pending, *coded])
        return compacted

    def entry_of(self, digest: bytes) -> IndexEntry | None:
        """A blob's entry as this compaction will leave it."""
        if digest in self.pending:
            return self.pending[digest]
        if digest not in self._current:
            self._current[digest] = self.blobs.entry(self.txn, digest)
        return self._current[digest]

    def original(self, chunk: _Chunk) -> memoryview | bytes:
        """The chunk's bytes through the index as it was before this compaction."""
        if self.blobs.has(self.txn, chunk.digest):
            return self.blobs.blob(self.txn, chunk.digest.hex())
        if chunk.source is None:  # a state chunk the index lacks: a damaged index
            raise CorruptionError(
                f"store {self.env.path}: blob {chunk.digest.hex()[:12]} is missing from the "
                f"index; compaction changes nothing: run `engram verify --untrusted "
                f"{self.env.path}` to see what is affected"
            )
        return self.blobs.files.view(chunk.source, chunk.digest.hex())

    def store_bytes(self, chunk: _Chunk, data: Any, base: bytes | None, itemsize: int) -> None:
        """Append ``data`` to the new pack as ``chunk``'s blob: plain (``itemsize`` 0)
        or a zstd frame coded against ``base``."""
        if itemsize == 0:
            self.pending[chunk.digest] = self.pack.append(data, chunk.xxh3)
        else:
            loc = self.pack.append(data, checksum(data))
            self.pending[chunk.digest] = EncodedBlob(
                CODEC_ZSTD, itemsize, base, loc.pack, loc.offset, len(data), loc.xxh3,
                chunk.nbytes,
            )  # fmt: skip
        self.stats[0] += 1
        self.stats[1] += chunk.nbytes
        self.stats[2] += len(data)

    def keep_servable(self, chunk: _Chunk) -> None:
        """Make sure the chunk stays readable once the files that go are gone."""
        entry = self.entry_of(chunk.digest)
        gone = entry is None or (
            isinstance(entry, FileBlob) and entry.file not in self.staying_files
        )
        if not gone:
            return
        if chunk.digest in self.staying_source:
            self.pending[chunk.digest] = self.staying_source[chunk.digest]
        else:
            self.store_bytes(chunk, self.original(chunk), None, 0)

    def chain_depth(self, digest: bytes) -> int | None:
        """Deltas to decode for ``digest`` now; None past MAX_CHAIN or cyclic."""
        for depth in range(MAX_CHAIN + 1):
            entry = self.entry_of(digest)
            if not (isinstance(entry, EncodedBlob) and entry.base is not None):
                return depth
            digest = entry.base
        return None

    def compact_chunk(self, chunk: _Chunk, base: _Chunk | None) -> None:
        """Store the chunk as the smaller of a keyframe and a delta against ``base``
        (if that saves MIN_SAVING), else keep it as it is."""
        if isinstance(self.entry_of(chunk.digest), EncodedBlob):
            return  # compacted before
        data = self.original(chunk)
        best, best_base = encode(data, None, chunk.itemsize), None
        if base is not None and base.nbytes == chunk.nbytes:
            depth = self.chain_depth(base.digest)
            if (
                depth is not None
                and depth < MAX_CHAIN
                and not self._chain_has(base.digest, chunk.digest)
            ):
                if self.entry_of(base.digest) is None:  # a plain version's file span
                    self.keep_servable(base)
                delta = encode(data, self.original(base), chunk.itemsize)
                if len(delta) < len(best):
                    best, best_base = delta, base.digest
        if len(best) <= (1 - MIN_SAVING) * chunk.nbytes:
            self.store_bytes(chunk, best, best_base, chunk.itemsize)
        else:
            self.keep_servable(chunk)

    def _chain_has(self, start: bytes, target: bytes) -> bool:
        """Whether ``target`` is on the delta chain from ``start`` (coding against it
        would make a cycle)."""
        digest: bytes | None = start
        for _ in range(MAX_CHAIN + 2):
            if digest is None:
                return False
            if digest == target:
                return True
            entry = self.entry_of(digest)
            digest = entry.base if isinstance(entry, EncodedBlob) else None
        return True

    def _cut_long_chains(self, digests: list[bytes]) -> None:
        """Re-encode as a keyframe every blob whose delta chain would exceed MAX_CHAIN.

        Chains grow when a base that was stored as is (a former HEAD's weights) is
        itself delta-coded; each blob's depth is settled after its base's, so a cut
        shortens the chains of everything coded against it.
        """
        depth: dict[bytes, int] = {}
        for start in digests:
            path: list[bytes] = []
            on_path: set[bytes] = set()
            digest = start
            while digest not in depth:
                entry = self.entry_of(digest)
                if not (isinstance(entry, EncodedBlob) and entry.base is not None):
                    depth[digest] = 0
                elif digest in on_path:  # a cycle: cut it here
                    self._keyframe(digest)
                    depth[digest] = 0
                else:
                    path.append(digest)
                    on_path.add(digest)
                    digest = entry.base
            d = depth[digest]
            for node in reversed(path):
                if node in depth:  # the point where a cycle was cut
                    d = depth[node]
                    continue
                d += 1
                if d > MAX_CHAIN:
                    self._keyframe(node)
                    d = 0
                depth[node] = d

    def _keyframe(self, digest: bytes) -> None:
        """Store a blob as a keyframe (or plain, if zstd does not make it smaller)."""
        entry = self.entry_of(digest)
        chunk = self.chunk_of.get(digest) or _Chunk(digest, entry.nbytes, 0, entry.itemsize, None)
        data = bytes(self.original(chunk))
        frame = encode(data, None, entry.itemsize)
        if len(frame) < len(data):
            self.store_bytes(chunk, frame, None, entry.itemsize)
        else:
            self.store_bytes(dataclasses.replace(chunk, xxh3=checksum(data)), data, None, 0)

    # ------------------------------------------------------------------ manifests

    def _compacted_manifests(self, compacted: list[int]) -> dict[int, dict[str, Any]]:
        """Format-2 manifests of the compacted versions that had a checkpoint file:
        their weights as tensor records, in the order the file held them."""
        out = {}
        for v in compacted:
            m = self.manifests[v]
            if m["checkpoint"] is None:
                continue
            file = m["checkpoint"]["file"]
            table = self.tables[v]
            spans, metadata = self.spans[file]
            tensors = []
            for span in spans:
                chunks = [
                    [c.digest.hex(), c.nbytes, c.xxh3]
                    for i in range(-(-span.nbytes // fmt.CHUNK_BYTES))
                    for c in [table[f"model/{span.name}#{i}"]]
                ]
                record = {"dtype": span.dtype, "shape": list(span.shape), "chunks": chunks}
                tensors.append([span.name, {TAG_TENSOR: record}])
            out[v] = dict(
                m,
                format_version=fmt.COMPACTED_FORMAT_VERSION,
                checkpoint=None,
                model={
                    "file": file,
                    "weights": m["checkpoint"]["weights"],
                    "metadata": metadata,
                    "tensors": {TAG_MAP: tensors},
                },
            )
        return out


def _element_size(record: ArrayRecord) -> int:
    if record.kind == TAG_NDARRAY:
        return NUMPY_DTYPES[record.dtype].itemsize
    return TENSOR_ITEMSIZES[record.dtype]


def compaction_order(
    parents: dict[int, int | None], roots: list[int]
) -> list[tuple[int, int | None]]:
    """Each version with its *base*: its neighbour on the tree path towards the nearest root.

    History is a tree (parent links); ``roots`` (HEAD first) anchor it. Walking
    outwards from HEAD, a version's base is the version it was reached from: the child
    towards HEAD for HEAD's ancestors, the parent for versions on other branches. A
    version cut off from HEAD (its parent dropped by gc) hangs off the newest version
    of its own part of the tree, whose base is None. Bases come before the versions
    coded against them.
    """
    neighbours: dict[int, list[int]] = {v: [] for v in parents}
    for v, p in parents.items():
        if p is not None and p in neighbours:
            neighbours[v].append(p)
            neighbours[p].append(v)
    order: list[tuple[int, int | None]] = []
    seen: set[int] = set()
    for root in [*roots, *sorted(parents, reverse=True)]:
        if root in seen or root not in parents:
            continue
        seen.add(root)
        order.append((root, None))
        frontier = [root]
        while frontier:
            nxt = []
            for v in frontier:
                for w in sorted(neighbours[v], reverse=True):
                    if w not in seen:
                        seen.add(w)
                        order.append((w, v))
                        nxt.append(w)
            frontier = nxt
    return order
