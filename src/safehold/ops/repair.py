"""Repair: rebuild the index from the packs; write repaired snapshots beside damaged ones.

Repair never destroys what still restores:

* ``repair index`` lists every pack in storage by its own header. A pack whose header, trailer or
  sealed key is damaged is kept: its blobs are taken from the entries the existing index objects
  give for it (with the sealed key from the index if the pack's copy is damaged), or, where no
  index object lists it, found by scanning the pack blob by blob (docs/format.md §8.1: blobs lie
  back to back from offset 84, each beginning with its number in the pack as its nonce). Every
  blob so recovered is verified by decryption and its content id. A blob that fails is left out
  and recorded as damaged in the new index object (docs/format.md §9.4), so the next backup
  stores it again; damage records already known are carried forward. A pack whose content is a
  copy of another pack (its storage id is another pack's name) is never indexed under the wrong
  name: it is reported, and stored under its own name if that is missing.
* ``repair snapshots`` writes a repaired snapshot beside each snapshot that refers to lost data
  (tag ``repaired``, ``summary["repaired_from"]`` naming the original) and never deletes the
  original unless asked to (``forget_originals``).

Both run under an exclusive lock and write new objects before they delete old ones, so a repair
killed half-way leaves a repository that is no worse than before.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from safehold import crypto
from safehold.compress import Compression, decompress
from safehold.errors import FormatError, IntegrityError, NotFound, SafeholdError, UsageError
from safehold.events import Event, EventSink, ignore_events
from safehold.format.config import config_header
from safehold.format.index import IndexedPack, IndexFile
from safehold.format.pack import (
    BLOB_OVERHEAD,
    HEADER_NONCE,
    PACK_PREFIX_LEN,
    TRAILER,
    PackEntry,
    check_entries,
    header_from_bytes,
    header_to_bytes,
)
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node, salvage_tree, tree_from_bytes, tree_to_bytes
from safehold.ids import (
    CONFIG_NAME,
    BlobType,
    index_name,
    is_hex_id,
    name_to_id,
    pack_name,
    snapshot_name,
    storage_id,
)
from safehold.repository.index import BlobLocation, MasterIndex
from safehold.repository.objects import Kind, meta_object
from safehold.repository.repo import Repository

SEGMENT = 8 << 20
"""Packs are read whole in range reads of this size."""
MAX_EXAMINE = (1 << 30) + (64 << 20)
"""The largest pack repair reads whole (writers never make one larger than 1 GiB + 256 KiB,
bar a pack holding one oversized blob); a larger one is indexed by its header only."""
SCAN_MAX_BLOB = 256 << 20
"""The most a blob found by scanning may decompress to."""
_U32 = 0xFFFFFFFF


@dataclass
class RepairIndexResult:
    packs: int = 0
    blobs: int = 0
    damaged_packs: list[str] = field(default_factory=list)
    """Packs in storage left out: nothing in them could be read and verified."""
    recovered_packs: dict[str, str] = field(default_factory=dict)
    """Packs whose header, trailer or sealed key is damaged, kept: pack id -> how."""
    damaged_blobs: list[str] = field(default_factory=list)
    """``pack id:blob id`` of each copy that failed verification (left out, recorded)."""
    strays: dict[str, str] = field(default_factory=dict)
    """Object name -> the pack its content is: copies under a wrong name, never indexed."""
    copied: list[str] = field(default_factory=list)
    """Packs stored again under their own name from a stray copy (their only copy)."""
    rewritten_packs: list[str] = field(default_factory=list)
    """Recovered packs whose good blobs were copied into new, healthy packs: the damaged pack
    is no longer indexed (it is not deleted; prune removes it as unindexed)."""
    damage_records: int = 0
    new_index: str | None = None
    removed_indexes: int = 0


@dataclass
class _Examined:
    """What repair index makes of one object under ``data/``."""

    pack: IndexedPack | None = None  # to index (None: not indexed)
    bad: list[bytes] = field(default_factory=list)  # blob ids that failed verification
    good: set[bytes] = field(default_factory=set)  # blob ids verified in this run
    note: str | None = None  # how a pack with a damaged header was recovered
    stray_of: str | None = None  # the content is this other pack
    lost: str | None = None  # why nothing of it can be used


def repair_index(
    repo: Repository,
    *,
    read_data: bool = False,
    dry_run: bool = False,
    events: EventSink = ignore_events,
) -> RepairIndexResult:
    """Write one index object listing every pack in storage, then remove the index objects it
    replaces. ``read_data`` reads every pack whole: its name is checked against its content and
    every blob is verified (bad ones are left out and recorded as damaged). Without it, a pack's
    own header is trusted, and only packs whose header cannot be read, or that look like a copy
    of another pack (the same sealed key), are read whole."""
    if repo.secrets.private_key is None:
        raise UsageError("repair index needs a full key: this key cannot read pack headers")
    res = RepairIndexResult()
    index = repo.reload_index(use_cache=False)
    files = index.state.files
    listings: dict[bytes, list[IndexedPack]] = {}
    old_damage: set[tuple[bytes, bytes]] = set()
    for iid in sorted(files):
        f = files[iid]
        for p in f.packs:
            listings.setdefault(p.pack_id, []).append(p)
        old_damage.update(f.damaged)
    old_damage.update(index.damaged())  # this machine's records too (local cache)

    stored: dict[str, int] = {}  # pack id -> size, for objects named like packs
    odd: dict[str, int] = {}  # other names under data/
    for info in repo.backend.list("data/"):
        pid = name_to_id(info.name)
        if is_hex_id(pid) and info.name == pack_name(pid):
            stored[pid] = info.size
        else:
            odd[info.name] = info.size

    # each pack by its own header; a sealed key met under two pack ids marks a copy
    headers: dict[str, IndexedPack] = {}
    errors: dict[str, str] = {}
    for pid in sorted(stored):
        try:
            headers[pid] = repo.read_pack_index(pid)
        except NotFound:
            continue  # deleted since it was listed
        except SafeholdError as e:
            errors[pid] = str(e)
    owners: dict[bytes, set[bytes]] = {}
    for pid, p in headers.items():
        owners.setdefault(p.sealed_key, set()).add(bytes.fromhex(pid))
    for pack_id, lst in listings.items():
        for p in lst:
            owners.setdefault(p.sealed_key, set()).add(pack_id)
    suspicious = {pid for pid, p in headers.items() if len(owners[p.sealed_key]) > 1}

    ex = _Examiner(repo, listings, stored, read_data)
    results: dict[str, _Examined] = {}
    for pid in sorted(stored):
        if pid not in headers and pid not in errors:
            continue
        try:
            results[pid] = ex.examine(
                pid, stored[pid], headers.get(pid), pid in suspicious or pid in errors
            )
        except NotFound:
            continue
    for name in sorted(odd):
        try:
            true = storage_id(_load(repo, name, odd[name])) if odd[name] <= MAX_EXAMINE else ""
        except NotFound:
            continue
        if true and (true in stored or bytes.fromhex(true) in listings):
            results[name] = _Examined(stray_of=true)
        else:
            events(Event("warning", f"{name} is not named like a pack and is left alone"))

    # strays: reported; the only copy of a pack is stored under its own name
    rescue: list[tuple[_Examined, bytes]] = []
    for key in sorted(results):
        r = results[key]
        if r.stray_of is None:
            continue
        name = key if "/" in key else pack_name(key)
        res.strays[name] = r.stray_of
        events(
            Event(
                "warning",
                f"{name} is a copy of pack {r.stray_of[:16]} under a wrong name: not indexed",
            )
        )
        true = r.stray_of
        taken = results.get(true)
        if (
            true in stored
            and taken is not None
            and (taken.stray_of is not None or taken.pack is None or taken.bad)
        ):
            # its own name holds another pack's content (names swapped), or the pack there is
            # damaged: this content is the only intact copy of its pack, so its blobs are
            # copied into a new pack (below)
            data = _load(repo, name, stored.get(key, odd.get(name, 0)))
            got = ex.examine_bytes(bytes.fromhex(true), data)
            if got.pack is not None and got.pack.blobs:
                rescue.append((got, data))
                events(
                    Event(
                        "warning",
                        f"its own name {pack_name(true)} holds another pack: its "
                        f"{len(got.pack.blobs)} blobs are copied into a new pack",
                    )
                )
            continue
        if true in stored or true in res.copied:
            continue
        res.copied.append(true)
        if dry_run:
            continue
        data = _load(repo, name, stored.get(key, odd.get(name, 0)))
        if storage_id(data) != true:
            raise IntegrityError(f"{name} changed while repair read it")
        repo.backend.store(pack_name(true), data)
        events(Event("warning", f"stored the copy as {pack_name(true)}, its own name"))
        stored[true] = len(data)
        try:
            results[true] = ex.examine(true, len(data), repo.read_pack_index(true), True)
        except SafeholdError as e:
            results[true] = _Examined(lost=str(e))

    packs: list[IndexedPack] = []
    rewrite: list[IndexedPack] = []
    records: set[tuple[bytes, bytes]] = set()
    for key in sorted(results):
        r = results[key]
        if r.stray_of is not None:
            continue
        if r.pack is None:
            res.damaged_packs.append(key)
            events(Event("warning", f"pack {key[:16]} is unreadable and left out: {r.lost}"))
            continue
        pack_id = r.pack.pack_id
        if r.note is not None:
            res.recovered_packs[key] = r.note
            events(Event("warning", f"pack {key[:16]}: {r.note}"))
            rewrite.append(r.pack)  # its blobs move into a healthy pack (below)
        else:
            packs.append(r.pack)
        for b in r.bad:
            res.damaged_blobs.append(f"{key}:{b.hex()}")
            records.add((pack_id, b))
            events(
                Event(
                    "warning",
                    f"blob {b.hex()[:16]} in pack {key[:16]} failed verification: left out and "
                    "recorded as damaged (the next backup stores it again)",
                )
            )
        records.update(
            (p, b) for p, b in old_damage if p == pack_id and b not in r.good and b not in r.bad
        )
    res.packs = len(packs)
    res.blobs = sum(len(p.blobs) for p in packs)
    res.damage_records = len(records)
    old = repo.list_ids("index/")
    if dry_run:
        res.rewritten_packs = [p.pack_id.hex() for p in rewrite]
        return res
    # the verified blobs of a pack whose header, trailer or sealed key is damaged are copied into
    # new packs (indexed by the session's own index objects, stored after ``old`` was listed, so
    # they stay): the damaged pack is then no longer needed, and check is clean again
    packs += _rewrite(repo, rewrite, records, res, events)
    _rescue(repo, ex, rescue, res)
    rebuilt = IndexFile(packs, [bytes.fromhex(i) for i in old])
    if records:
        rebuilt.damaged = sorted(records)
    res.new_index = repo.store_index(rebuilt)
    for iid in old:
        try:
            repo.backend.delete(index_name(iid))
            res.removed_indexes += 1
        except NotFound:
            pass
    repo.reload_index()
    return res


def _rewrite(
    repo: Repository,
    damaged: list[IndexedPack],
    records: set[tuple[bytes, bytes]],
    res: RepairIndexResult,
    events: EventSink,
) -> list[IndexedPack]:
    """Copy the good blobs of damaged packs into new packs; the damaged packs that could not be
    copied whole (returned) stay indexed as recovered."""
    keep: list[IndexedPack] = []
    if not damaged:
        return keep
    session = repo.write_session(index_flush_packs=1 << 30, index_flush_seconds=1e9)
    for p in damaged:
        try:
            repo.pack_aead(p.pack_id, p.sealed_key)
            copied = []
            for e, got in repo.read_pack_blobs(p.pack_id, list(p.blobs), errors=True):
                if isinstance(got, IntegrityError):
                    records.add((p.pack_id, e.id))
                    continue
                copied.append((e, bytes(got)))
        except SafeholdError as err:
            events(Event("warning", f"pack {p.pack_id.hex()[:16]} stays as it is: {err}"))
            keep.append(p)
            continue
        for e, data in copied:
            session.add_blob(BlobType(e.type), data, Compression("auto"), e.id, dedup=False)
        res.rewritten_packs.append(p.pack_id.hex())
        events(
            Event(
                "info",
                f"pack {p.pack_id.hex()[:16]}: its {len(copied)} good blobs were copied into a "
                "new pack; prune removes the damaged one",
            )
        )
    session.flush()
    return keep


def _rescue(
    repo: Repository, ex: _Examiner, items: list[tuple[_Examined, bytes]], res: RepairIndexResult
) -> None:
    """Copy the verified blobs of packs found only under another pack's name into new packs."""
    if not items:
        return
    session = repo.write_session(index_flush_packs=1 << 30, index_flush_seconds=1e9)
    for got, data in items:
        assert got.pack is not None
        aead = ex._unseal(got.pack.sealed_key)
        if aead is None:
            continue
        for e in got.pack.blobs:
            view = memoryview(data)[e.offset : e.offset + e.length]
            try:
                plain = decompress(aead.decrypt(bytes(view[:12]), view[12:]), e.codec, e.raw_length)
            except SafeholdError:
                continue
            if crypto.content_id(repo.secrets.id_key, plain) != e.id:
                continue
            session.add_blob(BlobType(e.type), plain, Compression("auto"), e.id, dedup=False)
        res.rewritten_packs.append(got.pack.pack_id.hex())
    session.flush()


def _load(repo: Repository, name: str, size: int) -> bytes:
    """An object's bytes, read in segments."""
    if size <= SEGMENT:
        return repo.backend.load(name)
    out = bytearray()
    while len(out) < size:
        piece = repo.backend.load(name, len(out), min(SEGMENT, size - len(out)))
        if not piece:
            break
        out += piece
    return bytes(out)


class _Examiner:
    def __init__(
        self,
        repo: Repository,
        listings: dict[bytes, list[IndexedPack]],
        stored: dict[str, int],
        read_data: bool,
    ) -> None:
        self.repo = repo
        self.listings = listings
        self.stored = stored
        self.read_data = read_data
        self.id_key = repo.secrets.id_key

    def examine(
        self, pid: str, size: int, header: IndexedPack | None, suspicious: bool
    ) -> _Examined:
        """One pack: trusted by its header, or read whole and verified."""
        if header is not None and not (suspicious or self.read_data):
            return _Examined(pack=header)
        if size > MAX_EXAMINE:
            if header is not None:
                return _Examined(pack=header)
            return _Examined(lost=f"its header cannot be read and it is too large ({size} bytes)")
        data = _load(self.repo, pack_name(pid), size)
        true = storage_id(data)
        if true != pid and (true in self.stored or bytes.fromhex(true) in self.listings):
            return _Examined(stray_of=true)  # a copy of another pack
        # this pack, intact or damaged (or a copy of a pack nobody knows: it is used as it is)
        pack_id = bytes.fromhex(pid)
        if header is not None:
            aead = self._unseal(header.sealed_key)
            if aead is not None:
                got = self._verified(pack_id, data, aead, header.sealed_key, header.blobs, None)
                if true != pid and not got.bad:
                    got.note = "does not match its id, though every blob verifies: kept"
                return got
        return self._recover(pack_id, data)

    def examine_bytes(self, pack_id: bytes, data: bytes) -> _Examined:
        """The verified blobs of pack ``pack_id``, whose content is ``data`` (read elsewhere)."""
        keys = self._keys(pack_id, data)
        trailer_at = _trailer_offset(data)
        for sealed, aead, _ in keys:
            if trailer_at is not None:
                hdr = _header_at(aead, data, trailer_at)
                if hdr is not None:
                    return self._verified(pack_id, data, aead, sealed, hdr, None)
        return self._recover(pack_id, data)

    def _keys(self, pack_id: bytes, data: bytes) -> list[tuple[bytes, crypto.Aead, str]]:
        """The sealed keys that open: the pack's own first, then those the index gives."""
        out: list[tuple[bytes, crypto.Aead, str]] = []
        cands = [(data[4:PACK_PREFIX_LEN], "")] + [
            (p.sealed_key, "the sealed key from the index; ")
            for p in self.listings.get(pack_id, [])
        ]
        seen: set[bytes] = set()
        for sealed, how in cands:
            if sealed in seen or len(sealed) != PACK_PREFIX_LEN - 4:
                continue
            seen.add(sealed)
            aead = self._unseal(sealed)
            if aead is not None:
                out.append((sealed, aead, how))
        return out

    def _unseal(self, sealed: bytes) -> crypto.Aead | None:
        private = self.repo.secrets.private_key
        if private is None:
            return None
        try:
            return crypto.Aead(crypto.unseal_key(private, sealed))
        except IntegrityError:
            return None

    def _recover(self, pack_id: bytes, data: bytes) -> _Examined:
        """A pack whose header cannot be read with its own key."""
        keys = self._keys(pack_id, data)
        if not keys:
            return _Examined(lost="its sealed key is damaged and no index object gives it")
        trailer_at = _trailer_offset(data)
        for sealed, aead, how in keys:  # 1. the header, under a key that opens it
            if trailer_at is not None:
                hdr = _header_at(aead, data, trailer_at)
                if hdr is not None:
                    note = f"{how}header read" if how else "trailer damaged; header read"
                    return self._verified(pack_id, data, aead, sealed, hdr, note)
        listed = {e for p in self.listings.get(pack_id, []) for e in p.blobs}
        if listed:  # 2. the entries the index objects give, each verified
            best: _Examined | None = None
            ordered = sorted(listed, key=lambda e: e.offset)
            for sealed, aead, how in keys:
                got = self._verified(pack_id, data, aead, sealed, ordered, None)
                if best is None or len(got.good) > len(best.good):
                    best = got
                    best.note = (
                        f"header unreadable; {how}{len(got.good)} of {len(listed)} blobs "
                        "recovered from the index entries"
                    )
            if best is not None and best.good:
                return best
        for sealed, aead, how in keys:  # 3. scanning, blob by blob
            entries, lost, note = _scan(self.id_key, aead, data, trailer_at)
            if not entries:
                continue
            if note.startswith("header found"):
                return self._verified(pack_id, data, aead, sealed, entries, f"{how}{note}")
            more = f", {lost} damaged regions lost" if lost else ""
            return _Examined(
                pack=IndexedPack(pack_id, len(data), sealed, entries),
                good={e.id for e in entries},
                note=f"{how}{note}: {len(entries)} blobs found by scanning the pack{more}",
            )
        return _Examined(lost="no blob in it can be read and verified")

    def _verified(
        self,
        pack_id: bytes,
        data: bytes,
        aead: crypto.Aead,
        sealed: bytes,
        entries: Iterable[PackEntry],
        note: str | None,
    ) -> _Examined:
        """The entries whose blobs verify; the ids of those that do not."""
        good: list[PackEntry] = []
        bad: list[bytes] = []
        end = 0
        for e in entries:
            if e.offset < max(end, PACK_PREFIX_LEN) or not _verify(self.id_key, aead, data, e):
                if e.id not in {g.id for g in good}:
                    bad.append(e.id)
                continue
            good.append(e)
            end = e.offset + e.length
        ok = {e.id for e in good}
        return _Examined(
            pack=IndexedPack(pack_id, len(data), sealed, good),
            bad=[b for b in dict.fromkeys(bad) if b not in ok],
            good=ok,
            note=note,
        )


def _verify(id_key: bytes, aead: crypto.Aead, data: bytes, e: PackEntry) -> bool:
    stored = memoryview(data)[e.offset : e.offset + e.length]
    if len(stored) != e.length or e.length < BLOB_OVERHEAD:
        return False
    try:
        plain = decompress(aead.decrypt(bytes(stored[:12]), stored[12:]), e.codec, e.raw_length)
    except (IntegrityError, FormatError):
        return False
    return len(plain) == e.raw_length and crypto.content_id(id_key, plain) == e.id


def _trailer_offset(data: bytes) -> int | None:
    """Where the trailer's length puts the header (its end magic is not required)."""
    if len(data) < PACK_PREFIX_LEN + TRAILER.size:
        return None
    length, _ = TRAILER.unpack(data[-TRAILER.size :])
    off = len(data) - TRAILER.size - length
    return off if off >= PACK_PREFIX_LEN and length >= 16 else None


def _header_at(aead: crypto.Aead, data: bytes, off: int) -> list[PackEntry] | None:
    try:
        plain = aead.decrypt(HEADER_NONCE, memoryview(data)[off : len(data) - TRAILER.size])
        entries = header_from_bytes(plain)
        check_entries(entries, off)
    except (IntegrityError, FormatError):
        return None
    return entries


def _scan_blob(
    id_key: bytes, aead: crypto.Aead, data: bytes, start: int, end: int
) -> PackEntry | None:
    """The blob stored at ``[start, end)``, if it decrypts: an entry (type data, or tree if its
    plaintext is a tree; see :func:`_scan`)."""
    if end - start < BLOB_OVERHEAD:
        return None
    view = memoryview(data)[start:end]
    try:
        payload = aead.decrypt(bytes(view[:12]), view[12:])
    except IntegrityError:
        return None
    codec, plain = 0, memoryview(payload)
    if payload[:4] == b"\x28\xb5\x2f\xfd":  # a zstd frame: writers store compressed data so
        try:
            plain = memoryview(decompress(payload, 1, SCAN_MAX_BLOB))
            codec = 1
        except FormatError:
            pass  # stored as is (a zstd file that did not compress again)
    try:
        tree_from_bytes(plain)
        kind = BlobType.TREE
    except (FormatError, ValueError, TypeError, KeyError, AttributeError):
        kind = BlobType.DATA
    return PackEntry(kind, crypto.content_id(id_key, plain), start, end - start, len(plain), codec)


def _scan(
    id_key: bytes, aead: crypto.Aead, data: bytes, trailer_at: int | None
) -> tuple[list[PackEntry], int, str]:
    """Find the blobs of a pack without its header: (entries, damaged regions, how), or the
    pack's own header if the scan finds it (a damaged trailer).

    Writers put blob *i* at the end of blob *i − 1*, beginning with its nonce, *i* as 12 bytes
    little-endian; the ciphertext is indistinguishable from random, so the first occurrence of
    the nonce *i + 1* after blob *i*'s start (plus 28) is where blob *i* ends (a chance
    occurrence inside a ciphertext has probability 2^-96 per byte), and AES-GCM decryption
    confirms each boundary. The last blob ends where the header begins: at the offset the
    trailer gives, or, with a damaged trailer, at one of the few offsets that a header listing
    the blobs found can begin at (the header's length is known to within a few bytes from the
    entries), each tried. A blob whose bytes are damaged is lost (its id is inside it); a
    damaged nonce costs the blob before it too. Packs mix no types, so the pack is a tree pack
    if every blob found is a valid tree; a stored blob that happens to be a whole zstd frame is
    taken as compressed."""
    size = len(data)
    limit = size - TRAILER.size - 16  # the trailer may lie: search up to the smallest header
    found: list[PackEntry] = []
    lost = 0
    pos, i = PACK_PREFIX_LEN, 0
    while pos + BLOB_OVERHEAD <= limit:
        nxt = data.find(crypto.counter_nonce(i + 1), pos + BLOB_OVERHEAD, limit)
        step = 1
        if nxt < 0:  # the next nonce damaged? then the one after it
            nxt = data.find(crypto.counter_nonce(i + 2), pos + 2 * BLOB_OVERHEAD, limit)
            step = 2
            if nxt < 0:
                break
        e = _scan_blob(id_key, aead, data, pos, nxt) if step == 1 else None
        if e is None:
            lost += step
        else:
            found.append(e)
        pos, i = nxt, i + step
    if pos + BLOB_OVERHEAD > limit:
        return _typed(found), lost, "header unreadable"
    # the last blob ends where the header begins: where the trailer says, or where a header
    # listing the blobs found can begin (its length is known to within a few bytes)
    lo = PackEntry(0, bytes(32), 0, BLOB_OVERHEAD, 0, 0)
    hi = PackEntry(0, bytes(32), _U32, _U32, _U32, 1)
    shortest = len(header_to_bytes(found + [lo] * (lost + 1))) + 16
    longest = len(header_to_bytes(found + [hi] * (lost + 1))) + 16
    window = [size - TRAILER.size - n for n in range(shortest, longest + 1)]
    window = [h for h in window if h >= pos + BLOB_OVERHEAD and h != trailer_at]
    for h in window:
        hdr = _header_at(aead, data, h)
        if hdr is not None:
            return hdr, 0, "header found by scanning past the damaged trailer"
    ends = ([trailer_at] if trailer_at is not None and trailer_at >= pos else []) + window
    for h in ends:
        e = _scan_blob(id_key, aead, data, pos, h)
        if e is not None:
            found.append(e)
            break
    else:
        lost += 1
    return _typed(found), lost, "header unreadable"


def _typed(entries: list[PackEntry]) -> list[PackEntry]:
    if entries and all(e.type == BlobType.TREE for e in entries):
        return entries
    return [dataclasses.replace(e, type=BlobType.DATA) for e in entries]


@dataclass
class RepairSnapshotsResult:
    rewritten: dict[str, str] = field(default_factory=dict)  # snapshot id -> repaired copy's id
    dropped: list[str] = field(default_factory=list)  # "snapshot id: path" of each lost entry
    forgotten: list[str] = field(default_factory=list)  # originals removed (forget_originals)
    unreadable: dict[str, str] = field(default_factory=dict)  # snapshot objects: name -> why
    removed_unreadable: list[str] = field(default_factory=list)  # those removed (forget_originals)


def present_blobs(repo: Repository, index: MasterIndex) -> dict[bytes, list[BlobLocation]]:
    """Every place, in a pack that is in storage, where the index says a blob is: live packs and
    the packs that only superseded index objects list (condemned by prune, not deleted yet)
    alike, except copies known to be damaged. A blob not in it is lost."""
    stored = {name_to_id(i.name) for i in repo.backend.list("data/")}
    out: dict[bytes, list[BlobLocation]] = {}
    suspect: dict[bytes, list[BlobLocation]] = {}
    for p in (*index.packs(), *index.old_packs()):
        if p.pack_id.hex() in stored:
            for b in p.blobs:
                loc = BlobLocation(p.pack_id, b)
                if index.is_damaged(p.pack_id, b.id):
                    suspect.setdefault(b.id, []).append(loc)
                else:
                    out.setdefault(b.id, []).append(loc)
    # a copy recorded as damaged counts only if it verifies now: a record can be wrong (a byte
    # put back, a passing failure, a forged record), and repair must never drop a file that
    # still restores
    for blob_id, locs in suspect.items():
        if blob_id in out:
            continue
        good = [loc for loc in locs if repo.copy_is_good(loc.pack_id, loc.entry)]
        if good:
            out[blob_id] = good
    return out


@dataclass(frozen=True, slots=True)
class _Fixed:
    """A tree after repair: its new id (None: unreadable) and what was dropped below it, as
    (path relative to the tree, reason)."""

    tree: bytes | None
    dropped: tuple[tuple[str, str], ...] = ()


REPAIRED_TAG = "repaired"
REPAIRED_FROM = "repaired_from"


def repaired_from(snap: Snapshot) -> str | None:
    """The original snapshot a repaired snapshot was made from."""
    got = snap.summary.get(REPAIRED_FROM)
    return got if isinstance(got, str) and is_hex_id(got) else None


def repair_snapshots(
    repo: Repository,
    *,
    dry_run: bool = False,
    forget_originals: bool = False,
    events: EventSink = ignore_events,
) -> RepairSnapshotsResult:
    """Write a repaired snapshot beside every snapshot that refers to lost data: files with a
    blob that no pack in storage holds (undamaged) and directories whose tree is lost are
    dropped, each named. The repaired snapshot has the tag ``repaired``, names the original in
    ``summary["repaired_from"]`` and is dated 1 ns after it (so it is ``latest`` in its place,
    and the next backup, reading every dropped file again, stores what was lost). The original
    stays: it restores everything it still can, and restores whole again once a backup has
    stored the lost data again. A snapshot already repaired for the same damage is not repaired
    again. ``forget_originals`` removes each original that has a repaired copy (an explicit
    step: the original cannot be healed once it is gone), and every snapshot object that cannot
    be read at all (named in ``unreadable`` either way)."""
    res = RepairSnapshotsResult()
    index = repo.reload_index()
    present = present_blobs(repo, index)
    session = None if dry_run else repo.write_session()
    hasher = repo.write_session() if session is None else session
    memo: dict[bytes, _Fixed] = {}

    def read_tree(tree_id: bytes) -> tuple[list[Node], list[str]] | None:
        """The tree, from any pack in storage that holds it (None if none can be read), and
        the names of its entries that are invalid (dropped: the others are kept)."""
        if tree_id not in present:
            return None
        try:
            return repo.read_tree(tree_id), []
        except SafeholdError:
            pass
        for loc in present[tree_id]:  # the index may prefer a copy that is lost or damaged
            try:
                for _, data in repo.read_pack_blobs(loc.pack_id, [loc.entry]):
                    if isinstance(data, SafeholdError):
                        break
                    nodes, bad = salvage_tree(data)
                    return nodes, [os.fsdecode(name) or "?" for name, _ in bad]
            except SafeholdError:
                continue
        return None

    def fix_tree(root: bytes) -> _Fixed:
        """The tree repaired, bottom-up with an explicit stack (depth costs no recursion);
        memoized per tree id, so a subtree shared by snapshots is repaired once."""
        read: dict[bytes, tuple[list[Node], list[str]]] = {}  # the trees being expanded
        stack = [root]
        while stack:
            tid = stack[-1]
            if tid in memo:
                stack.pop()
                continue
            if tid not in read:
                got_tree = read_tree(tid)
                if got_tree is None:
                    memo[tid] = _Fixed(None)
                    stack.pop()
                    continue
                read[tid] = got_tree
                stack += [
                    n.subtree
                    for n in got_tree[0]
                    if n.type == "dir"
                    and n.subtree is not None
                    and n.subtree not in memo
                    and n.subtree not in read  # in ``read``: an ancestor (a forged cycle)
                ]
                continue
            memo[tid] = combine(tid, *read.pop(tid))
            stack.pop()
        return memo[root]

    def combine(tree_id: bytes, nodes: list[Node], invalid: list[str]) -> _Fixed:
        out: list[Node] = []
        dropped: list[tuple[str, str]] = [(f"/{name}", "entry invalid") for name in invalid]
        for n in nodes:
            name = f"/{os.fsdecode(n.name)}"
            if n.type == "dir" and n.subtree is not None:
                sub = memo.get(n.subtree, _Fixed(None))  # absent: it contains itself
                if sub.tree is None:
                    dropped.append((f"{name}/", "directory unreadable"))
                    continue
                dropped += [(name + p, why) for p, why in sub.dropped]
                if sub.tree != n.subtree:
                    n = dataclasses.replace(n, subtree=sub.tree)
            elif n.content and any(c not in present for c in n.content):
                dropped.append((name, "data lost"))
                continue
            out.append(n)
        new_id = tree_id
        if dropped:
            new_id = store_tree(out)
        return _Fixed(new_id, tuple(dropped))

    def store_tree(nodes: list[Node]) -> bytes:
        data = tree_to_bytes(nodes)
        if session is None:
            return hasher.blob_id(data)
        return session.add_blob(BlobType.TREE, data, Compression("zstd", 3))[0]

    snaps = repo.snapshots()
    # (original, repaired root tree) -> the repaired snapshot: the same damage is repaired once
    done: dict[tuple[str, bytes], str] = {}
    for s in snaps:
        orig = repaired_from(s)
        if orig is not None:
            done[(orig, s.tree)] = s.id
    for snap in snaps:
        fixed = fix_tree(snap.tree)
        if fixed.tree == snap.tree:
            continue
        if fixed.tree is None:
            lines = [f"{snap.id[:8]}: / (root tree unreadable)"]
        else:
            lines = [f"{snap.id[:8]}: {p} ({why})" for p, why in fixed.dropped]
        root = fixed.tree if fixed.tree is not None else store_tree([])
        origin = repaired_from(snap) or snap.id
        if (origin, root) not in done:
            res.dropped += lines
            for line in lines:
                events(Event("warning", f"dropped {line}"))
            if session is None:
                res.rewritten[snap.id] = ""
                done[(origin, root)] = ""
            else:
                session.flush()  # the trees first: a snapshot is stored last
                summary = {**snap.summary, REPAIRED_FROM: origin, "repair_dropped": len(lines)}
                new = dataclasses.replace(
                    snap,
                    tree=root,
                    tags=sorted({*snap.tags, REPAIRED_TAG}),
                    time_ns=snap.time_ns + 1,
                    summary=summary,
                    id="",
                )
                res.rewritten[snap.id] = done[(origin, root)] = repo.save_snapshot(new)
                events(
                    Event(
                        "info", f"snapshot {snap.id[:8]} repaired as {res.rewritten[snap.id][:8]}"
                    )
                )
        if forget_originals:
            res.forgotten.append(snap.id)
            if session is not None:
                try:
                    repo.backend.delete(snapshot_name(snap.id))
                except NotFound:
                    pass
    # snapshot objects that cannot be read at all (damaged, forged): nothing in them can be
    # repaired; they are named, and removed only on the same explicit request
    res.unreadable = dict(repo.bad_snapshots)
    for name, why in sorted(res.unreadable.items()):
        events(Event("warning", f"{name} cannot be read: {why}"))
        if forget_originals:
            res.removed_unreadable.append(name)
            if session is not None:
                try:
                    repo.backend.delete(name)
                except NotFound:
                    pass
                repo.bad_snapshots.pop(name, None)
    if session is not None:
        session.flush()
    return res


def repair_config(repo: Repository, *, dry_run: bool = False) -> bool:
    """Write the ``config`` object back from the copy the repository was opened with, when it is
    missing or damaged (``repo.config_damaged``); True if it was (or would be) written."""
    if repo.config_damaged is None:
        return False
    if repo.secrets.config is None:
        raise UsageError("the key in use holds no copy of the config: open with another key")
    if dry_run:
        return True
    body = meta_object(repo.secrets.config, Kind.CONFIG, meta_key=repo.secrets.meta_key)
    repo.backend.store(CONFIG_NAME, config_header() + body, overwrite=True)
    repo.config_damaged = None
    return True
