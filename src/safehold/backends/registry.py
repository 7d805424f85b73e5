"""Open a backend from a repository URL: a plain path, ``file:///abs/path``, ``memory://name`` or
``s3://bucket/prefix``, or ``rclone:REMOTE:PATH`` (rclone's own syntax, without ``//``).

Other schemes (``sftp://``, …) are added with :func:`register_scheme`. A scheme may take options
(``-o s3.endpoint=…`` on the command line), each named ``<scheme>.<name>``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import overload
from urllib.parse import unquote, urlsplit

from safehold.backends.base import Backend
from safehold.backends.local import LocalBackend
from safehold.backends.memory import MemoryBackend
from safehold.errors import UsageError

BackendFactory = Callable[[str], Backend]
"""Opens a URL of a scheme that takes no options."""
OptionsFactory = Callable[[str, Mapping[str, str]], Backend]
"""Opens a URL of a scheme that takes options: ``factory(url, options)``."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# rclone's own syntax has no "//": rclone:REMOTE:PATH (an "rclone://" URL is refused by it).
_RCLONE = re.compile(r"^(rclone):(?!//)", re.IGNORECASE)
_lock = threading.Lock()


@dataclass(frozen=True)
class _Scheme:
    factory: Callable[..., Backend]
    options: frozenset[str] | None  # None: the factory takes the URL alone


_FACTORIES: dict[str, _Scheme] = {}
_MEMORY: dict[str, MemoryBackend] = {}


@overload
def register_scheme(scheme: str, factory: BackendFactory) -> None: ...


@overload
def register_scheme(scheme: str, factory: OptionsFactory, *, options: Collection[str]) -> None: ...


def register_scheme(
    scheme: str, factory: Callable[..., Backend], *, options: Collection[str] | None = None
) -> None:
    """Make ``open_backend`` hand URLs ``<scheme>://…`` (the whole URL) to ``factory``.

    With ``options`` (the option names the scheme accepts) the factory is called as
    ``factory(url, options)`` with the options given to ``open_backend``; without, as
    ``factory(url)``, and ``open_backend`` refuses any option for that scheme.
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise ValueError(f"invalid URL scheme {scheme!r}")
    entry = _Scheme(factory, None if options is None else frozenset(options))
    with _lock:
        _FACTORIES[scheme.lower()] = entry


def supported_schemes() -> list[str]:
    """The registered URL schemes, sorted."""
    with _lock:
        return sorted(_FACTORIES)


def _check_options(kind: str, known: frozenset[str] | None, options: Mapping[str, str]) -> None:
    for key in options:
        if known is None or key not in known:
            hint = f"known: {', '.join(sorted(known))}" if known else "they take no options"
            raise UsageError(f"unknown option {key!r} for {kind} repositories ({hint})")


def open_backend(url: str, options: Mapping[str, str] | None = None) -> Backend:
    """The backend for a repository location.

    A location without ``<scheme>://`` is a local path (absolute, relative or starting with
    ``~``). ``options`` are the scheme's settings (e.g. ``{"s3.endpoint": "http://…"}``).
    Raises :class:`~safehold.errors.UsageError` for an unknown scheme or option or a bad URL.
    """
    backend = _open(url, options)
    kill_after = os.environ.get("SAFEHOLD_TEST_KILL_AFTER_WRITES")
    if kill_after:  # the crash harness (tests/integration/test_crash.py), never set in use
        from safehold.backends.wrappers import KillingBackend

        return KillingBackend(backend, int(kill_after))
    return backend


def _open(url: str, options: Mapping[str, str] | None) -> Backend:
    if not url:
        raise UsageError("empty repository location")
    options = dict(options or {})
    match = _SCHEME.match(url) or _RCLONE.match(url)
    if match is None:
        _check_options("local", None, options)
        return LocalBackend(os.path.expanduser(url))
    scheme = match.group(1).lower()
    with _lock:
        entry = _FACTORIES.get(scheme)
    if entry is None:
        raise UsageError(
            f"unsupported repository URL scheme {scheme!r} in {url!r} "
            f"(supported: {', '.join(supported_schemes())})"
        )
    _check_options(f"{scheme}:" if scheme == "rclone" else f"{scheme}://", entry.options, options)
    if entry.options is None:
        return entry.factory(url)
    return entry.factory(url, options)


def _open_file(url: str) -> Backend:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UsageError(f"file URL {url!r} names host {parts.netloc!r}; use file:///absolute/path")
    if parts.query or parts.fragment:
        raise UsageError(f"file URL {url!r} must not have a query or fragment")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise UsageError(f"file URL {url!r} has no absolute path; use file:///absolute/path")
    return LocalBackend(path)


def _open_memory(url: str) -> Backend:
    label = url[len("memory://") :]
    with _lock:
        backend = _MEMORY.get(label)
        if backend is None:
            backend = _MEMORY[label] = MemoryBackend(label)
    return backend


def _open_s3(url: str, options: Mapping[str, str]) -> Backend:
    # Imported on use: boto3 takes a while to load and local repositories do not need it.
    from safehold.backends.s3 import open_s3

    return open_s3(url, options)


S3_OPTIONS = (
    "s3.endpoint",
    "s3.region",
    "s3.storage-class-data",
    "s3.storage-class-meta",
    "s3.multipart-threshold",
)

register_scheme("file", _open_file)
register_scheme("memory", _open_memory)
register_scheme("s3", _open_s3, options=S3_OPTIONS)


def _open_sftp(url: str, options: Mapping[str, str]) -> Backend:
    # Imported on use, as boto3: paramiko takes a while to load.
    from safehold.backends.sftp import open_sftp

    return open_sftp(url, options)


SFTP_OPTIONS = ("sftp.key-file", "sftp.known-hosts", "sftp.timeout")

register_scheme("sftp", _open_sftp, options=SFTP_OPTIONS)


def _open_rclone(url: str, options: Mapping[str, str]) -> Backend:
    from safehold.backends.rclone import open_rclone

    return open_rclone(url, options)


RCLONE_OPTIONS = ("rclone.binary", "rclone.config")

register_scheme("rclone", _open_rclone, options=RCLONE_OPTIONS)


def _open_ssh(url: str) -> Backend:
    from safehold.backends.remote import open_ssh
    from safehold.backends.wrappers import RetryingBackend

    return RetryingBackend(open_ssh(url))


register_scheme("ssh", _open_ssh)
