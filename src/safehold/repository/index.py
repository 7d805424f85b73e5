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
        # copies beyond the first of a blob (live or old), only for blobs stored more than once
        self._extra: dict[bytes, list[BlobLocation]] = {}
        self._bad: set[tuple[bytes, bytes]] = set()  # (pack id, blob id): copies found damaged
        self.state = IndexState()
        self._lock = threading.Lock()

    @property
    def index_ids(self) -> set[str]:
        return self.state.index_ids

    @property
    def superseded(self) -> set[str]:
        return self.state.superseded

    def _rank(self, blob_id: bytes, loc: BlobLocation) -> tuple[bool, bool, bool]:
        """Lower is better: undamaged before damaged, live before old, reusable before not."""
        return (
            (loc.pack_id, blob_id) in self._bad,
            loc.pack_id not in self._packs,
            loc.pack_id in self._no_dedup,
        )

    def _put(self, table: dict[bytes, BlobLocation], blob_id: bytes, loc: BlobLocation) -> None:
        cur = table.get(blob_id)
        if cur is None:
            table[blob_id] = loc
            return
        if cur.pack_id == loc.pack_id:
            return
        extra = self._extra.setdefault(blob_id, [])
        if all(x.pack_id != loc.pack_id for x in extra):
            if self._rank(blob_id, loc) < self._rank(blob_id, cur):
                table[blob_id] = loc
                extra.append(cur)
            else:
                extra.append(loc)

    def add_pack(self, pack: IndexedPack, *, live: bool = True, dedup: bool = True) -> None:
        with self._lock:
            if not live:
                if pack.pack_id in self._packs:
                    return
                self._old_packs[pack.pack_id] = pack
                for e in pack.blobs:
                    self._put(self._old_blobs, e.id, BlobLocation(pack.pack_id, e))
                return
            if dedup:
                self._no_dedup.discard(pack.pack_id)
            elif pack.pack_id not in self._packs:
                self._no_dedup.add(pack.pack_id)
            self._packs[pack.pack_id] = pack
            self._old_packs.pop(pack.pack_id, None)
            blobs, pid = self._blobs, pack.pack_id
            for e in pack.blobs:
                if e.id not in blobs:
                    blobs[e.id] = BlobLocation(pid, e)
                else:
                    self._put(blobs, e.id, BlobLocation(pid, e))

    def locations(self, blob_id: bytes) -> list[BlobLocation]:
        """Every known copy of a blob, best first (undamaged, live, reusable)."""
        found: list[BlobLocation] = []
        seen: set[bytes] = set()
        for loc in (
            self._blobs.get(blob_id),
            self._old_blobs.get(blob_id),
            *self._extra.get(blob_id, ()),
        ):
            if loc is not None and loc.pack_id not in seen:
                seen.add(loc.pack_id)
                found.append(loc)
        if len(found) > 1:
            found.sort(key=lambda loc: self._rank(blob_id, loc))
        return found

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        """The best known copy of a blob (an undamaged one if there is any)."""
        loc = self._blobs.get(blob_id)
        if loc is not None and (not self._bad or (loc.pack_id, blob_id) not in self._bad):
            return loc
        found = self.locations(blob_id)
        return found[0] if found else None

    def __contains__(self, blob_id: bytes) -> bool:
        """Whether a writer may reuse the stored blob instead of storing it again: a live copy
        that no index object claims to supersede and that is not known to be damaged."""
        loc = self._blobs.get(blob_id)
        if loc is None:
            return False
        if loc.pack_id not in self._no_dedup and (
            not self._bad or (loc.pack_id, blob_id) not in self._bad
        ):
            return True
        if blob_id not in self._extra:
            return False
        return any(
            x.pack_id in self._packs
            and x.pack_id not in self._no_dedup
            and (x.pack_id, blob_id) not in self._bad
            for x in self.locations(blob_id)
        )

    def is_live(self, blob_id: bytes) -> bool:
        """Whether the blob is in a live pack (check, prune, repair)."""
        return blob_id in self._blobs

    def usable(self, blob_id: bytes) -> bool:
        """Whether some known copy of the blob (live or old) is not known to be damaged."""
        loc = self.lookup(blob_id)
        return loc is not None and (loc.pack_id, blob_id) not in self._bad

    def mark_damaged(self, pack_id: bytes, blob_id: bytes) -> None:
        """Record that the copy of a blob in a pack is damaged (or gone): readers try it last
        and writers store the blob again."""
        with self._lock:
            self._bad.add((pack_id, blob_id))
            for table in (self._blobs, self._old_blobs):
                cur = table.get(blob_id)
                if cur is None or cur.pack_id != pack_id or blob_id not in self._extra:
                    continue
                live = table is self._blobs
                better = [
                    x
                    for x in self._extra[blob_id]
                    if (x.pack_id in self._packs) == live and (x.pack_id, blob_id) not in self._bad
                ]
                if better:
                    best = min(better, key=lambda x: self._rank(blob_id, x))
                    self._extra[blob_id].remove(best)
                    self._extra[blob_id].append(cur)
                    table[blob_id] = best

    def is_damaged(self, pack_id: bytes, blob_id: bytes) -> bool:
        return (pack_id, blob_id) in self._bad

    def damaged(self) -> set[tuple[bytes, bytes]]:
        """The (pack id, blob id) copies known to be damaged."""
        with self._lock:
            return set(self._bad)

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
