"""The object-store client of a remote: the few operations the protocol needs.

Library choice: `obstore <https://developmentseed.org/obstore>`_, the Python binding of
Rust's ``object_store`` (Apache Arrow). It signs requests itself (SigV4, no
hand-written signing here), speaks S3, GCS and Azure behind one API, and its
``put(mode="create")`` / ``put(mode={"e_tag": ...})`` are the S3 conditional writes
this protocol rests on (``If-None-Match: *`` and ``If-Match``, 412 → ``AlreadyExists`` /
``Precondition``), also for multipart uploads. s3fs (fsspec) was the alternative: it
has create-only writes but no If-Match compare-and-swap, which HEAD needs. Credentials
and the endpoint come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL``, web identity, ECS and instance metadata), read by object_store;
engram never stores or prints one.

AWS profiles (``AWS_PROFILE``, or a ``default`` profile in ``~/.aws/config`` /
``~/.aws/credentials`` when the environment holds no keys) are not read by object_store:
there, the credentials come from boto3's own chain through obstore's
``Boto3CredentialProvider`` (so static keys, ``credential_process``, SSO and assumed
roles work as in the AWS CLI), and the profile's ``endpoint_url`` (top level or its
``services`` section's ``s3``) is used unless ``AWS_ENDPOINT_URL`` is set
(:func:`aws_profile`). Without boto3 installed, a profile in use is one line saying so.

``file:///ABS/PATH`` (a directory, e.g. a shared mount used as an object store) goes
through obstore's ``LocalStore`` (object_store's ``LocalFileSystem``): a create-only
write stages the bytes beside the key and ``link(2)``s them into place (``EEXIST`` →
``AlreadyExists``: atomic on a local file system and on NFS), but it has no ``If-Match``
(``PutMode::Update`` is not implemented) and writes without ``fsync``. So there, this
client adds the two: every write is fsynced (the file and its directory), and a
compare-and-swap of HEAD or a tag is a create-only *claim* ``claims/<key>/<sha256 of the
value it replaces>`` holding the new value — exactly one writer can claim a value away
— after which the key itself is renamed over (a shortcut). A reader follows the claims
from the key's value (:meth:`ObjectStore.get` with ``swapped=True``), so a writer killed
between its claim and the rename has still moved the key, and a slow writer's rename of
an older value hides nothing. A swapped value never repeats (HEAD only moves forward; a
tag carries a sequence number), so the claims form a chain.

obstore is imported inside :class:`ObjectStore` only: ``import engram`` and the
``engram`` command stay light, and the library is an optional extra
(``pip install 'engram-cl[remote]'``).
"""

from __future__ import annotations

import configparser
import datetime as _dt
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from engram.errors import RemoteError, RemoteUnreachableError

# Remote URL schemes engram takes (file://: a directory, see the module docstring)
SCHEMES = ("s3", "gs", "az", "file")
_CLAIMS = "claims/"  # file:// only: the compare-and-swap claims (module docstring)
_MAX_CLAIMS = 10**6  # bounds a walk of a damaged (cyclic) claim chain
# A down or slow remote fails a push within about this long (object_store's own default
# retries for 180 s): the local commit is safe either way, and `engram push` resumes.
MAX_RETRIES = 3
RETRY_TIMEOUT_S = 30.0
_STATUS = re.compile(r"status code: (\d{3})")
_URL_QUERY = re.compile(r"(https?://[^\s?]+)\?\S*")  # signed query strings never printed
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A profile section holding one of these is something boto3 would use (region alone is not)
_PROFILE_KEYS = ("aws_access_key_id", "role_arn", "credential_process", "sso_session",
                 "sso_start_url", "web_identity_token_file", "endpoint_url",
                 "services")  # fmt: skip
# Environment credentials that object_store reads itself: with any of them, no profile
_ENV_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_WEB_IDENTITY_TOKEN_FILE",
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI")  # fmt: skip
_providers: dict[tuple[Any, ...], tuple[Any, str | None]] = {}  # one boto3 session per setup


class AlreadyExists(Exception):
    """A create-only write found the key taken (S3: 412 on ``If-None-Match: *``)."""


class Stale(Exception):
    """A compare-and-swap found another ETag (S3: 412 on ``If-Match``)."""


@dataclass(frozen=True)
class Got:
    """An object read whole: its bytes and the ETag a compare-and-swap names."""

    data: bytes
    etag: str | None


def is_url(target: object) -> bool:
    """Whether ``target`` names a remote (``scheme://...``) rather than a local path."""
    return isinstance(target, str) and bool(_URL.match(target))


def check_url(url: str) -> str:
    """``url`` if engram can use it as a remote (``s3://bucket/prefix``, ``gs://``, ``az://``,
    ``file:///abs/path``), without a trailing slash; a URL with user info or a query (a
    place credentials could leak into manifests, logs or ``remote.json``) is refused."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc or not parts.path.startswith("/") or parts.query or parts.fragment:
            raise RemoteError(
                "a file:// remote is a local directory named by its absolute path, "
                "file:///ABS/PATH (no host, no query)"
            )
        return "file://" + (parts.path.rstrip("/") or "/")
    if parts.scheme not in SCHEMES or not parts.netloc:
        shown = parts.scheme + "://" if parts.scheme else repr(url[:40])
        raise RemoteError(
            f"remote {shown}... is not an object-store URL engram takes: use "
            "s3://BUCKET/PREFIX (gs://, az:// likewise) or file:///ABS/PATH"
        )
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise RemoteError(
            f"remote {parts.scheme}://{parts.hostname}/...: a remote URL carries no user info "
            "or query; give credentials through the environment (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY or an instance role)"
        )
    return url.rstrip("/")


@dataclass(frozen=True)
class ObjectMeta:
    """One listed object: its key, when the server last wrote it, its size."""

    key: str
    last_modified: _dt.datetime
    size: int


def _shared_files() -> tuple[Path, Path]:
    config = os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"
    credentials = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
    return Path(config).expanduser(), Path(credentials).expanduser()


def _profile_section(name: str) -> dict[str, str]:
    """What the shared files say of profile ``name`` (both files' sections merged); a
    file that cannot be parsed says nothing here (boto3 then reports it)."""
    config, credentials = _shared_files()
    found: dict[str, str] = {}
    for path, section in (
        (config, "default" if name == "default" else f"profile {name}"),
        (credentials, name),
    ):
        parser = configparser.RawConfigParser(strict=False)
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if parser.has_section(section):
            found.update(parser.items(section))
    return found


def aws_profile() -> str | None:
    """The AWS profile an s3:// remote is read with, or None (the environment, as
    object_store reads it): ``AWS_PROFILE``, else ``default`` when the environment has
    no credentials and the shared files give that profile credentials or an endpoint."""
    name = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    if name:
        return name
    if any(os.environ.get(v) for v in _ENV_CREDENTIALS):
        return None
    section = _profile_section("default")
    return "default" if any(k in section for k in _PROFILE_KEYS) else None


def _profile_setup(url: str, name: str) -> tuple[Any, str | None]:
    """Profile ``name``'s credential provider and its endpoint (None: not in the profile
    or set in the environment), through boto3; one line for what goes wrong, never a key."""
    config, credentials = _shared_files()
    where = f"remote {url}: AWS profile {name!r}"
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ProfileNotFound
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise RemoteError(
            f"{where} is read through boto3, which is not installed: pip install boto3 (or "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and unset AWS_PROFILE)"
        ) from None
    stamp = tuple(p.stat().st_mtime_ns if p.exists() else None for p in (config, credentials))
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    key = (name, str(config), str(credentials), stamp, hash(env))
    if key in _providers:
        return _providers[key]
    try:
        # not profile_name=: as in the AWS CLI, keys in the environment win over AWS_PROFILE
        session = boto3.Session()
        provider = Boto3CredentialProvider(session)
        endpoint = None
        if not (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")):
            endpoint = _profile_endpoint(session._session)
    except ProfileNotFound:
        raise RemoteError(
            f"{where} is in neither {config} nor {credentials}; add it there, or set "
            "AWS_PROFILE to a profile they hold"
        ) from None
    except ValueError:  # Boto3CredentialProvider: the chain found no credentials
        raise RemoteError(
            f"{where} gives no credentials; add aws_access_key_id and aws_secret_access_key "
            f"to it in {credentials} (or a role or credential_process in {config})"
        ) from None
    except BotoCoreError as e:  # a malformed file, a partial key pair: the class says which
        raise RemoteError(f"{where} cannot be used ({type(e).__name__}); fix it in "
                          f"{config} or {credentials}") from None  # fmt: skip
    _providers[key] = (provider, endpoint)
    return provider, endpoint


def _profile_endpoint(session: Any) -> str | None:
    """The S3 endpoint a profile names: its ``services`` section's ``s3`` entry, else its
    own ``endpoint_url`` (botocore's order after the environment, which is checked first)."""
    scoped = session.get_scoped_config()
    services = session.full_config.get("services", {}).get(scoped.get("services", ""), {})
    s3 = services.get("s3", {}) if isinstance(services, dict) else {}
    endpoint = (s3.get("endpoint_url") if isinstance(s3, dict) else None) or scoped.get(
        "endpoint_url"
    )
    return str(endpoint) if endpoint else None


@dataclass
class Traffic:
    """Bytes moved by one client, for reports and the tests' proportionality checks."""

    up: int = 0
    down: int = 0
    puts: list[tuple[str, int]] = field(default_factory=list)  # (key, bytes) per upload


class ObjectStore:
    """One remote prefix: reads, create-only writes, compare-and-swap, listing.

    Keys are relative to the URL's prefix. Errors are :class:`RemoteError` in one line
    naming the remote and the key, never a credential.
    """

    def __init__(self, url: str, *, create: bool = False, timeout_s: float | None = None) -> None:
        """``create``: a file:// remote's directory is made if missing (a push);
        ``timeout_s``: each request within that long, no retry (a quick look, as
        ``engram ls`` takes); default: :data:`MAX_RETRIES` within :data:`RETRY_TIMEOUT_S`."""
        self.url = check_url(url)
        self.traffic = Traffic()
        # file:// (LocalStore): no If-Match and no fsync of its own (module docstring)
        self.local_root = Path(self.url[len("file://") :]) if self.url.startswith("file:") else None
        try:
            from obstore.store import from_url  # lazy: see the module docstring
        except ImportError:
            raise RemoteError(
                "a remote needs the obstore library: pip install 'engram-cl[remote]'"
            ) from None

        self._store: Any = None  # a file:// remote's missing directory: an empty remote
        if self.local_root is not None:
            if not create and not self.local_root.is_dir():
                return  # as an S3 prefix holding nothing (a push makes the directory)
            try:
                self._store = from_url(self.url, mkdir=create)
            except Exception as e:
                raise self._error("open", "", e) from None
            return
        options: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        profile = aws_profile() if self.url.startswith("s3://") else None
        if profile is not None:
            provider, named = _profile_setup(self.url, profile)
            extra["credential_provider"] = provider
            if named:
                extra["endpoint"] = endpoint = named
        if self.url.startswith("s3://") and endpoint.startswith("http://"):
            # an S3-compatible server the user named over plain HTTP (a local MinIO, an
            # emulator): object_store refuses HTTP unless told; naming it is telling it
            options["allow_http"] = True
        timeout = _dt.timedelta(seconds=RETRY_TIMEOUT_S if timeout_s is None else timeout_s)
        retry = {"max_retries": MAX_RETRIES if timeout_s is None else 0, "retry_timeout": timeout}
        if timeout_s is not None:
            options["timeout"] = options["connect_timeout"] = timeout
        try:
            self._store = from_url(self.url, client_options=options, retry_config=retry, **extra)
        except Exception as e:
            raise self._error("open", "", e) from None

    # ------------------------------------------------------------------ reads

    def get(self, key: str, *, swapped: bool = False) -> Got | None:
        """The whole object, or None if there is none. ``swapped``: a key moved by
        :meth:`swap` (HEAD, a tag); on file:// its claims are followed, and the ETag is
        the SHA-256 of the value (the name of the claim that would replace it)."""
        if swapped and self.local_root is not None:
            return self._get_claimed(key)
        return self._get(key)

    def _get(self, key: str) -> Got | None:
        import obstore

        if self._store is None:
            return None

        try:
            result = obstore.get(self._store, key)
            data = bytes(result.bytes())
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._error("reading", key, e) from None
        self.traffic.down += len(data)
        return Got(data, result.meta.get("e_tag"))

    def get_into(self, key: str, out: BinaryIO, consume: Callable[[bytes], None]) -> int | None:
        """Stream the object into ``out``, each chunk also to ``consume`` (a hash);
        returns its size, or None if there is none."""
        import obstore

        if self._store is None:
            return None

        n = 0
        try:
            for chunk in obstore.get(self._store, key).stream():
                view = memoryview(chunk)
                out.write(view)
                consume(view)
                n += len(view)
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._error("reading", key, e) from None
        self.traffic.down += n
        return n

    def exists(self, key: str) -> bool:
        import obstore

        if self._store is None:
            return False

        try:
            obstore.head(self._store, key)
        except FileNotFoundError:
            return False
        except Exception as e:
            raise self._error("checking", key, e) from None
        return True

    def list(self, prefix: str) -> Iterator[str]:
        """The keys under ``prefix``."""
        import obstore

        if self._store is None:
            return

        try:
            for batch in obstore.list(self._store, prefix):
                for meta in batch:
                    yield meta["path"]
        except Exception as e:
            raise self._error("listing", prefix, e) from None

    def list_meta(self, prefix: str | None = None) -> Iterator[ObjectMeta]:
        """Every object under ``prefix`` (None: the whole remote) with its server-side
        last-modified time and size (what a remote gc ages objects by)."""
        import obstore

        if self._store is None:
            return

        try:
            for batch in obstore.list(self._store, prefix):
                for meta in batch:
                    yield ObjectMeta(meta["path"], meta["last_modified"], meta["size"])
        except Exception as e:
            raise self._error("listing", prefix or "the remote", e) from None

    # ------------------------------------------------------------------ writes

    def create(self, key: str, data: bytes | Path) -> str | None:
        """Write ``key`` only if it does not exist (``If-None-Match: *``); its ETag.

        Raises:
            AlreadyExists: the key is taken (nothing was written).
        """
        return self._put(key, data, "create")

    def swap(self, key: str, data: bytes, etag: str | None) -> str | None:
        """Replace ``key`` only if its ETag is still ``etag`` (``If-Match``); with
        ``etag=None``, create it only if it does not exist. Its new ETag.

        Raises:
            Stale: the object changed (or was created) meanwhile; nothing was written.
        """
        if self.local_root is not None:
            return self._swap_claimed(key, data, etag)
        if etag is None:
            try:
                return self._put(key, data, "create")
            except AlreadyExists:
                raise Stale(key) from None
        return self._put(key, data, {"e_tag": etag})

    # file:// only: compare-and-swap by create-only claims (module docstring)

    def _get_claimed(self, key: str) -> Got | None:
        got = self._get(key)
        data = None if got is None else got.data
        for _ in range(_MAX_CLAIMS):
            claim = self._get(_claim_key(key, None if data is None else _sha256(data)))
            if claim is None:
                return None if data is None else Got(data, _sha256(data))
            data = claim.data
        raise RemoteError(f"remote {self.url}: the claims of {key} do not end; it is damaged")

    def _swap_claimed(self, key: str, data: bytes, etag: str | None) -> str:
        claim = _claim_key(key, etag)
        try:
            self._put(claim, data, "create")
        except AlreadyExists:
            got = self._get(claim)
            if got is None or got.data != data:  # another writer claimed that value away
                raise Stale(key) from None
        self._put(key, data, "overwrite")  # readers follow the claim whether this lands or not
        return _sha256(data)

    def delete(self, key: str) -> None:
        import obstore

        if self._store is None:
            return

        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:
            return
        except Exception as e:
            raise self._error("deleting", key, e) from None

    def _put(self, key: str, data: bytes | Path, mode: Any) -> str | None:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        if self._store is None:
            raise RemoteError(f"remote {self.url}: the directory does not exist")

        size = len(data) if isinstance(data, bytes) else data.stat().st_size
        try:
            result = obstore.put(self._store, key, data, mode=mode)
        except AlreadyExistsError:
            raise AlreadyExists(key) from None
        except PreconditionError:
            raise Stale(key) from None
        except FileNotFoundError as e:
            if isinstance(mode, dict):  # If-Match on an object deleted meanwhile
                raise Stale(key) from None
            raise self._error("writing", key, e) from None
        except Exception as e:
            raise self._error("writing", key, e) from None
        if self.local_root is not None:
            self._fsync(key)
        self.traffic.up += size
        self.traffic.puts.append((key, size))
        return result.get("e_tag")

    def _fsync(self, key: str) -> None:
        """The object, and the directory entries naming it and its (maybe new) parent
        directories, reach the disk before the next step of the protocol
        (object_store's local file system does not fsync)."""
        assert self.local_root is not None
        path = self.local_root / key
        try:
            for each in (path, *path.parents):
                fd = os.open(each, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if each == self.local_root:
                    break
        except OSError as e:
            raise self._error("writing", key, e) from None

    # ------------------------------------------------------------------ errors

    def _error(self, doing: str, key: str, e: Exception) -> RemoteError:
        """One line: the remote, the key, what went wrong and what to do. The library's
        message is cut to its first line with signed query strings removed."""
        where = f"remote {self.url}" + (f": {doing} {key}" if key else "")
        text = str(e)
        kind = type(e).__name__
        status = _STATUS.search(text)
        code = status.group(1) if status else None
        if self.local_root is not None:  # a directory: the OS's own reason says it
            first = text.strip().splitlines()[0] if text.strip() else kind
            why = f"{kind}: {first[:200]}"
        elif kind in ("UnauthenticatedError", "PermissionDeniedError") or code in ("401", "403"):
            why = (
                "access denied or no credentials; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or run with an instance role) with access to it"
            )
        elif "credential" in text.lower() or "/latest/" in text:  # instance metadata asked
            why = (
                "no credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE, or run with an instance role)"
            )
        elif code == "404" or "NoSuchBucket" in text or isinstance(e, FileNotFoundError):
            why = "the bucket does not exist; create it or fix the URL"
        elif "error sending request" in text or "connect" in text.lower():
            return RemoteUnreachableError(
                f"{where}: the endpoint cannot be reached (down, or AWS_ENDPOINT_URL is "
                "wrong); local versions are intact: fix it, then run the command again"
            )
        else:
            first = _URL_QUERY.sub(r"\1", text.strip().splitlines()[0] if text.strip() else kind)
            why = f"{kind}: {first[:200]}"
        return RemoteError(
            f"{where}: {why}; local versions are intact: fix it, then run the command again"
        )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _claim_key(key: str, etag: str | None) -> str:
    return f"{_CLAIMS}{key}/{etag or 'initial'}"
