"""A backend that keeps objects in memory: for tests and for library users who want no disk."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from safehold.backends.base import ObjectInfo
from safehold.backends.local import byte_view, check_name, check_prefix, check_range
from safehold.errors import AlreadyExists, NotFound


class MemoryBackend:
    """Objects in a dict, guarded by a lock; same semantics as :class:`LocalBackend`."""

    consistent_listing = True  # a listing shows every object stored before it began

    def __init__(self, label: str = "") -> None:
        self._label = label
        self._objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryBackend({self._label!r})"

    @property
    def location(self) -> str:
        return f"memory://{self._label}"

    def create(self) -> None:
        pass

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        with self._lock:
            infos = [
                ObjectInfo(name, len(data))
                for name, data in self._objects.items()
                if name.startswith(prefix)
            ]
        return iter(infos)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_name(name)
        check_range(offset, length)
        with self._lock:
            data = self._objects.get(name)
        if data is None:
            raise NotFound(f"{name} not found in {self.location}")
        if offset == 0 and (length is None or length >= len(data)):
            return data
        end = len(data) if length is None else offset + length
        return data[offset:end]

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        check_name(name)
        content = data if isinstance(data, bytes) else byte_view(data).tobytes()
        with self._lock:
            existing = self._objects.get(name)
            if existing is not None and not overwrite:
                if existing == content:
                    return
                raise AlreadyExists(
                    f"{name} already exists in {self.location} with different content"
                )
            self._objects[name] = content

    def delete(self, name: str) -> None:
        check_name(name)
        with self._lock:
            if self._objects.pop(name, None) is None:
                raise NotFound(f"{name} not found in {self.location}")

    def stat(self, name: str) -> ObjectInfo:
        check_name(name)
        with self._lock:
            data = self._objects.get(name)
        if data is None:
            raise NotFound(f"{name} not found in {self.location}")
        return ObjectInfo(name, len(data))

    def close(self) -> None:
        pass
