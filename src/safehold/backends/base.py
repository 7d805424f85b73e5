"""The Backend protocol: the only thing safehold asks of a storage location.

Objects are immutable byte strings named by relative, ``/``-separated names such as ``config``,
``keys/<hex>``, ``data/ab/<hex>``, ``index/<hex>``, ``snapshots/<hex>`` and ``locks/<hex>``.
A backend knows nothing about what the objects mean.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


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
