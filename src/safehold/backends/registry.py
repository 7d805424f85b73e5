"""Open a backend from a repository URL: a plain path, ``file:///abs/path`` or ``memory://name``.

Other schemes (``s3://``, ``sftp://``, …) are added with :func:`register_scheme`.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from safehold.backends.base import Backend
from safehold.backends.local import LocalBackend
from safehold.backends.memory import MemoryBackend
from safehold.errors import UsageError

BackendFactory = Callable[[str], Backend]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_lock = threading.Lock()
_FACTORIES: dict[str, BackendFactory] = {}
_MEMORY: dict[str, MemoryBackend] = {}


def register_scheme(scheme: str, factory: BackendFactory) -> None:
    """Make ``open_backend`` hand URLs ``<scheme>://…`` (the whole URL) to ``factory``."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise ValueError(f"invalid URL scheme {scheme!r}")
    with _lock:
        _FACTORIES[scheme.lower()] = factory


def supported_schemes() -> list[str]:
    """The registered URL schemes, sorted."""
    with _lock:
        return sorted(_FACTORIES)


def open_backend(url: str) -> Backend:
    """The backend for a repository location.

    A location without ``<scheme>://`` is a local path (absolute, relative or starting with
    ``~``). Raises :class:`~safehold.errors.UsageError` for an unknown scheme or a bad URL.
    """
    if not url:
        raise UsageError("empty repository location")
    match = _SCHEME.match(url)
    if match is None:
        return LocalBackend(os.path.expanduser(url))
    scheme = match.group(1).lower()
    with _lock:
        factory = _FACTORIES.get(scheme)
    if factory is None:
        raise UsageError(
            f"unsupported repository URL scheme {scheme!r} in {url!r} "
            f"(supported: {', '.join(supported_schemes())})"
        )
    return factory(url)


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


register_scheme("file", _open_file)
register_scheme("memory", _open_memory)
