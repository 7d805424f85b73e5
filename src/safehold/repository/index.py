"""The in-memory master index: every blob's pack and place, merged from all index objects."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from safehold.format.index import IndexedPack, IndexFile
from safehold.format.pack import PackEntry
from safehold.format.plan import PlanFile


@dataclass(frozen=True, slots=True)
class BlobLocation:
    pack_id: bytes
    entry: PackEntry


@dataclass(slots=True)
class IndexState:
    """Which index objects are present and which of them are superseded (docs/format.md §15.2).

    ``superseded`` is authoritative: the index objects that a present prune plan replaces; their
    packs are condemned or listed again by the plan's new index. ``claimed`` adds the index
    objects that any present index object merely *claims* to supersede (a prune's new index is
    stored before its plan; anyone could forge a claim): writers do not deduplicate against packs
    known only from those, which costs at most an upload again and never loses data."""

    index_ids: set[str] = field(default_factory=set)
    superseded: set[str] = field(default_factory=set)
    claimed: set[str] = field(default_factory=set)
    plans: set[str] = field(default_factory=set)
    unreadable: dict[str, str] = field(default_factory=dict)  # index or plan name -> error
    files: dict[str, IndexFile] = field(default_factory=dict)  # the readable index objects
    plan_files: dict[str, PlanFile] = field(default_factory=dict)  # the readable plans


class MasterIndex:
    """Blob id → location, pack id → (size, sealed key). Thread-safe for concurrent adds.

    *Live* packs are listed by an index object that no present plan supersedes; packs listed only
    by superseded index objects (prune condemned or replaced them; they may be about to be
    deleted) are *old*: they can still be read, but they are not among :meth:`packs`. A writer
    deduplicates only against live packs that no present index object claims to supersede
    (``in``); :meth:`lookup` finds a blob wherever it is.
    """

    def __init__(self) -> None:
        self._blobs: dict[bytes, BlobLocation] = {}
        self._packs: dict[bytes, IndexedPack] = {}
        self._old_blobs: dict[bytes, BlobLocation] = {}
        self._old_packs: dict[bytes, IndexedPack] = {}
        self._no_dedup: set[bytes] = set()  # live packs a writer must not reuse
        self.state = IndexState()
        self._lock = threading.Lock()

    @property
    def index_ids(self) -> set[str]:
        return self.state.index_ids

    @property
    def superseded(self) -> set[str]:
        return self.state.superseded

    def add_pack(self, pack: IndexedPack, *, live: bool = True, dedup: bool = True) -> None:
        with self._lock:
            if not live:
                if pack.pack_id in self._packs:
                    return
                self._old_packs[pack.pack_id] = pack
                for e in pack.blobs:
                    if e.id not in self._old_blobs:
                        self._old_blobs[e.id] = BlobLocation(pack.pack_id, e)
                return
            if dedup:
                self._no_dedup.discard(pack.pack_id)
            elif pack.pack_id not in self._packs:
                self._no_dedup.add(pack.pack_id)
            self._packs[pack.pack_id] = pack
            self._old_packs.pop(pack.pack_id, None)
            for e in pack.blobs:
                loc = self._blobs.get(e.id)
                # prefer a location a writer may reuse
                if loc is None or (dedup and loc.pack_id in self._no_dedup):
                    self._blobs[e.id] = BlobLocation(pack.pack_id, e)

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        loc = self._blobs.get(blob_id)
        return loc if loc is not None else self._old_blobs.get(blob_id)

    def __contains__(self, blob_id: bytes) -> bool:
        """Whether a writer may reuse the stored blob instead of storing it again."""
        loc = self._blobs.get(blob_id)
        return loc is not None and loc.pack_id not in self._no_dedup

    def is_live(self, blob_id: bytes) -> bool:
        """Whether the blob is in a live pack (check, prune, repair)."""
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
