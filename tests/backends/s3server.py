"""A real S3 server for the tests: ``moto_server`` in a subprocess, spoken to over HTTP.

Nothing is mocked in-process: the backend under test, boto3 clients in the tests and ``safehold``
subprocesses all talk HTTP to the server process. :func:`s3_server` (session-scoped) starts one
server on a free port of 127.0.0.1 the first time a test needs it, sets the AWS environment
(fixed test credentials, region, no profile, no instance metadata) for this process and, through
:attr:`MotoServer.env`, for subprocesses; :func:`s3_bucket` gives each test a fresh bucket.

moto checks no credentials unless asked: it authenticates every request only once more
requests were made than ``INITIAL_NO_AUTH_ACTION_COUNT`` (an environment variable of the server,
infinite by default). :func:`start_auth_server` starts a second server, creates an IAM user and
its access key and a bucket while that count is still infinite, then sets it to 0 through
moto's ``/moto-api/reset-auth`` endpoint (the run-time form of the same setting), after which
the server refuses unknown keys and bad signatures as S3 does.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    # Nothing from the developer's ~/.aws, and no slow probing of an instance metadata service.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}
AWS_UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_CA_BUNDLE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)

_START_TIMEOUT = 60.0


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def aws_environ(base: dict[str, str]) -> dict[str, str]:
    """``base`` with the test credentials and none of the developer's AWS settings."""
    return {k: v for k, v in base.items() if k not in AWS_UNSET} | AWS_ENV


@dataclass
class MotoServer:
    """One moto_server process."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables for a subprocess that talks to this server."""
        return dict(AWS_ENV)

    def client(self, **kw: Any) -> Any:
        """A boto3 S3 client for this server (test credentials unless given)."""
        config = kw.pop("config", None) or Config(retries={"mode": "standard", "max_attempts": 2})
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=kw.pop("aws_access_key_id", ACCESS_KEY),
            aws_secret_access_key=kw.pop("aws_secret_access_key", SECRET_KEY),
            config=config,
            **kw,
        )

    @functools.cached_property
    def admin(self) -> Any:
        """A client kept for the server's lifetime, for setting up and inspecting buckets."""
        return self.client()

    def new_bucket(self, *, versioned: bool = False, object_lock_days: int = 0) -> str:
        """A new, empty bucket with a unique name."""
        name = f"test-{uuid.uuid4().hex[:24]}"
        client = self.admin
        if object_lock_days:
            client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
            client.put_object_lock_configuration(
                Bucket=name,
                ObjectLockConfiguration={
                    "ObjectLockEnabled": "Enabled",
                    "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": object_lock_days}},
                },
            )
        else:
            client.create_bucket(Bucket=name)
        if versioned:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def post(self, path: str, body: bytes = b"") -> bytes:
        """POST to moto's own API (``/moto-api/...``)."""
        req = urllib.request.Request(
            self.url + path, data=body, method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            data: bytes = resp.read()
            return data

    def reset(self) -> None:
        """Forget every bucket and object."""
        self.post("/moto-api/reset")

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if "admin" in self.__dict__:
            self.admin.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(log_dir: Path, *, env: dict[str, str] | None = None) -> MotoServer:
    """Start ``python -m moto.server`` on a free port and wait until it answers."""
    last_error = ""
    for attempt in range(3):
        port = free_port()
        log = log_dir / f"moto-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=aws_environ(dict(os.environ)) | (env or {}),
            )
        server = MotoServer(proc, port, log)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(server.url + "/moto-api/data.json", timeout=5):
                    return server
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        server.stop()
        last_error = f"attempt {attempt + 1}: exit {proc.returncode}\n{server.log_tail()}"
    raise RuntimeError(f"moto_server did not start:\n{last_error}")


@dataclass
class AuthServer:
    """A moto_server that checks credentials, with a user allowed everything and one nothing."""

    server: MotoServer
    bucket: str
    access_key: str
    secret_key: str
    powerless_key: str
    powerless_secret: str


def start_auth_server(log_dir: Path) -> AuthServer:
    server = start_server(log_dir)
    try:
        iam = boto3.session.Session().client(
            "iam",
            endpoint_url=server.url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        iam.create_user(UserName="backup")
        key = iam.create_access_key(UserName="backup")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="backup", PolicyName="all-of-s3", PolicyDocument=json.dumps(policy)
        )
        iam.create_user(UserName="powerless")
        weak = iam.create_access_key(UserName="powerless")["AccessKey"]
        iam.close()
        bucket = server.new_bucket()
        answer = json.loads(server.post("/moto-api/reset-auth", b"0"))
        assert answer["status"] == "ok", answer
    except BaseException:
        server.stop()
        raise
    return AuthServer(
        server,
        bucket,
        key["AccessKeyId"],
        key["SecretAccessKey"],
        weak["AccessKeyId"],
        weak["SecretAccessKey"],
    )


# --- fixtures (a test module that uses them names this module in its pytest_plugins) ------------

_shared: MotoServer | None = None
_saved_env: dict[str, str | None] = {}


def shared_server(log_dir: Path) -> MotoServer:
    """The one server of this test session, started on first use; sets the AWS environment."""
    global _shared
    if _shared is None or _shared.proc.poll() is not None:
        _shared = start_server(log_dir)
        for key in (*AWS_UNSET, *AWS_ENV):
            _saved_env.setdefault(key, os.environ.get(key))
        for key in AWS_UNSET:
            os.environ.pop(key, None)
        os.environ.update(AWS_ENV)
    return _shared


def stop_shared_server() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None
    for key, value in _saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _saved_env.clear()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """The session's moto_server, started on first use."""
    server = shared_server(tmp_path_factory.mktemp("moto"))
    yield server
    stop_shared_server()


_shared_auth: AuthServer | None = None


@pytest.fixture(scope="session")
def s3_auth_server(
    s3_server: MotoServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthServer]:
    """A second server, which checks credentials."""
    global _shared_auth
    if _shared_auth is None or _shared_auth.server.proc.poll() is not None:
        _shared_auth = start_auth_server(tmp_path_factory.mktemp("moto-auth"))
    yield _shared_auth
    if _shared_auth is not None:
        _shared_auth.server.stop()
        _shared_auth = None


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test credentials and none of the developer's AWS settings, without a server."""
    for key in AWS_UNSET:
        monkeypatch.delenv(key, raising=False)
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def dead_endpoint() -> str:
    """An http://127.0.0.1:PORT URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def s3_bucket(s3_server: MotoServer) -> Iterator[str]:
    """A fresh, empty bucket; the server forgets every bucket after the test."""
    yield s3_server.new_bucket()
    s3_server.reset()
