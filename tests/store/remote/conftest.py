"""A real S3 implementation for the remote's tests: moto's server on 127.0.0.1.

The server is started once per module on a free port (``port=0``: the OS picks one) and
stopped after it; each test gets its own prefix in one bucket and the standard AWS
variables (dummy credentials, ``AWS_ENDPOINT_URL``) through ``monkeypatch``, so they are
restored after the test. Nothing leaves 127.0.0.1: instance metadata, which object_store
asks when no credentials are set, is pointed at a closed local port.
"""

from __future__ import annotations

import itertools
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

BUCKET = "engram-remote-tests"
START_DEADLINE_S = 30.0
_prefixes = itertools.count()


@dataclass
class S3:
    """The emulator: its endpoint, and a boto3 client for looking at (and damaging) objects."""

    endpoint: str
    client: object  # boto3 S3 client

    def key_of(self, url: str, key: str) -> str:
        return url.split(f"s3://{BUCKET}/", 1)[1] + "/" + key

    def keys(self, url: str) -> list[str]:
        prefix = url.split(f"s3://{BUCKET}/", 1)[1] + "/"
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"][len(prefix) :] for page in pages for o in page.get("Contents", [])]

    def read(self, url: str, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=self.key_of(url, key))["Body"].read()

    def overwrite(self, url: str, key: str, data: bytes) -> None:
        """An unconditional write behind engram's back (damage, or a foreign writer)."""
        self.client.put_object(Bucket=BUCKET, Key=self.key_of(url, key), Body=data)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3]:
    pytest.importorskip("obstore")  # engram-cl[remote]
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        deadline = time.monotonic() + START_DEADLINE_S
        while True:  # bounded: the server thread may need a moment to accept
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield S3(endpoint, client)
    finally:
        server.stop()


@pytest.fixture
def s3(
    s3_server: S3, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> S3:
    """The emulator, with the environment a user of a real S3 would have."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT",
                 "AWS_ALLOW_HTTP"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    # the developer's own ~/.aws profiles are not read (engram reads a default profile)
    missing = tmp_path_factory.mktemp("no-aws")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(missing / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing / "credentials"))
    return s3_server


@pytest.fixture
def remote_url(s3: S3, request: pytest.FixtureRequest) -> str:
    """A fresh prefix of the bucket for this test."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]
    return f"s3://{BUCKET}/t{next(_prefixes)}-{name}"
