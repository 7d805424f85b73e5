"""What the conformance suite does not cover about S3Backend, against a real moto_server process.

Each test gets a fresh bucket. Requests are observed through botocore's ``after-call`` event on
a client handed to the backend, which changes nothing about what is sent. One test emulates a
server without If-None-Match support (which moto cannot be made to be) by answering just the
conditional requests itself; test_error_mapping maps error answers moto never gives.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import ClientError

from safehold.backends import FaultInjectingBackend, RetryingBackend, open_backend
from safehold.backends.s3 import S3Backend, open_s3, parse_size
from safehold.errors import (
    AlreadyExists,
    NotFound,
    PermanentError,
    TransientError,
    UsageError,
)
from tests.support.checks import error_line as one_line
from tests.support.checks import no_sleep

if TYPE_CHECKING:
    from .s3server import AuthServer, MotoServer

# s3_server, s3_bucket, s3_auth_server, aws_env, dead_endpoint
pytest_plugins = ["tests.backends.s3server"]
pytestmark = pytest.mark.s3

MiB = 1 << 20


@dataclass
class Calls:
    """The S3 operations a client made, with the HTTP status of each answer."""

    seen: list[tuple[str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, http_response: Any, model: Any, **kw: Any) -> None:
        with self.lock:
            self.seen.append((model.name, int(http_response.status_code)))

    def ops(self) -> list[str]:
        with self.lock:
            return [op for op, _ in self.seen]

    def clear(self) -> None:
        with self.lock:
            self.seen.clear()


def watched_client(server: MotoServer, **config: Any) -> tuple[Any, Calls]:
    calls = Calls()
    client = server.client(config=Config(retries={"mode": "standard"}, **config))
    client.meta.events.register("after-call.s3", calls.record)
    return client, calls


# --- keys, prefix, listing -----------------------------------------------------------------------


def test_keys_under_the_prefix_and_foreign_keys_ignored(
    s3_server: MotoServer, s3_bucket: str
) -> None:
    admin = s3_server.admin
    b = S3Backend(s3_bucket, "/backups/laptop/", endpoint_url=s3_server.url)
    assert b.location == f"s3://{s3_bucket}/backups/laptop"
    b.store("config", b"c")
    b.store("data/ab/p1", b"pack")
    keys = {o["Key"] for o in admin.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert keys == {"backups/laptop/config", "backups/laptop/data/ab/p1"}
    # keys beside the prefix, a console's "folder" marker and a name safehold never makes
    for key in ("backups/laptop2/config", "backups/laptopX", "backups/laptop/data/", "other/x"):
        admin.put_object(Bucket=s3_bucket, Key=key, Body=b"x")
    admin.put_object(Bucket=s3_bucket, Key="backups/laptop/data//odd", Body=b"x")
    assert sorted((i.name, i.size) for i in b.list("")) == [("config", 1), ("data/ab/p1", 4)]
    assert [i.name for i in b.list("data/")] == ["data/ab/p1"]

    bare = S3Backend(s3_bucket, endpoint_url=s3_server.url)
    assert bare.location == f"s3://{s3_bucket}"
    bare.store("keys/k", b"key")
    assert admin.get_object(Bucket=s3_bucket, Key="keys/k")["Body"].read() == b"key"
    assert bare.stat("backups/laptop/config").size == 1  # no prefix: every key is a name
    b.close()
    bare.close()


@pytest.mark.parametrize("prefix", ["a//b", "a/../b", "./a", "a\\b"])
def test_bad_prefix_is_refused(aws_env: None, prefix: str) -> None:
    with pytest.raises(ValueError):
        S3Backend("bucket", prefix, client=object())
    with pytest.raises(UsageError):
        open_s3(f"s3://bucket/{prefix}", {})


# --- multipart -----------------------------------------------------------------------------------


def test_multipart_upload_round_trips(s3_server: MotoServer, s3_bucket: str) -> None:
    client, calls = watched_client(s3_server)
    b = S3Backend(
        s3_bucket,
        "repo",
        multipart_threshold=5 * MiB,
        part_size=5 * MiB,
        storage_class_data="STANDARD_IA",
        client=client,
    )
    data = random.Random(1).randbytes(12 * MiB + 1)
    b.store("data/ab/big", memoryview(bytearray(data)))
    assert calls.ops() == [
        "HeadObject",  # is it there already? (no: 404)
        "HeadBucket",  # the first 404: is it the bucket that is missing? (no)
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPart",
        "UploadPart",
        "CompleteMultipartUpload",
    ]
    head = s3_server.admin.head_object(Bucket=s3_bucket, Key="repo/data/ab/big")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]
    assert head["ContentLength"] == len(data)
    assert head.get("StorageClass") == "STANDARD_IA"
    assert b.load("data/ab/big") == data
    assert b.load("data/ab/big", 5 * MiB - 10, 20) == data[5 * MiB - 10 : 5 * MiB + 10]
    assert b.load("data/ab/big", 12 * MiB - 1, 100) == data[-2:]

    # a retried store of the same large object uploads nothing; other content is refused
    calls.clear()
    b.store("data/ab/big", data)
    assert "UploadPart" not in calls.ops() and "PutObject" not in calls.ops()
    with pytest.raises(AlreadyExists):
        b.store("data/ab/big", data[::-1])
    assert b.load("data/ab/big") == data

    # below the threshold: a single PutObject; overwrite=True of a large object: multipart
    calls.clear()
    b.store("data/ab/small", data[: 5 * MiB - 1])
    assert calls.ops() == ["PutObject"]
    calls.clear()
    b.store("locks/big", data[: 6 * MiB], overwrite=True)
    b.store("locks/big", data[1 : 6 * MiB + 1], overwrite=True)
    assert calls.ops().count("CompleteMultipartUpload") == 2
    assert b.load("locks/big") == data[1 : 6 * MiB + 1]
    assert not s3_server.admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_multipart_lost_race_is_aborted(s3_server: MotoServer, s3_bucket: str) -> None:
    """The object appears while the parts upload: completion answers 412, the upload is aborted."""
    client, calls = watched_client(s3_server)
    b = S3Backend(s3_bucket, multipart_threshold=5 * MiB, part_size=5 * MiB, client=client)
    data = os.urandom(11 * MiB)
    other = os.urandom(11 * MiB)

    def sneak_in(**kw: Any) -> None:
        if not any(op == "UploadPart" for op in calls.ops()):
            s3_server.admin.put_object(Bucket=s3_bucket, Key="data/x", Body=other)

    client.meta.events.register("before-call.s3.UploadPart", sneak_in)
    with pytest.raises(AlreadyExists):
        b.store("data/x", data)
    assert ("CompleteMultipartUpload", 412) in calls.seen
    assert "AbortMultipartUpload" in calls.ops()
    assert not s3_server.admin.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    assert b.load("data/x") == other


# --- create-if-absent ----------------------------------------------------------------------------


def test_store_retried_after_a_timeout_meets_412_and_succeeds(
    s3_server: MotoServer, s3_bucket: str
) -> None:
    client, calls = watched_client(s3_server)
    s3 = S3Backend(s3_bucket, "r", client=client)
    faulty = FaultInjectingBackend(s3, seed=1)
    backend = RetryingBackend(faulty, sleep=no_sleep)
    data = os.urandom(100_000)
    faulty.fail_next("store", kind="timeout")
    backend.store("data/ab/x", data)  # stored, answer "lost", retried: 412, same content
    assert faulty.stats["store.timeout"] == 1 and faulty.stats["store"] == 2
    puts = [status for op, status in calls.seen if op == "PutObject"]
    assert puts == [200, 412]
    assert ("GetObject", 200) in calls.seen  # the comparison with what is stored
    assert backend.load("data/ab/x") == data

    faulty.fail_next("store", kind="timeout")
    backend.store("index/i", b"index")
    with pytest.raises(AlreadyExists) as info:
        backend.store("data/ab/x", data[:-1] + b"!")
    assert "data/ab/x" in one_line(info.value)
    assert backend.load("data/ab/x") == data
    assert {i.name for i in backend.list("")} == {"data/ab/x", "index/i"}


def test_without_if_none_match_support_it_falls_back_to_head_then_put(
    s3_server: MotoServer, s3_bucket: str
) -> None:
    """A server that rejects If-None-Match (501 NotImplemented).

    moto implements If-None-Match, so this one server behaviour is emulated: a before-send hook
    answers requests that carry the header with 501 before they leave; every other request
    reaches moto over HTTP.
    """
    client, _ = watched_client(s3_server)
    refused: list[str] = []

    def refuse_conditional(request: Any, **kw: Any) -> AWSResponse | None:
        if request.headers.get("If-None-Match"):
            refused.append(request.url)
            body = b"<Error><Code>NotImplemented</Code><Message>no</Message></Error>"
            return AWSResponse(request.url, 501, {"Content-Type": "application/xml"}, _Raw(body))
        return None

    client.meta.events.register("before-send.s3", refuse_conditional)
    b = S3Backend(s3_bucket, client=client, multipart_threshold=5 * MiB, part_size=5 * MiB)
    b.store("data/a", b"one")
    assert len(refused) == 1  # asked once, then no more conditional requests
    b.store("data/a", b"one")
    b.store("data/b", b"two")
    with pytest.raises(AlreadyExists):
        b.store("data/a", b"other")
    big = os.urandom(6 * MiB)
    b.store("data/big", big)
    b.store("data/big", big)
    assert len(refused) == 1
    assert b.load("data/a") == b"one" and b.load("data/b") == b"two" and b.load("data/big") == big


class _Raw:
    """The raw body of a synthetic answer (what urllib3 would hand botocore)."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, *args: Any, **kw: Any) -> Iterator[bytes]:
        yield self._data

    def read(self, *args: Any) -> bytes:
        data, self._data = self._data, b""
        return data


# --- versioned and object-lock buckets; checksums; storage classes -------------------------------


def _exercise(b: S3Backend) -> None:
    data = os.urandom(300_000)
    b.store("config", b"config")
    b.store("data/ab/p", data)
    b.store("data/ab/p", data)
    with pytest.raises(AlreadyExists):
        b.store("data/ab/p", b"other")
    b.store("locks/l", b"v1", overwrite=True)
    b.store("locks/l", b"version 2", overwrite=True)
    assert b.load("locks/l") == b"version 2"
    assert b.load("data/ab/p", 1000, 10) == data[1000:1010]
    assert {i.name: i.size for i in b.list("")} == {
        "config": 6,
        "data/ab/p": len(data),
        "locks/l": 9,
    }
    b.delete("locks/l")
    with pytest.raises(NotFound):
        b.stat("locks/l")
    with pytest.raises(NotFound):
        b.delete("locks/l")
    b.store("locks/l", b"new", overwrite=False)  # a deleted (delete-marked) name is free again
    assert b.load("locks/l") == b"new"
    assert {i.name for i in b.list("locks/")} == {"locks/l"}


def test_versioned_bucket(s3_server: MotoServer) -> None:
    bucket = s3_server.new_bucket(versioned=True)
    try:
        b = S3Backend(bucket, "repo", endpoint_url=s3_server.url)
        b.create()
        _exercise(b)
        versions = s3_server.admin.list_object_versions(Bucket=bucket, Prefix="repo/locks/l")
        assert len(versions.get("Versions", [])) == 3  # v1, version 2, new
        assert len(versions.get("DeleteMarkers", [])) == 1
    finally:
        s3_server.reset()


@pytest.mark.parametrize("sdk_checksums", ["when_supported", "when_required"])
def test_object_lock_bucket(s3_server: MotoServer, sdk_checksums: str) -> None:
    """Object Lock with default retention refuses writes that carry no checksum.

    With ``when_required`` botocore sends none of its own, so this also checks the Content-MD5
    the backend then adds (moto answers MissingUploadObjectWithObjectLockHeaders without it).
    """
    bucket = s3_server.new_bucket(object_lock_days=1)
    try:
        client, calls = watched_client(s3_server, request_checksum_calculation=sdk_checksums)
        b = S3Backend(bucket, "repo", client=client, multipart_threshold=5 * MiB)
        b.create()
        _exercise(b)
        big = os.urandom(11 * MiB)
        b.store("data/cd/big", big)
        assert "CompleteMultipartUpload" in calls.ops()
        assert b.load("data/cd/big") == big
        head = s3_server.admin.head_object(Bucket=bucket, Key="repo/data/ab/p")
        assert head.get("ObjectLockMode") == "GOVERNANCE"
        # the bucket does refuse a write without a checksum: the test above means something
        bare = s3_server.client(config=Config(request_checksum_calculation="when_required"))
        with pytest.raises(ClientError, match="MissingUploadObjectWithObjectLockHeaders"):
            bare.put_object(Bucket=bucket, Key="repo/x", Body=b"x")
        bare.close()
    finally:
        s3_server.reset()


def test_storage_classes_reach_the_objects(s3_server: MotoServer, s3_bucket: str) -> None:
    backend = open_backend(
        f"s3://{s3_bucket}/p",
        {
            "s3.endpoint": s3_server.url,
            "s3.storage-class-data": "STANDARD_IA",
            "s3.storage-class-meta": "ONEZONE_IA",
            "s3.multipart-threshold": "5M",
            "s3.region": "us-east-1",
        },
    )
    assert isinstance(backend, RetryingBackend) and isinstance(backend.inner, S3Backend)
    assert backend.inner.multipart_threshold == 5 * MiB
    backend.store("data/ab/p", b"pack")
    backend.store("data/ab/big", os.urandom(5 * MiB))  # multipart
    backend.store("index/i", b"index")
    backend.store("config", b"config")
    classes = {
        key: s3_server.admin.head_object(Bucket=s3_bucket, Key=f"p/{key}").get("StorageClass")
        for key in ("data/ab/p", "data/ab/big", "index/i", "config")
    }
    assert classes == {
        "data/ab/p": "STANDARD_IA",
        "data/ab/big": "STANDARD_IA",
        "index/i": "ONEZONE_IA",
        "config": "ONEZONE_IA",
    }
    plain = S3Backend(s3_bucket, "q", endpoint_url=s3_server.url)
    plain.store("data/ab/p", b"pack")
    head = s3_server.admin.head_object(Bucket=s3_bucket, Key="q/data/ab/p")
    assert head.get("StorageClass", "STANDARD") == "STANDARD"
    backend.close()
    plain.close()


# --- the registry --------------------------------------------------------------------------------


def test_s3_urls_and_options(s3_server: MotoServer) -> None:
    backend = open_backend("s3://my-bucket/some/prefix/", {"s3.endpoint": s3_server.url})
    assert isinstance(backend, RetryingBackend) and isinstance(backend.inner, S3Backend)
    assert backend.location == "s3://my-bucket/some/prefix"
    assert backend.inner.multipart_threshold == 64 * MiB
    assert backend.inner.endpoint == s3_server.url
    assert open_backend("S3://my-bucket").location == "s3://my-bucket"
    bad = [
        ("s3:///prefix", {}, "names no bucket"),
        ("s3://b/p?x=1", {}, "query"),
        ("s3://bad bucket/p", {}, "invalid S3 bucket name"),
        ("s3://bucket/p", {"s3.endpoitn": "x"}, "unknown option 's3.endpoitn' for s3://"),
        ("s3://bucket/p", {"s3.multipart-threshold": "lots"}, "invalid size"),
        ("s3://bucket/p", {"s3.multipart-threshold": "1M"}, "at least 5M"),
        ("memory://x", {"s3.endpoint": "x"}, "for memory:// repositories (they take no"),
        ("/some/path", {"s3.endpoint": "x"}, "for local repositories (they take no options)"),
    ]
    for url, options, message in bad:
        with pytest.raises(UsageError) as info:
            open_backend(url, options)
        assert message in one_line(info.value), (url, options)
    assert parse_size("8M") == 8 * MiB and parse_size("1.5G") == 3 << 29 and parse_size("7") == 7


# --- errors --------------------------------------------------------------------------------------


def test_missing_bucket_is_a_permanent_one_line_error(s3_server: MotoServer) -> None:
    b = RetryingBackend(S3Backend("no-such-bucket-here", "p", endpoint_url=s3_server.url))
    for call in (
        b.create,
        lambda: b.stat("config"),
        lambda: b.load("config"),
        lambda: b.load("config", 0, 0),
        lambda: list(b.list("")),
        lambda: b.store("config", b"x"),
        lambda: b.delete("config"),
    ):
        with pytest.raises(PermanentError) as info:
            call()
        assert one_line(info.value) == (
            f"bucket 'no-such-bucket-here' does not exist at {s3_server.url}"
        )


def test_unreachable_endpoint_is_transient_after_retries(
    aws_env: None, dead_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: none
    endpoint = dead_endpoint
    retried: list[str] = []
    b = RetryingBackend(
        S3Backend("bucket", endpoint_url=endpoint),
        attempts=4,
        sleep=no_sleep,
        on_retry=lambda op, name, e, n: retried.append(op),
    )
    started = time.monotonic()
    for call in (lambda: b.load("config"), lambda: b.store("data/x", b"x"), b.create):
        with pytest.raises(TransientError) as info:
            call()
        message = one_line(info.value)
        assert "failed after 4 attempts" in message
        assert f"cannot reach {endpoint}" in message
    assert retried == ["load"] * 3 + ["store"] * 3 + ["create"] * 3
    assert time.monotonic() - started < 20


def test_botocore_retries_are_bounded_by_the_environment(
    aws_env: None, dead_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_MAX_ATTEMPTS still applies: the backend sets only the retry mode."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    b = S3Backend("bucket", endpoint_url=dead_endpoint)
    attempts: list[int] = []
    b._client.meta.events.register("before-send.s3", lambda **kw: attempts.append(1))
    with pytest.raises(TransientError):
        b.stat("config")
    assert len(attempts) == 2
    assert b._client.meta.config.retries["mode"] == "standard"
    assert b._client.meta.config.connect_timeout == 10
    b.close()


def test_wrong_credentials_are_permanent(
    s3_auth_server: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = s3_auth_server
    url = auth.server.url

    def backend(key: str, secret: str) -> S3Backend:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        return S3Backend(auth.bucket, "repo", endpoint_url=url)  # the standard chain: env

    good = backend(auth.access_key, auth.secret_key)
    good.create()
    good.store("config", b"c")
    assert good.load("config") == b"c"
    cases = {
        "unknown key": backend("AKIAUNKNOWNUNKNOWN00", "secret"),
        "wrong secret": backend(auth.access_key, "not-the-secret"),
        "no permission": backend(auth.powerless_key, auth.powerless_secret),
    }
    for what, b in cases.items():
        wrapped = RetryingBackend(b, sleep=no_sleep)
        for call in (
            wrapped.create,
            lambda w=wrapped: w.load("config"),
            lambda w=wrapped: w.stat("config"),
            lambda w=wrapped: list(w.list("")),
            lambda w=wrapped: w.store("data/x", b"x"),
        ):
            with pytest.raises(PermanentError) as info:
                call()
            message = one_line(info.value)
            assert message.startswith(f"access denied to s3://{auth.bucket}/"), (what, message)
            assert "(check the credentials)" in message
    assert good.load("config") == b"c"  # nothing was written meanwhile
    assert {i.name for i in good.list("")} == {"config"}


def test_no_credentials_is_permanent(
    s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    b = RetryingBackend(S3Backend("bucket", endpoint_url=s3_server.url), sleep=no_sleep)
    with pytest.raises(PermanentError) as info:
        b.load("config")
    assert one_line(info.value).startswith("no S3 credentials found for s3://bucket/config")
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(PermanentError, match="no-such-profile"):
        S3Backend("bucket", endpoint_url=s3_server.url)


def _client_error(code: str, status: int, message: str = "text") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("code", "status", "kind", "start"),
    [
        ("InternalError", 500, TransientError, "cannot reach "),
        ("ServiceUnavailable", 503, TransientError, "cannot reach "),
        ("SlowDown", 503, TransientError, "cannot reach "),
        ("RequestTimeout", 400, TransientError, "cannot reach "),
        ("ThrottlingException", 400, TransientError, "cannot reach "),
        ("502", 502, TransientError, "cannot reach "),
        ("AccessDenied", 403, PermanentError, "access denied to s3://bucket/p/k "),
        ("InvalidAccessKeyId", 403, PermanentError, "access denied to "),
        ("SignatureDoesNotMatch", 403, PermanentError, "access denied to "),
        ("403", 403, PermanentError, "access denied to "),
        ("NoSuchBucket", 404, PermanentError, "bucket 'bucket' does not exist at "),
        ("NoSuchKey", 404, NotFound, "k not found in s3://bucket/p"),
        ("InvalidObjectState", 403, PermanentError, "cannot load s3://bucket/p/k: InvalidObj"),
        ("RequestTimeTooSkewed", 403, PermanentError, "cannot load s3://bucket/p/k: Request"),
        ("InvalidStorageClass", 400, PermanentError, "cannot load s3://bucket/p/k: "),
    ],
)
def test_error_mapping(
    aws_env: None, code: str, status: int, kind: type[Exception], start: str
) -> None:
    """The answers moto cannot be made to give, mapped as a real S3 gives them."""
    b = S3Backend("bucket", "p", endpoint_url="http://127.0.0.1:9")
    err = b._error(_client_error(code, status, "line one\nline two"), "load", "k", "p/k")
    assert type(err) is kind
    assert one_line(err).startswith(start)
    if kind is not NotFound and "exist" not in start:
        assert code in str(err)
    b.close()
