"""The in-memory master index: every blob's pack and place, merged from all index objects."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from safehold.format.index import IndexedPack
from safehold.format.pack import PackEntry


@dataclass(frozen=True, slots=True)
class BlobLocation:
    pack_id: bytes
    entry: PackEntry


class MasterIndex:
    """Blob id → location, pack id → (size, sealed key). Thread-safe for concurrent adds."""

    def __init__(self) -> None:
        self._blobs: dict[bytes, BlobLocation] = {}
        self._packs: dict[bytes, IndexedPack] = {}
        self.index_ids: set[str] = set()
        self._lock = threading.Lock()

    def add_pack(self, pack: IndexedPack) -> None:
        with self._lock:
            self._packs[pack.pack_id] = pack
            for e in pack.blobs:
                if e.id not in self._blobs:
                    self._blobs[e.id] = BlobLocation(pack.pack_id, e)

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        return self._blobs.get(blob_id)

    def __contains__(self, blob_id: bytes) -> bool:
        return blob_id in self._blobs

    def pack(self, pack_id: bytes) -> IndexedPack | None:
        return self._packs.get(pack_id)

    def packs(self) -> list[IndexedPack]:
        with self._lock:
            return list(self._packs.values())

    def blob_count(self) -> int:
        return len(self._blobs)

    def pack_count(self) -> int:
        return len(self._packs)
