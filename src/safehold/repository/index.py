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
    """Blob id → location, pack id → (size, sealed key). Thread-safe for concurrent adds.

    Packs listed only by superseded index objects (prune replaced them; the packs may be about to
    be deleted) are kept apart: they can still be read, but a writer never deduplicates against
    them (``in`` says no), and they are not among :meth:`packs`.
    """

    def __init__(self) -> None:
        self._blobs: dict[bytes, BlobLocation] = {}
        self._packs: dict[bytes, IndexedPack] = {}
        self._old_blobs: dict[bytes, BlobLocation] = {}
        self._old_packs: dict[bytes, IndexedPack] = {}
        self.index_ids: set[str] = set()
        self.superseded: set[str] = set()
        self._lock = threading.Lock()

    def add_pack(self, pack: IndexedPack, *, live: bool = True) -> None:
        with self._lock:
            packs, blobs = (
                (self._packs, self._blobs) if live else (self._old_packs, self._old_blobs)
            )
            if not live and pack.pack_id in self._packs:
                return
            packs[pack.pack_id] = pack
            for e in pack.blobs:
                if e.id not in blobs:
                    blobs[e.id] = BlobLocation(pack.pack_id, e)

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        loc = self._blobs.get(blob_id)
        return loc if loc is not None else self._old_blobs.get(blob_id)

    def __contains__(self, blob_id: bytes) -> bool:
        return blob_id in self._blobs

    def pack(self, pack_id: bytes) -> IndexedPack | None:
        p = self._packs.get(pack_id)
        return p if p is not None else self._old_packs.get(pack_id)

    def packs(self) -> list[IndexedPack]:
        """The live packs (not those known only from superseded index objects)."""
        with self._lock:
            return list(self._packs.values())

    def old_packs(self) -> list[IndexedPack]:
        with self._lock:
            return [p for k, p in self._old_packs.items() if k not in self._packs]

    def blob_count(self) -> int:
        return len(self._blobs)

    def pack_count(self) -> int:
        return len(self._packs)
