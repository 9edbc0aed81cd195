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

``cryptography`` is imported inside the functions only: ``import engram`` and stores
that are never signed do not need it (``pip install 'engram-cl[sign]'``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb

from engram.errors import EngramError, UntrustedVersionError
from engram.store import format as fmt
from engram.store.env import Env
from engram.store.history import manifest_bytes

ALGORITHM = "ed25519"
SIGNED_PREFIX = b"engram-manifest-v1\0"  # a signature of ours is never valid elsewhere
SIGNATURE_PREFIX = b"signature/"  # meta key prefix; the version id follows, in ASCII
_INSTALL = "install it with `pip install 'engram-cl[sign]'`"


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
    env: Env, txn: lmdb.Transaction, manifest: dict[str, Any], trusted: TrustedKey
) -> str | None:
    """Why version ``manifest`` is not signed by ``trusted`` (None: it is)."""
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
    try:
        trusted.public.verify(sig, signed_bytes(manifest))
    except InvalidSignature:
        return f"its signature by key {signer} does not match the manifest (edited after signing)"
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
        problem = signature_problem(store.env, txn, manifest, trusted)
    if problem is not None:
        raise UntrustedVersionError(
            f"{store.path} {version_name(vid)}: {problem}; refusing to load it (load a "
            f"version signed by key {trusted.key_id}, or pass no trust key)"
        )
    return vid
