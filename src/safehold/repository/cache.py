"""A local cache of immutable objects (index, snapshots, tree packs), keyed by storage id.

The repository stays the source of truth: every cached object is verified against its storage id
when read, and deleting the cache changes nothing but speed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from safehold.ids import storage_id


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / name

    def get(self, name: str, expected_id: str) -> bytes | None:
        """The cached object, or None if missing or not matching its id (then it is dropped)."""
        path = self._path(name)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if storage_id(data) != expected_id:
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return data

    def get_range(self, name: str, offset: int, length: int) -> bytes | None:
        """Part of a cached object, unverified: for blobs, which are authenticated on their own."""
        try:
            with open(self._path(name), "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError:
            return None
        return data if len(data) == length else None

    def drop(self, name: str) -> None:
        with contextlib.suppress(OSError):
            self._path(name).unlink()

    def put(self, name: str, data: bytes) -> None:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            pass  # a cache that cannot be written only costs speed

    def forget_missing(self, prefix: str, keep: set[str]) -> None:
        """Drop cached objects under ``prefix`` whose ids are no longer in the repository."""
        folder = self._path(prefix)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            if entry.is_file() and entry.name not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
