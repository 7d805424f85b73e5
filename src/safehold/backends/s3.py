"""A repository in an S3 bucket (AWS or any S3-compatible server), under an optional key prefix.

Object ``name`` is stored under the key ``<prefix>/<name>`` (or ``<name>`` without a prefix).
Credentials, region and endpoint come from the standard AWS chain (``AWS_PROFILE``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, ``AWS_ENDPOINT_URL``, instance roles,
…); the constructor's arguments override them.

Create-if-absent is ``PutObject`` with ``If-None-Match: *``: S3 refuses the write (412) when the
key exists, and the backend then compares the stored content with the new one, so a store that
is retried after a lost answer succeeds. Large objects go through a multipart upload whose
completion carries the same condition. Every write carries a checksum (the SDK's CRC32, or a
Content-MD5 where the SDK sends none), which buckets with Object Lock require.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bce
import botocore.session
from botocore.config import Config

from safehold.backends.base import Backend, ObjectInfo
from safehold.backends.local import byte_view, check_name, check_prefix, check_range
from safehold.errors import (
    AlreadyExists,
    BackendError,
    NotFound,
    PermanentError,
    TransientError,
    UsageError,
)

MIN_PART_SIZE = 5 << 20
"""S3's smallest part of a multipart upload (all but the last part)."""
MAX_PARTS = 10_000
"""S3's largest number of parts in one multipart upload."""

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
MAX_POOL_CONNECTIONS = 32

_STORE_ROUNDS = 5
"""How often a create-if-absent store tries again when the object it collided with vanished."""

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "AccountProblem",
        "InvalidSecurity",
        "403",
        "Forbidden",
    }
)
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "TransactionInProgress",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
        "IDPCommunicationError",
    }
)
_CONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})
_UNSUPPORTED_CODES = frozenset({"NotImplemented", "501"})
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _md5(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


_loader_lock = threading.Lock()
_loader: Any = None


def _botocore_session() -> Any:
    """A new botocore session (its own credentials) sharing the parsed API models.

    Loading the S3 model and endpoint rules takes ~0.1 s per session; they never change, so
    every session after the first reuses the first one's loader.
    """
    global _loader
    session = botocore.session.get_session()
    with _loader_lock:
        if _loader is None:
            _loader = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _loader)
    return session


def _client_error(e: bce.ClientError) -> tuple[str, int, str]:
    """The error code, HTTP status and message of an S3 error answer."""
    error = e.response.get("Error", {})
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    code = str(error.get("Code") or status or "Unknown")
    return code, status, _one_line(error.get("Message") or "")


class S3Backend:
    """Objects in an S3 bucket under ``prefix``; see the module's description."""

    consistent_listing = True  # S3 lists strongly consistently (AWS since 2020, MinIO, Ceph)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        storage_class_data: str | None = None,
        storage_class_meta: str | None = None,
        multipart_threshold: int = 64 << 20,
        part_size: int = 16 << 20,
        client: Any = None,
    ) -> None:
        if not _BUCKET_RE.fullmatch(bucket or ""):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            try:
                check_name(prefix)
            except ValueError:
                raise ValueError(f"invalid S3 key prefix {prefix!r}") from None
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"the part size must be at least {MIN_PART_SIZE} bytes (5 MiB)")
        if multipart_threshold < 1:
            raise ValueError("the multipart threshold must be positive")
        self.bucket = bucket
        self.prefix = prefix
        self._key_prefix = prefix + "/" if prefix else ""
        self._storage_class_data = storage_class_data or None
        self._storage_class_meta = storage_class_meta or None
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._owns_client = client is None
        if client is None:
            client = self._make_client(endpoint_url, region)
        self._client: Any = client
        self.endpoint: str = str(client.meta.endpoint_url)
        # botocore ≥ 1.36 sends a CRC32 with every upload unless told to send checksums only
        # "when_required"; then (and with older versions) we send a Content-MD5 ourselves.
        self._sdk_checksums = (
            getattr(client.meta.config, "request_checksum_calculation", None) == "when_supported"
        )
        self._conditional_writes = True
        self._bucket_checked = False

    def _make_client(self, endpoint_url: str | None, region: str | None) -> Any:
        config = Config(
            # "mode" only: AWS_MAX_ATTEMPTS and the profile's max_attempts still apply.
            retries={"mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            max_pool_connections=MAX_POOL_CONNECTIONS,
            tcp_keepalive=True,
        )
        try:
            session = boto3.session.Session(botocore_session=_botocore_session())
            return session.client(
                "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config
            )
        except bce.ProfileNotFound as e:
            raise PermanentError(f"S3 credentials: {_one_line(e)}") from None
        except ValueError as e:  # an invalid endpoint URL or region name
            raise UsageError(f"invalid S3 setting: {_one_line(e)}") from None
        except bce.BotoCoreError as e:
            raise PermanentError(f"cannot set up the S3 client: {_one_line(e)}") from None

    def __repr__(self) -> str:
        return f"S3Backend({self.bucket!r}, {self.prefix!r}, endpoint_url={self.endpoint!r})"

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    # --- helpers -------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return self._key_prefix + check_name(name)

    def _url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def _storage_class(self, name: str) -> str | None:
        if name.startswith("data/"):
            return self._storage_class_data
        return self._storage_class_meta

    def _missing_bucket(self) -> PermanentError:
        return PermanentError(f"bucket {self.bucket!r} does not exist at {self.endpoint}")

    def _error(self, e: Exception, op: str, name: str = "", key: str = "") -> BackendError:
        """The safehold error for a boto3/botocore exception raised while doing ``op``."""
        where = self._url(key)
        if isinstance(e, BackendError):
            return e
        if isinstance(e, bce.ClientError):
            code, status, message = _client_error(e)
            detail = f"{code}: {message}" if message and message != code else code
            if code == "NoSuchBucket":
                return self._missing_bucket()
            if code in _NOT_FOUND_CODES and name:
                return NotFound(f"{name} not found in {self.location}")
            if code == "InvalidObjectState":  # archived (Glacier, Deep Archive): not readable
                return PermanentError(f"cannot {op} {where}: {detail} (an archive storage class?)")
            if code == "RequestTimeTooSkewed":
                return PermanentError(f"cannot {op} {where}: {detail} (check the system clock)")
            if code in _ACCESS_CODES or status == 403:
                return PermanentError(f"access denied to {where} (check the credentials): {detail}")
            if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
                return TransientError(f"cannot reach {self.endpoint}: {op} {where}: {detail}")
            return PermanentError(f"cannot {op} {where}: {detail}")
        if isinstance(e, bce.NoCredentialsError | bce.PartialCredentialsError):
            return PermanentError(
                f"no S3 credentials found for {where} (set AWS_PROFILE or AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or configure ~/.aws/credentials): {_one_line(e)}"
            )
        if isinstance(e, bce.SSLError):
            return PermanentError(f"TLS error talking to {self.endpoint}: {_one_line(e)}")
        if isinstance(
            e,
            bce.ConnectionError
            | bce.HTTPClientError
            | bce.IncompleteReadError
            | bce.CredentialRetrievalError
            | OSError,
        ):
            # EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError,
            # ReadTimeoutError, ConnectionClosedError, ResponseStreamingError, a reset socket.
            return TransientError(f"cannot reach {self.endpoint}: {_one_line(e)}")
        if isinstance(e, bce.BotoCoreError):
            return PermanentError(f"cannot {op} {where}: {_one_line(e)}")
        raise e

    def _fail(self, e: Exception, op: str, name: str = "", key: str = "") -> NoReturn:
        raise self._error(e, op, name, key) from e

    def _head(self, name: str, key: str, op: str) -> dict[str, Any]:
        """HeadObject; NotFound if missing (after checking once that the bucket exists)."""
        try:
            head: dict[str, Any] = self._client.head_object(Bucket=self.bucket, Key=key)
            return head
        except Exception as e:
            err = self._error(e, op, name, key)
        if isinstance(err, NotFound) and not self._bucket_checked:
            # A HEAD answer has no body: 404 does not say whether the key or the bucket is
            # missing. Ask about the bucket once, so that a missing bucket is not taken for
            # missing objects.
            self._check_bucket()
        raise err

    def _check_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except bce.ClientError as e:
            code, status, _ = _client_error(e)
            if code in ("NoSuchBucket", "404", "NotFound") or status == 404:
                raise self._missing_bucket() from None
            self._fail(e, "open bucket")
        except Exception as e:
            self._fail(e, "open bucket")
        self._bucket_checked = True

    # --- the Backend protocol ------------------------------------------------------------------

    def create(self) -> None:
        self._check_bucket()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        start = len(self._key_prefix)
        key_prefix = self._key_prefix + prefix
        try:
            paginator = self._client.get_paginator("list_objects_v2")
            pages = paginator.paginate(
                Bucket=self.bucket, Prefix=key_prefix, PaginationConfig={"PageSize": 1000}
            )
            for page in pages:
                for entry in page.get("Contents", ()):
                    name = str(entry["Key"])[start:]
                    try:
                        check_name(name)
                    except ValueError:
                        continue  # not an object of ours ("folder/" markers and the like)
                    yield ObjectInfo(name, int(entry["Size"]))
        except Exception as e:
            self._fail(e, "list", key=key_prefix)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        key = self._key(name)
        check_range(offset, length)
        if length == 0:
            self._head(name, key, "load")  # NotFound if it is missing; the range is empty anyway
            return b""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        ranged = offset > 0 or length is not None
        if ranged:
            end = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{end}"
        try:
            resp = self._client.get_object(**args)
            body = resp["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
        except bce.ClientError as e:
            code, status, _ = _client_error(e)
            if code == "InvalidRange" or status == 416:
                return b""  # the offset is at or past the end: an empty range, as HTTP says
            self._fail(e, "load", name, key)
        except Exception as e:
            self._fail(e, "load", name, key)
        expected = resp.get("ContentLength")
        if expected is not None and len(data) != int(expected):
            raise TransientError(
                f"short read of {name} from {self.endpoint}: got {len(data)} of {expected} bytes"
            )
        if not ranged:
            return data
        content_range = resp.get("ContentRange")
        if not content_range:
            # The server ignored the Range header and sent the whole object: cut it here.
            return data[offset:] if length is None else data[offset : offset + length]
        m = _CONTENT_RANGE.match(str(content_range))
        if m is None or int(m.group(1)) != offset:
            raise TransientError(f"unexpected Content-Range {content_range!r} for {name}")
        if length is not None and m.group(3) != "*":
            want = max(0, min(length, int(m.group(3)) - offset))
            if len(data) != want:
                raise TransientError(f"short read of {name}: got {len(data)} of {want} bytes")
        return data

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        key = self._key(name)
        view = byte_view(data)
        if overwrite:
            self._put(name, key, view, conditional=False)
            return
        if len(view) >= self.multipart_threshold:
            # Spare the upload of a large object that is already there (a retried store).
            try:
                self._head(name, key, "store")
            except NotFound:
                pass
            else:
                same = self._same_content(name, key, view)
                if same is True:
                    return
                if same is False:
                    raise self._already_exists(name)
        for _ in range(_STORE_ROUNDS):
            if not self._conditional_writes:
                # This server rejects If-None-Match: check, then write. Unlike the conditional
                # write this is not atomic, two concurrent stores of one name can both "win";
                # harmless for content-addressed names, and lock names are random.
                try:
                    self._head(name, key, "store")
                except NotFound:
                    self._put(name, key, view, conditional=False)
                    return
                same = self._same_content(name, key, view)
            elif self._put(name, key, view, conditional=True):
                return
            else:
                # 412: the key exists. (Or 409: a concurrent conditional write of it is under
                # way; if it is not visible yet the comparison finds nothing and we try again.)
                same = self._same_content(name, key, view)
            if same is True:
                return
            if same is False:
                raise self._already_exists(name)
            time.sleep(0.05)
        raise TransientError(f"cannot store {self._url(key)}: it keeps appearing and disappearing")

    def _already_exists(self, name: str) -> AlreadyExists:
        return AlreadyExists(f"{name} already exists in {self.location} with different content")

    def _checksum_args(self, data: memoryview) -> dict[str, Any]:
        return {} if self._sdk_checksums else {"ContentMD5": _md5(data)}

    def _put(self, name: str, key: str, view: memoryview, *, conditional: bool) -> bool:
        """Write the object; with ``conditional`` only if absent. False if the condition failed."""
        if len(view) >= self.multipart_threshold:
            return self._put_multipart(name, key, view, conditional=conditional)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key, **self._checksum_args(view)}
        storage_class = self._storage_class(name)
        if storage_class:
            args["StorageClass"] = storage_class
        # botocore wants bytes; a copy of anything else (the caller reuses its buffer).
        body = (
            view.obj if type(view.obj) is bytes and len(view.obj) == len(view) else view.tobytes()
        )
        try:
            if conditional:
                self._client.put_object(Body=body, IfNoneMatch="*", **args)
            else:
                self._client.put_object(Body=body, **args)
            return True
        except bce.ClientError as e:
            code, status, _ = _client_error(e)
            if conditional and (code in _CONDITION_CODES or status in (409, 412)):
                return False
            if conditional and (code in _UNSUPPORTED_CODES or status == 501):
                self._conditional_writes = False
                return self._put_fallback(name, key, view)
            self._fail(e, "store", name, key)
        except Exception as e:
            self._fail(e, "store", name, key)

    def _put_fallback(self, name: str, key: str, view: memoryview) -> bool:
        """Create-if-absent without If-None-Match: HeadObject, then an unconditional write."""
        try:
            self._head(name, key, "store")
            return False
        except NotFound:
            return self._put(name, key, view, conditional=False)

    def _put_multipart(self, name: str, key: str, view: memoryview, *, conditional: bool) -> bool:
        size = len(view)
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        create: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        storage_class = self._storage_class(name)
        if storage_class:
            create["StorageClass"] = storage_class
        if self._sdk_checksums:
            create["ChecksumAlgorithm"] = "CRC32"
        try:
            upload_id = str(self._client.create_multipart_upload(**create)["UploadId"])
        except Exception as e:
            self._fail(e, "store", name, key)
        ids = {"Bucket": self.bucket, "Key": key, "UploadId": upload_id}
        try:
            parts: list[dict[str, Any]] = []
            for number, start in enumerate(range(0, size, part_size), start=1):
                chunk = view[start : start + part_size]
                extra: dict[str, Any] = (
                    {"ChecksumAlgorithm": "CRC32"}
                    if self._sdk_checksums
                    else self._checksum_args(chunk)
                )
                resp = self._client.upload_part(
                    Body=chunk.tobytes(), PartNumber=number, **ids, **extra
                )
                part = {"ETag": resp["ETag"], "PartNumber": number}
                if resp.get("ChecksumCRC32"):
                    part["ChecksumCRC32"] = resp["ChecksumCRC32"]
                parts.append(part)
            complete: dict[str, Any] = {**ids, "MultipartUpload": {"Parts": parts}}
            if not conditional:
                self._client.complete_multipart_upload(**complete)
                return True
            try:
                self._client.complete_multipart_upload(IfNoneMatch="*", **complete)
                return True
            except bce.ClientError as e:
                code, status, _ = _client_error(e)
                if code in _CONDITION_CODES or status in (409, 412):
                    self._abort(ids)
                    return False
                if not (code in _UNSUPPORTED_CODES or status == 501):
                    raise
            # The server rejects If-None-Match on completion: check, then complete (not atomic,
            # see store()).
            self._conditional_writes = False
            try:
                self._head(name, key, "store")
                self._abort(ids)
                return False
            except NotFound:
                pass
            self._client.complete_multipart_upload(**complete)
            return True
        except BaseException as e:
            self._abort(ids)
            if isinstance(e, Exception):
                self._fail(e, "store", name, key)
            raise

    def _abort(self, ids: Mapping[str, Any]) -> None:
        try:
            self._client.abort_multipart_upload(**ids)
        except Exception:
            pass  # best effort: a lifecycle rule can clean up incomplete uploads

    def _same_content(self, name: str, key: str, view: memoryview) -> bool | None:
        """Whether the stored object holds exactly ``view``; None if there is no object."""
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            err = self._error(e, "load", name, key)
            if isinstance(err, NotFound):
                return None
            raise err from e
        body = resp["Body"]
        try:
            if int(resp.get("ContentLength", -1)) != len(view):
                return False
            pos = 0
            for chunk in body.iter_chunks(1 << 20):
                if view[pos : pos + len(chunk)] != chunk:
                    return False
                pos += len(chunk)
            if pos != len(view):
                raise TransientError(f"short read of {name} from {self.endpoint}")
            return True
        except BackendError:
            raise
        except Exception as e:
            self._fail(e, "load", name, key)
        finally:
            body.close()

    def delete(self, name: str) -> None:
        key = self._key(name)
        self._head(name, key, "delete")
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as e:
            self._fail(e, "delete", name, key)

    def stat(self, name: str) -> ObjectInfo:
        key = self._key(name)
        head = self._head(name, key, "stat")
        return ObjectInfo(name, int(head["ContentLength"]))

    def older_versions(self, name: str) -> Iterator[bytes]:
        """The non-current versions of an object on a versioned bucket, newest first (nothing on
        an unversioned one): readers try them before calling an object damaged."""
        key = self._key(name)
        try:
            resp = self._client.list_object_versions(Bucket=self.bucket, Prefix=key, MaxKeys=100)
        except Exception as e:
            self._fail(e, "list versions of", name, key)
        versions = [
            v
            for v in resp.get("Versions", [])
            if v.get("Key") == key and not v.get("IsLatest") and v.get("VersionId") != "null"
        ]
        versions.sort(key=lambda v: v.get("LastModified") or 0, reverse=True)
        for v in versions:
            try:
                obj = self._client.get_object(Bucket=self.bucket, Key=key, VersionId=v["VersionId"])
                body = obj["Body"]
                try:
                    data: bytes = body.read()
                finally:
                    body.close()
            except Exception as e:
                self._fail(e, "load an earlier version of", name, key)
            yield data

    def close(self) -> None:
        if self._owns_client:
            try:
                self._client.close()
            except Exception:
                pass


# --- opening from a URL --------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``"8M"`` → 8388608: binary units, a bare number is bytes (as :mod:`safehold.units`)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UsageError(f"invalid size {text!r} (expected e.g. 8M, 64M, 1G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def open_s3(url: str, options: Mapping[str, str]) -> Backend:
    """``s3://BUCKET[/PREFIX]`` with the ``s3.*`` options, behind a RetryingBackend."""
    from safehold.backends.wrappers import RetryingBackend

    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise UsageError(f"S3 URL {url!r} must not have a query or fragment")
    bucket = parts.netloc
    if not bucket:
        raise UsageError(f"S3 URL {url!r} names no bucket; use s3://BUCKET/PREFIX")
    threshold = 64 << 20
    if "s3.multipart-threshold" in options:
        threshold = parse_size(options["s3.multipart-threshold"])
        if threshold < MIN_PART_SIZE:
            raise UsageError("s3.multipart-threshold must be at least 5M")
    try:
        backend = S3Backend(
            bucket,
            parts.path,
            endpoint_url=options.get("s3.endpoint") or None,
            region=options.get("s3.region") or None,
            storage_class_data=options.get("s3.storage-class-data") or None,
            storage_class_meta=options.get("s3.storage-class-meta") or None,
            multipart_threshold=threshold,
        )
    except ValueError as e:
        raise UsageError(f"{e} in {url!r}") from None
    return RetryingBackend(backend)
