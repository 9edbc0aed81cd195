"""The on-disk format of an engram store, version 1.

A store is one directory::

    <store>/
      memory.lmdb/            LMDB environment (data.mdb, lock.mdb)
      blobs/                  pack files holding the bytes of content-addressed blobs
      checkpoints/            one plain safetensors file of model weights per version
      writer.lock             the writer lock (flock); its text names the holder

``memory.lmdb`` holds four named databases:

``meta``
    ``format_version`` (ASCII int), ``store_id`` (32 hex chars), ``created_at``
    (ISO-8601 UTC), ``next_version`` and ``next_pack`` (ASCII ints; ids of
    published versions and packs are never reused).
``blobs``
    the content-addressed index. key: the 32-byte SHA-256 digest of a blob;
    value: 32 bytes, four little-endian uint64: pack id, offset, length, XXH3-64
    of the blob. The blob's bytes are at that offset of ``blobs/pack-<id:08d>.bin``
    (see :mod:`engram.store.packs`). A blob is at most :data:`CHUNK_BYTES`: a
    tensor's bytes are its elements in C order, little-endian, split into
    consecutive chunks of ``CHUNK_BYTES`` (the last one shorter). Equal chunks are
    stored once.
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

A ``<tree>`` is JSON in which these one-key objects stand for non-JSON values:

* ``{"__tensor__": {"dtype": "float32", "shape": [2, 3], "chunks": [[sha256_hex, nbytes,
  xxh3_64], ...]}}`` — a ``torch.Tensor``;
* ``{"__ndarray__": <same>}`` — a ``numpy.ndarray``;
* ``{"__samples__": <same, 1-d int64>}`` — replay-sample ids this version references
  (``gc`` keeps those samples); loads as an int64 tensor;
* ``{"__tuple__": [...]}`` — a tuple;
* ``{"__map__": [[key, value], ...]}`` — a dict whose keys are not all plain strings
  (int keys of an optimizer state, or string keys starting with ``__``).

A version whose weights equal its parent's (same ``weights`` digest) names the
parent's checkpoint file instead of writing a copy.

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
"""

from __future__ import annotations

FORMAT_VERSION = 1

LMDB_DIR = "memory.lmdb"
BLOB_DIR = "blobs"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "writer.lock"
# Written beside the store by engram-train (resolved configs, TensorBoard events): a
# directory holding only these may still become a store.
RUN_DIRS = ("hydra", "tb")

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
