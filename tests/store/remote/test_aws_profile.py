"""AWS profiles: ``AWS_PROFILE`` (or a ``default`` profile, when the environment has no
keys) read from a temporary ``AWS_CONFIG_FILE`` / ``AWS_SHARED_CREDENTIALS_FILE``
holding dummy keys and the moto server's ``endpoint_url``; mistakes are one line, and no
key is ever printed or written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from remote_helpers import assert_same_store, make_store

from engram.cli import main as engram
from engram.errors import RemoteError
from engram.store.remote import pull, push
from engram.store.remote.client import aws_profile

pytestmark = pytest.mark.timeout(120)
BUCKET = "engram-remote-tests"  # the bucket conftest.py's server holds
KEY_ID, SECRET = "AKIAENGRAMDUMMY0001", "engram-dummy-secret-not-a-real-one"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


@pytest.fixture
def aws(s3_server: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home whose AWS files the test writes; no AWS variable from outside, nothing
    asked of instance metadata (botocore's or object_store's)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / ".aws" / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / ".aws" / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    return home / ".aws"


def url_for(request: pytest.FixtureRequest) -> str:
    return f"s3://{BUCKET}/profile-{request.node.name[:40]}"


def write(aws: Path, config: str, credentials: str = "") -> None:
    (aws / "config").write_text(textwrap.dedent(config))
    (aws / "credentials").write_text(textwrap.dedent(credentials))


def never_shown(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and KEY_ID not in text


def test_a_named_profile_gives_the_keys_and_the_endpoint(
    tmp_path, s3_server, aws, monkeypatch, request, capsys
):
    write(
        aws,
        f"""
        [profile engram-test]
        region = us-east-1
        endpoint_url = {s3_server.endpoint}
        """,
        f"""
        [engram-test]
        aws_access_key_id = {KEY_ID}
        aws_secret_access_key = {SECRET}
        """,
    )
    assert aws_profile() is None  # no AWS_PROFILE, no default profile: the environment
    monkeypatch.setenv("AWS_PROFILE", "engram-test")
    assert aws_profile() == "engram-test"
    a, b, url = tmp_path / "a", tmp_path / "b", url_for(request)
    make_store(a, 2)
    assert engram(["push", str(a), url]) == 0
    assert engram(["ls", url]) == 0
    out, err = capsys.readouterr()
    assert "pushed v0001, v0002" in out
    pull(url, b)
    assert_same_store(a, b)
    never_shown(out, err, (a / "remote.json").read_text(), (b / "remote.json").read_text())


def test_the_default_profile_and_a_services_endpoint(tmp_path, s3_server, aws, request):
    write(
        aws,
        f"""
        [default]
        services = local
        [services local]
        s3 =
          endpoint_url = {s3_server.endpoint}
        """,
        f"""
        [default]
        aws_access_key_id = {KEY_ID}
        aws_secret_access_key = {SECRET}
        """,
    )
    assert aws_profile() == "default"  # no keys in the environment: the default profile
    a, url = tmp_path / "a", url_for(request)
    make_store(a, 1)
    assert push(a, url).pushed == [1]
    assert pull(url, tmp_path / "b").pulled == [1]


def test_the_environment_wins_over_the_profile(tmp_path, s3_server, aws, monkeypatch, request):
    write(  # a profile that would reach nothing: its endpoint is a closed port
        aws,
        f"""
        [profile elsewhere]
        endpoint_url = http://127.0.0.1:{closed_port()}
        """,
    )
    monkeypatch.setenv("AWS_PROFILE", "elsewhere")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    make_store(tmp_path / "a", 1)
    assert push(tmp_path / "a", url_for(request)).pushed == [1]


@pytest.mark.parametrize(
    ("profile", "says"),
    [("missing", "AWS profile 'missing' is in neither"), ("no-keys", "gives no credentials")],
)
def test_a_profile_that_cannot_be_used_is_one_line(
    tmp_path, s3_server, aws, monkeypatch, request, capsys, profile, says
):
    write(
        aws,
        f"""
        [profile no-keys]
        endpoint_url = {s3_server.endpoint}
        """,
    )
    monkeypatch.setenv("AWS_PROFILE", profile)
    make_store(tmp_path / "a", 1)
    with pytest.raises(RemoteError, match=says):
        push(tmp_path / "a", url_for(request))
    assert engram(["push", str(tmp_path / "a"), url_for(request)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err


def test_without_boto3_a_profile_is_one_line_saying_what_to_install(
    tmp_path, s3_server, aws, monkeypatch, request
):
    write(
        aws,
        f"""
        [profile engram-test]
        endpoint_url = {s3_server.endpoint}
        """,
        f"""
        [engram-test]
        aws_access_key_id = {KEY_ID}
        aws_secret_access_key = {SECRET}
        """,
    )
    monkeypatch.setenv("AWS_PROFILE", "engram-test")
    child = textwrap.dedent("""
        import sys
        sys.modules["boto3"] = None  # as if it were not installed
        from engram.cli import main
        sys.exit(main(["ls", sys.argv[1]]))
    """)
    done = subprocess.run([sys.executable, "-c", child, url_for(request)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "pip install boto3" in done.stderr, done.stderr
    never_shown(done.stdout, done.stderr)
