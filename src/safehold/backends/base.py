"""The Backend protocol: the only thing safehold asks of a storage location.

Objects are immutable byte strings named by relative, ``/``-separated names such as ``config``,
``keys/<hex>``, ``data/ab/<hex>``, ``index/<hex>``, ``snapshots/<hex>`` and ``locks/<hex>``.
A backend knows nothing about what the objects mean.

Backends that store an object by writing a temporary (``.tmp-…``) and renaming it into place
also offer ``clean_temporaries(older_than_s: float) -> list[str]``: see
:func:`clean_temporaries`, the helper that callers use.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from safehold.errors import BackendError


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """A stored object's name (relative to the repository root) and size in bytes."""

    name: str
    size: int


@runtime_checkable
class Backend(Protocol):
    """Storage for immutable named objects.

    Errors: a missing object raises :class:`safehold.errors.NotFound`; a failure worth retrying
    raises :class:`safehold.errors.TransientError`; one that is not (permission denied, disk full,
    bad credentials, missing bucket) raises :class:`safehold.errors.PermanentError`. A name that
    is not relative and ``/``-separated with no empty, ``.`` or ``..`` component (or that holds a
    backslash or control character) raises :class:`ValueError`.
    """

    @property
    def location(self) -> str:
        """A human-readable location, e.g. ``/srv/repo`` or ``s3://bucket/prefix``."""
        ...

    def create(self) -> None:
        """Prepare an empty location for a new repository (make the folder, check the bucket)."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose name starts with ``prefix`` (e.g. ``"data/"``), in any order.

        A listing that fails part-way raises; it never ends early as if it were complete.
        """
        ...

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """The bytes ``[offset, offset + length)`` of an object (to its end if ``length`` is None).

        The range is clipped at the object's end, as an HTTP range request is (an offset at or
        past the end gives ``b""``); callers that know the length they expect check it. A
        negative offset or length raises :class:`ValueError`.
        """
        ...

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        """Store an object atomically: readers see all of it or nothing.

        Without ``overwrite`` it is create-if-absent: if an object of that name exists with the
        same content this succeeds (so a retried store is harmless), with other content it raises
        :class:`safehold.errors.AlreadyExists`. ``overwrite=True`` is only for lock objects.
        The caller reuses the buffer of ``data`` once this returns: keep no reference to it.
        """
        ...

    def delete(self, name: str) -> None:
        """Remove an object; raises NotFound if there is none."""
        ...

    def stat(self, name: str) -> ObjectInfo:
        """The object's size; raises NotFound if there is none."""
        ...

    def close(self) -> None:
        """Release connections and other resources."""
        ...


@runtime_checkable
class CleansTemporaries(Protocol):
    """The optional backend method behind :func:`clean_temporaries` (not part of :class:`Backend`).

    ``clean_temporaries(older_than_s)`` removes the temporaries (files whose last name component
    starts with ``.tmp-``, anywhere under the repository) that stores interrupted by a crash
    left behind, if their modification time as the storage reports it is more than
    ``older_than_s`` seconds before now, and returns their names relative to the repository
    root (e.g. ``"data/ab/.tmp-0123456789abcdef"``), in any order. It never removes an object
    (a name that :class:`Backend` methods accept) nor a younger temporary: another client may be
    writing it right now, so ``older_than_s`` must exceed the longest store anyone makes. A
    temporary that disappears meanwhile (its store finished, another client cleaned it) is
    skipped. Failures raise as the :class:`Backend` methods' do; a negative, infinite or NaN
    ``older_than_s`` raises :class:`ValueError`. Wrappers pass it on to the backend they wrap
    (through :func:`clean_temporaries`, so that they work whether it has the method or not).
    """

    def clean_temporaries(self, older_than_s: float) -> list[str]: ...


def check_older_than(older_than_s: float) -> float:
    """Return ``older_than_s`` as a float if it is a finite number >= 0, else raise ValueError."""
    if isinstance(older_than_s, bool) or not isinstance(older_than_s, int | float):
        raise ValueError(f"older_than_s must be a number, not {type(older_than_s).__name__}")
    value = float(older_than_s)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"older_than_s must be finite and at least 0, not {older_than_s!r}")
    return value


def clean_temporaries(backend: Backend, older_than_s: float) -> list[str]:
    """Remove the temporaries that interrupted stores left in ``backend``, older than
    ``older_than_s`` seconds; their names (relative to the repository root).

    Calls the backend's own ``clean_temporaries`` (see :class:`CleansTemporaries`) where it has
    one, else returns ``[]`` (memory and S3 write no temporaries; the ``ssh://`` client has no
    request for it).
    """
    check_older_than(older_than_s)
    if isinstance(backend, CleansTemporaries):
        return list(backend.clean_temporaries(older_than_s))
    return []


def older_versions(backend: Backend, name: str) -> Iterator[bytes]:
    """Earlier versions of an object, newest first, where the storage keeps them (a versioned S3
    bucket): readers try them before declaring an object that fails verification damaged.

    A backend that keeps versions has ``older_versions(name) -> Iterator[bytes]`` yielding each
    non-current version's whole content (never the current one); wrappers are looked through
    (``inner``). Storage without versions yields nothing. Failures end the iteration quietly:
    this is a last resort, and the caller reports the damage it already found."""
    b: object = backend
    for _ in range(16):
        fn = getattr(type(b), "older_versions", None)
        if fn is not None:
            try:
                yield from fn(b, name)
            except BackendError:
                return
            return
        b = getattr(b, "inner", None)
        if b is None:
            return
