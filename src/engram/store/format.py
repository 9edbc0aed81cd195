"""The on-disk format of an engram store, version 3 (a superset of versions 1 and 2).

A store is one directory::

    <store>/
      memory.lmdb/            LMDB environment (data.mdb, lock.mdb)
      blobs/                  pack files holding the bytes of content-addressed blobs
      checkpoints/            one plain safetensors file of model weights per version,
                              or a model artifact file (format 4; e.g. ``.skops``)
      writer.lock             the writer lock (flock); its text names the holder

``memory.lmdb`` holds five named databases. In a format-3 store every value in every
one of them is *sealed*: the bytes described below followed by 8 bytes, the XXH3-64
(little-endian) of the database name, a NUL byte, the key and those bytes
(:mod:`engram.store.records`); a reader checks it and reports a mismatch as corruption
naming the database and key. ``meta/records`` = ``sealed-xxh3-64`` (itself sealed) marks
such a store. Stores of formats 1 and 2 have no seals (and no ``meta/records``) until
``engram upgrade`` rewrites every record sealed, in one transaction.

The databases:

``meta``
    ``format_version`` (ASCII int: 3 for a store created by this engram; a store made
    by an older one says 1, or 2 once :meth:`~engram.store.Store.compact` wrote what only
    format 2 has, until it is upgraded), ``records`` (format 3: ``sealed-xxh3-64``),
    ``store_id`` (32 hex chars), ``created_at``
    (ISO-8601 UTC), ``next_version`` and ``next_pack`` (ASCII ints; ids of
    published versions and packs are never reused); ``signature/<id>`` (ASCII id) for
    each signed version: JSON ``{"algorithm": "ed25519", "key": <key id>, "signature":
    <base64>}`` over the manifest without ``parent`` (:mod:`engram.store.signing`),
    written in the transaction that publishes it; compaction adds ``"compacted":
    {"format_version", "checkpoint", "header"}`` (the manifest's fields as signed, the
    checkpoint's safetensors header in base64) when it rewrites that manifest. Readers
    that do not check signatures ignore these keys.
``blobs``
    the content-addressed index. key: the 32-byte SHA-256 digest of a blob (of its
    plain bytes, however it is stored). A blob is at most :data:`CHUNK_BYTES`: a
    tensor's bytes are its elements in C order, little-endian, split into
    consecutive chunks of ``CHUNK_BYTES`` (the last one shorter). Equal chunks are
    stored once. The value says where the bytes are (integers little-endian):

    * *plain* (format 1), 32 bytes, four uint64: pack id, offset, length, XXH3-64 of
      the blob. The bytes are at that offset of ``blobs/pack-<id:08d>.bin`` (see
      :mod:`engram.store.packs`).
    * *encoded* (format 2): ``b"D"``, uint8 codec (1: zstd), uint8 itemsize (1, 2, 4,
      8), uint8 has_base, five uint64: pack id, offset, stored length, XXH3-64 of the
      stored bytes, length of the blob; then, if has_base, the 32-byte digest of the
      *base* blob (45 or 77 bytes). The stored bytes are one zstd frame of the blob
      transformed against its base (:mod:`engram.store.delta`): per ``itemsize``-byte
      unsigned element, ``zigzag(blob - base)`` (modulo 2**(8*itemsize)), or the blob
      itself for a *keyframe* without base; then the bytes grouped by significance
      (all first bytes, then all second bytes, ...). A blob's chain of bases has at
      most 16 links (``delta.MAX_CHAIN``) and no cycle.
    * *file* (format 2): ``b"F"``, three uint64: offset, length, XXH3-64; then the
      ASCII name of a checkpoint file (``model-vNNNN[-expN].safetensors``) that some
      version names: the blob is that span of the file (a base can be HEAD's weights
      without a copy).
``versions``
    key: the version id as an 8-byte big-endian unsigned int; value: the
    manifest, UTF-8 JSON (below).
``refs``
    ``HEAD`` and ``tag/<name>``; value: a version id (ASCII int).
``samples``
    replay samples, written once each (:mod:`engram.store.samples`). key: the sample
    id as an 8-byte big-endian uint (from ``meta/next_sample``, never reused);
    value: the record's raw bytes, laid out by the buffer that wrote it.

A manifest is a JSON object::

    {"format_version": 1, "engram_version": "0.1.0", "store_id": "...",
     "id": 7, "parent": 6 | null, "created_at": "2026-11-20T21:59:00.123456Z",
     "message": "...", "meta": {...},            # free JSON (clock, config, ...)
     "state": <tree>,                            # the committed state mapping
     "checkpoint": null | {"file": "model-v0007-exp3.safetensors",
                           "sha256": "<hex>", "nbytes": N, "xxh3": <int>,
                           "weights": "<xxh3-128 hex of the tensors alone>"},
     "nbytes": N,                                # logical bytes of state + checkpoint
     "new_bytes": N}                             # bytes this commit wrote

A version whose model is not a set of tensors (a scikit-learn estimator) holds it as
an *artifact* instead (format 4; its manifest says ``"format_version": 4`` and the
store's ``meta/format_version`` is raised to 4 in the transaction that publishes the
first one, so an older engram refuses the store instead of misreading it)::

     "artifact": {"file": "model-v0007-exp3.skops", "format": "skops",
                  "sha256": "<hex>", "nbytes": N, "xxh3": <int>}

The store writes, hashes, verifies and collects the file like a checkpoint but never
parses it (:mod:`engram.store.artifact`); the ``"artifact"`` key is absent from every
other manifest. Compaction leaves such versions as they are. Only a sealed store
(format 3 or newer) takes artifacts.

A ``<tree>`` is JSON in which these one-key objects stand for non-JSON values:

* ``{"__tensor__": {"dtype": "float32", "shape": [2, 3], "chunks": [[sha256_hex, nbytes,
  xxh3_64], ...]}}`` — a ``torch.Tensor``;
* ``{"__ndarray__": <same>}`` — a ``numpy.ndarray``;
* ``{"__samples__": <same, 1-d int64>}`` — replay-sample ids this version references
  (``gc`` keeps those samples); loads as an int64 tensor;
* ``{"__tuple__": [...]}`` — a tuple;
* ``{"__map__": [[key, value], ...]}`` — a dict whose keys are not all plain strings
  (int keys of an optimizer state, or string keys starting with ``__``).

``parent`` is the version HEAD named when this one was committed. When ``gc`` deletes
a version, every kept version whose parent it was is re-linked, in the transaction
that deletes it, to its nearest kept ancestor (``null`` if none is kept), so the
versions always form a tree: no parent is missing and none is its own ancestor
(``verify`` checks both). ``refs`` may lack ``HEAD`` while versions exist: a failed
regression gate on a stream's first experience resets it.

A version whose weights equal its parent's (same ``weights`` digest) names the
parent's checkpoint file instead of writing a copy.

A *compacted* version (format 2; its manifest says ``"format_version": 2``) has
``"checkpoint": null`` and its weights in the blob store instead::

     "model": {"file": "model-v0007-exp3.safetensors",     # the file it had
               "weights": "<xxh3-128 hex>", "metadata": {...},  # the file's metadata
               "tensors": {"__map__": [[name, {"__tensor__": <record>}], ...]}}

in the order the file held them. Manifests of plain commits stay format 1.

Every other JSON object is a dict with string keys, none starting with ``__``.
``xxh3_64`` is a fast checksum of the chunk checked on every load; the SHA-256
digest is re-checked by ``verify`` and ``load(verify=True)``.

The commit protocol: (1) new blobs, appended to a new pack file, fsynced; (2) the
checkpoint file, written to a temporary name, fsynced, renamed; both directories
fsynced; (3) one LMDB write transaction that puts the new blobs' index entries and
the manifest, moves ``HEAD`` and bumps ``next_version`` and ``next_pack``. LMDB
transactions are durable on commit (fsync). A crash before (3) leaves HEAD on the
previous version; what (1) and (2) wrote is collected by ``gc``. Nothing in a
store is pickled and nothing stored is ever executed.

Compaction: (1) encoded (and plain) blobs appended to a new pack, fsynced; (2) one
LMDB write transaction puts their index entries (replacing those of the same digests)
and the compacted manifests, bumps ``next_pack`` and sets ``format_version`` to 2 (if it
was lower);
(3) as ``gc``: packs and checkpoint files nothing references any more are removed
(after a transaction that repoints the index of rewritten packs). A crash at any
point leaves every version loadable; leftovers are collected by the next ``gc``.
"""

from __future__ import annotations

import re

# The newest format this engram reads and writes. A store records the oldest format
# that describes it: 3 for every store created now (sealed records), 4 once it holds a
# model artifact; a store made by an older engram stays 1 (or 2 once compacted) until
# ``engram upgrade`` seals it. Each manifest records its own: 1 for a plain commit, 2
# for a compacted version, 4 for one with an artifact.
FORMAT_VERSION = 4
ARTIFACT_FORMAT_VERSION = 4  # a manifest (and a store) holding a model artifact file
SEALED_FORMAT_VERSION = 3  # every LMDB record carries a checksum (engram.store.records)
COMPACTED_FORMAT_VERSION = 2  # delta-coded blobs and compacted manifests
PLAIN_FORMAT_VERSION = 1

LMDB_DIR = "memory.lmdb"
BLOB_DIR = "blobs"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "writer.lock"
# The name of a checkpoint file, as manifests and file index entries give it: a name,
# never a path (nothing stored can point outside checkpoints/).
CHECKPOINT_NAME = re.compile(r"model-v\d+(-exp\d+)?\.safetensors")
# Model artifact formats (the file's suffix) and their file names.
ARTIFACT_FORMATS = ("skops",)
ARTIFACT_NAME = re.compile(rf"model-v\d+(-exp\d+)?\.({'|'.join(ARTIFACT_FORMATS)})")

DB_META = b"meta"
DB_BLOBS = b"blobs"
DB_VERSIONS = b"versions"
DB_REFS = b"refs"
DB_SAMPLES = b"samples"
ALL_DBS = (DB_META, DB_BLOBS, DB_VERSIONS, DB_REFS, DB_SAMPLES)

HEAD_REF = b"HEAD"
TAG_PREFIX = b"tag/"

# 16 MiB bounds a single LMDB value (and so a single copy) while keeping the
# per-chunk overhead (one key, one hash call) negligible for large tensors.
CHUNK_BYTES = 16 * 1024 * 1024
