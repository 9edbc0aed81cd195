"""Signed versions: an ed25519 signature over each version's manifest, made at commit.

Record seals (:mod:`engram.store.records`) stop accidents, not people: whoever can write
the store can edit a manifest and recompute its XXH3 seal. A signature made with a key
the store never holds cannot be recomputed that way. A manifest binds, by SHA-256, every
state chunk, the checkpoint or artifact file and the replay-sample ids, so one signature
per version covers everything the version references.

What is signed: ``SIGNED_PREFIX`` followed by the manifest as stored
(:func:`~engram.store.history.manifest_bytes`) *without its* ``parent`` *field*: ``gc``
re-links a kept version's parent when it drops the parent (and holds no key), so the
link to the tree is not signed; everything else is. The signature lives in the ``meta``
database under ``signature/<id>`` (ASCII id), a sealed JSON record
``{"algorithm": "ed25519", "key": <key id>, "signature": <base64>}``, written in the
transaction that publishes the version; older engram versions never read it.

Compaction (:mod:`engram.store.compact`) rewrites a version's manifest (its checkpoint
file becomes tensor records in blobs) and holds no key, so it keeps what is signed
checkable instead: it adds to the signature record, under ``"compacted"``, the
manifest's ``format_version`` and ``checkpoint`` as signed and the checkpoint file's
safetensors header (base64). Checking a compacted version rebuilds the manifest as
signed from those and checks the signature over it, then that the compacted weights
are that file: the header's tensors are the manifest's, and the SHA-256 of the header
followed by the tensors' bytes is the signed checkpoint's. Neither addition is trusted
on its own: an edited one fails the signature or the hash.

``cryptography`` is imported inside the functions only: ``import engram`` and stores
that are never signed do not need it (``pip install 'engram-cl[sign]'``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb

from engram.errors import CorruptionError, EngramError, UntrustedVersionError
from engram.store import format as fmt
from engram.store.checkpoint import _ST_NAMES, MAX_HEADER_BYTES
from engram.store.codec import TAG_MAP, TAG_TENSOR
from engram.store.env import Env
from engram.store.files import open_read
from engram.store.history import manifest_bytes

if TYPE_CHECKING:
    from engram.store.blobs import Blobs

ALGORITHM = "ed25519"
SIGNED_PREFIX = b"engram-manifest-v1\0"  # a signature of ours is never valid elsewhere
SIGNATURE_PREFIX = b"signature/"  # meta key prefix; the version id follows, in ASCII
_INSTALL = "install it with `pip install 'engram-cl[sign]'`"
COMPACTED = "compacted"  # the signature record's field compaction adds (see above)


def _crypto() -> tuple[Any, Any]:
    """``cryptography``'s ed25519 and serialization modules, or one line saying how to
    install it."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise EngramError(f"signed versions need the `cryptography` library; {_INSTALL}") from None
    return ed25519, serialization


def signature_key(vid: int) -> bytes:
    return SIGNATURE_PREFIX + str(vid).encode()


def signed_ids(env: Env, txn: lmdb.Transaction) -> set[int]:
    """The ids of the versions that carry a signature record (valid or not)."""
    return {int(k[len(SIGNATURE_PREFIX) :]) for k in env.keys(txn, fmt.DB_META, SIGNATURE_PREFIX)
            if k[len(SIGNATURE_PREFIX) :].isdigit()}  # fmt: skip


def signed_bytes(manifest: dict[str, Any]) -> bytes:
    """What a version's signature covers: the manifest without ``parent`` (see above)."""
    return SIGNED_PREFIX + manifest_bytes({k: v for k, v in manifest.items() if k != "parent"})


def key_id(raw_public: bytes) -> str:
    """A public key's id: the first 16 hex digits of the SHA-256 of its 32 raw bytes."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _raw(public: Any) -> bytes:
    _, serialization = _crypto()
    enc = serialization.Encoding.Raw
    return public.public_bytes(enc, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Signer:
    """A private key that signs manifests (:func:`load_signer`); never written to the store."""

    private: Any
    key_id: str

    def sign(self, manifest: dict[str, Any]) -> bytes:
        """The signature record (JSON bytes) of ``manifest``."""
        sig = self.private.sign(signed_bytes(manifest))
        record = {"algorithm": ALGORITHM, "key": self.key_id,
                  "signature": base64.b64encode(sig).decode()}  # fmt: skip
        return json.dumps(record, separators=(",", ":")).encode()

    def __repr__(self) -> str:  # never the key itself (logs, tracebacks)
        return f"Signer(key {self.key_id})"


@dataclass(frozen=True)
class TrustedKey:
    """A public key versions must be signed by (:func:`load_trusted`)."""

    public: Any
    key_id: str
    source: str  # the file it came from, for messages


def generate_key(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """Write a new ed25519 private key to ``path`` (PEM, mode 0600; refused if it exists)
    and its public key to ``path.pub``; returns the public file and the key id."""
    ed25519, serialization = _crypto()
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    public = private.public_key()
    pub_pem = public.public_bytes(serialization.Encoding.PEM,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
    path = Path(path).expanduser()
    pub_path = path.with_name(path.name + ".pub")
    try:  # O_EXCL: never overwrite a key; 0600 from the start, not chmod'ed after
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise EngramError(
            f"{path} exists; choose another file (a key is never overwritten)"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(pub_pem)
    return pub_path, key_id(_raw(public))


def load_signer(path: str | os.PathLike[str]) -> Signer:
    """The ed25519 private key in PEM file ``path`` (``engram keygen``)."""
    ed25519, serialization = _crypto()
    try:
        private = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise EngramError(f"cannot read signing key {path}: {e}; make one with "
                          "`engram keygen KEYFILE`") from None  # fmt: skip
    if not isinstance(private, ed25519.Ed25519PrivateKey):
        raise EngramError(f"signing key {path} is not an ed25519 key; make one with "
                          "`engram keygen KEYFILE`")  # fmt: skip
    return Signer(private, key_id(_raw(private.public_key())))


def load_trusted(key: str | os.PathLike[str] | TrustedKey) -> TrustedKey:
    """The public key in PEM file ``key`` (``KEYFILE.pub`` from ``engram keygen``)."""
    if isinstance(key, TrustedKey):
        return key
    ed25519, serialization = _crypto()
    try:
        public = serialization.load_pem_public_key(Path(key).read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise EngramError(f"cannot read public key {key}: {e}; pass the KEYFILE.pub "
                          "that `engram keygen KEYFILE` wrote") from None  # fmt: skip
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise EngramError(f"public key {key} is not an ed25519 key")
    return TrustedKey(public, key_id(_raw(public)), str(key))


def signature_problem(
    env: Env,
    txn: lmdb.Transaction,
    manifest: dict[str, Any],
    trusted: TrustedKey,
    blobs: Blobs | None = None,
) -> str | None:
    """Why version ``manifest`` is not signed by ``trusted`` (None: it is).

    A compacted version is checked against the manifest as signed (module docstring),
    which reads and hashes its weights (through ``blobs``, or the store's own index).
    """
    from cryptography.exceptions import InvalidSignature

    raw = env.get(txn, fmt.DB_META, signature_key(manifest["id"]))
    if raw is None:
        return "not signed"
    try:
        record = json.loads(bytes(raw))
        sig = base64.b64decode(record["signature"], validate=True)
        algorithm, signer = record["algorithm"], record["key"]
    except (ValueError, KeyError, TypeError):
        return "its signature record is malformed"
    if algorithm != ALGORITHM:
        return f"signed with {algorithm!r}, not {ALGORITHM}"
    if signer != trusted.key_id:
        return f"signed by key {signer}, not the trusted key {trusted.key_id}"
    compacted = manifest.get("model") is not None
    try:
        signed = _as_signed(manifest, record.get(COMPACTED)) if compacted else manifest
    except (ValueError, KeyError, TypeError):
        return "it was compacted, and its signature record lacks the checkpoint it signed"
    try:
        trusted.public.verify(sig, signed_bytes(signed))
    except InvalidSignature:
        return f"its signature by key {signer} does not match the manifest (edited after signing)"
    if compacted:
        return _compacted_weights_problem(env, txn, manifest, record[COMPACTED], blobs)
    return None


def compaction_record(raw: bytes, manifest: dict[str, Any], header: bytes) -> bytes:
    """The signature record ``raw`` of version ``manifest`` (as signed, before compaction)
    with what checking it needs once compaction has rewritten the manifest: the signed
    ``format_version`` and ``checkpoint``, and the checkpoint file's ``header`` bytes."""
    try:
        record = json.loads(raw)
        if not isinstance(record, dict):
            raise TypeError
    except (ValueError, TypeError):
        return raw  # malformed: stays so (verify --trust reports it)
    record[COMPACTED] = {"format_version": manifest["format_version"],
                         "checkpoint": manifest["checkpoint"],
                         "header": base64.b64encode(header).decode()}  # fmt: skip
    return json.dumps(record, separators=(",", ":")).encode()


def checkpoint_header(path: Path) -> bytes:
    """The safetensors header of checkpoint file ``path``: its 8-byte length and JSON."""
    with open_read(path) as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        if not 0 <= n <= MAX_HEADER_BYTES:
            raise CorruptionError(f"checkpoint {path.name}: malformed safetensors header")
        text = f.read(n)
    if len(text) != n:
        raise CorruptionError(f"checkpoint {path.name}: header longer than the file")
    return head + text


def _as_signed(manifest: dict[str, Any], kept: dict[str, Any]) -> dict[str, Any]:
    """A compacted manifest as it was signed: compaction's ``model`` out, the signed
    ``format_version`` and ``checkpoint`` back in their places (the key order is kept)."""
    original = {"format_version": kept["format_version"], "checkpoint": kept["checkpoint"]}
    return {k: original.get(k, v) for k, v in manifest.items() if k != "model"}


def _compacted_weights_problem(
    env: Env,
    txn: lmdb.Transaction,
    manifest: dict[str, Any],
    kept: dict[str, Any],
    blobs: Blobs | None,
) -> str | None:
    """Why a compacted version's weights are not the checkpoint file its signature
    covers (None: they are, byte for byte)."""
    from engram.store.blobs import Blobs

    model, signed = manifest["model"], kept["checkpoint"]
    edited = "its compacted weights are not the checkpoint it signed"
    try:
        header = base64.b64decode(kept["header"], validate=True)
        (n,) = struct.unpack_from("<Q", header)
        entries = json.loads(header[8 : 8 + n])
        metadata = entries.pop("__metadata__", None) or {}
        if not isinstance(signed, dict) or len(header) != 8 + n:
            raise ValueError
    except (ValueError, TypeError, KeyError, AttributeError, struct.error):
        return f"{edited}: the header kept for its signature is malformed"
    if (model["file"], model["weights"], model["metadata"]) != (
        signed.get("file"),
        signed.get("weights"),
        metadata,
    ):
        return f"{edited}: another file name, weights digest or metadata"
    expected, offset, chunks = {}, 0, []
    try:  # the manifest was validated; a map of anything but tensors is not weights
        for name, node in model["tensors"][TAG_MAP]:
            record = node[TAG_TENSOR]
            nbytes = sum(size for _, size, _ in record["chunks"])
            expected[name] = {"dtype": _ST_NAMES.get(record["dtype"]), "shape": record["shape"],
                              "data_offsets": [offset, offset + nbytes]}  # fmt: skip
            offset += nbytes
            chunks += [digest for digest, _, _ in record["chunks"]]
    except (KeyError, TypeError, ValueError):
        return f"{edited}: its weights are not a map of tensors"
    if entries != expected:
        return f"{edited}: its tensors differ from the header's"
    reader = blobs if blobs is not None else Blobs(env)
    try:
        sha, total = hashlib.sha256(header), len(header)
        for digest in chunks:
            data = reader.blob(txn, digest)
            if data is None:
                return f"{edited}: blob {digest[:12]} is missing"
            sha.update(data)
            total += len(data)
            data = None  # no view of a mapped file outlives the loop (closed below)
    except CorruptionError as e:  # reported as the version's problem too (verify)
        return f"{edited}: {e}"
    finally:
        if blobs is None:
            reader.close()
    if (total, sha.hexdigest()) != (signed.get("nbytes"), signed.get("sha256")):
        return f"{edited}: their bytes do not hash to its SHA-256 (edited after signing)"
    return None


def require_signed(store: Any, version: Any, trust: str | os.PathLike[str] | TrustedKey) -> int:
    """The id ``version`` names in ``store``, if it is signed by ``trust``'s key.

    Raises:
        UntrustedVersionError: unsigned, signed by another key, or edited after signing.
    """
    from engram.store.values import version_name

    trusted = load_trusted(trust)
    manifest = store.manifest(version)  # resolved once: the caller loads by this id
    vid = manifest["id"]
    with store.env.read() as txn:
        problem = signature_problem(store.env, txn, manifest, trusted, store._blobs)
    if problem is not None:
        raise UntrustedVersionError(
            f"{store.path} {version_name(vid)}: {problem}; refusing to load it (load a "
            f"version signed by key {trusted.key_id}, or pass no trust key)"
        )
    return vid
