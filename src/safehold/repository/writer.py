"""The write session: packs new blobs, stores packs, writes index objects as it goes.

Blobs are deduplicated against the master index and against blobs already added in this session.
Packs are stored as they fill; every few packs (or seconds) an index object lists them, so the
uploads of an interrupted backup are reused by the next run. Snapshots are saved separately and
last, by the caller, after :meth:`WriteSession.flush`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from safehold import crypto
from safehold.compress import Compression, compress
from safehold.errors import Locked, SafeholdError
from safehold.format.index import IndexedPack, IndexFile
from safehold.format.pack import (
    BLOB_OVERHEAD,
    HEADER_NONCE,
    PACK_END_MAGIC,
    PACK_MAGIC,
    PACK_PREFIX_LEN,
    TRAILER,
    PackEntry,
    header_to_bytes,
)
from safehold.ids import BlobType, index_name, pack_name, storage_id
from safehold.repository.locks import RepositoryLock
from safehold.repository.objects import Kind, meta_object
from safehold.repository.repo import Repository


@dataclass(slots=True)
class WriteStats:
    blobs_new: int = 0
    blobs_known: int = 0
    bytes_new_raw: int = 0
    bytes_new_stored: int = 0
    packs_stored: int = 0
    bytes_uploaded: int = 0
    index_objects: int = 0


HEADER_ENTRY_MAX = 64
"""The most one blob entry adds to a pack header (msgpack of [type, id, offset, length, raw
length, codec] is at most 57 bytes, plus the encryption of the header: 16 bytes in all)."""


class _OpenPack:
    """A pack being filled, in a reusable buffer: blobs are encrypted straight into it."""

    __slots__ = ("aead", "buf", "entries", "sealed_key", "size", "type", "view")

    def __init__(self, type: BlobType, buf: bytearray, public_key: bytes) -> None:
        key = crypto.random_key()
        self.type = type
        self.aead = crypto.Aead(key)
        self.sealed_key = crypto.seal_key(public_key, key)
        self.buf = buf
        self.view = memoryview(buf)
        self.view[: len(PACK_MAGIC)] = PACK_MAGIC
        self.view[len(PACK_MAGIC) : PACK_PREFIX_LEN] = self.sealed_key
        self.size = PACK_PREFIX_LEN
        self.entries: list[PackEntry] = []

    def room(self) -> int:
        """Bytes left for blobs, keeping room for the header that lists them and one more."""
        return len(self.buf) - self.size - (len(self.entries) + 1) * HEADER_ENTRY_MAX - 256

    def append(self, blob_id: bytes, payload: bytes | memoryview, raw_len: int, codec: int) -> int:
        nonce = crypto.counter_nonce(len(self.entries))
        start = self.size
        length = len(nonce) + len(payload) + crypto.TAG_LEN
        self.view[start : start + len(nonce)] = nonce
        self.aead.encrypt_into(nonce, payload, self.view[start + len(nonce) : start + length])
        self.entries.append(PackEntry(self.type, blob_id, start, length, raw_len, codec))
        self.size += length
        return length

    def finish(self) -> memoryview:
        """Append the encrypted header and trailer; the pack's bytes (a view of the buffer)."""
        header = self.aead.encrypt(HEADER_NONCE, header_to_bytes(self.entries))
        tail = header + TRAILER.pack(len(header), PACK_END_MAGIC)
        if self.size + len(tail) > len(self.buf):  # cannot happen while room() keeps its promise
            self.view.release()
            self.buf.extend(bytes(self.size + len(tail) - len(self.buf)))
            self.view = memoryview(self.buf)
        self.view[self.size : self.size + len(tail)] = tail
        self.size += len(tail)
        return self.view[: self.size]


class _BufferPool:
    """Pack buffers, reused: touching fresh memory costs more than reusing it, and the number of
    buffers bounds the memory that packing can use whatever the data size."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._free: queue.LifoQueue[bytearray] = queue.LifoQueue()
        self._made = 0
        self._count = count
        self._lock = threading.Lock()

    def get(self, at_least: int) -> bytearray:
        if at_least > self.size:
            return bytearray(at_least)  # an oversized blob gets a pack of its own, not pooled
        with self._lock:
            if self._free.empty() and self._made < self._count:
                self._made += 1
                return bytearray(self.size)
        return self._free.get()

    def put(self, buf: bytearray) -> None:
        if len(buf) == self.size:
            self._free.put(buf)


class WriteSession:
    def __init__(
        self,
        repo: Repository,
        *,
        index_flush_packs: int = 4,
        index_flush_seconds: float = 10.0,
        on_pack_stored: Callable[[str, int], None] | None = None,
        lock: RepositoryLock | None = None,
    ) -> None:
        self.repo = repo
        # an index object is stored only under a lease provably held, and withdrawn if the lease
        # lapsed while it was stored: a prune that saw the lock expire may be deleting the packs
        # it lists (they were unused), and an index entry of a deleted pack would make a later
        # backup deduplicate against nothing
        self.lock = lock
        self.index = repo.index
        self.target = repo.config.pack_size
        self.stats = WriteStats()
        self._lock = threading.Lock()
        self._open: dict[BlobType, _OpenPack | None] = {BlobType.DATA: None, BlobType.TREE: None}
        self._reserved: set[bytes] = set()
        self._pending: list[IndexedPack] = []
        self._index_lock = threading.Lock()
        self._last_flush = time.monotonic()
        self.flush_packs = index_flush_packs
        self.flush_seconds = index_flush_seconds
        self.on_pack_stored = on_pack_stored
        self._id_key = repo.secrets.id_key
        self.index_ids: list[str] = []
        # a pack closes at its target size, or earlier when the next blob would not fit; three
        # buffers: the open data pack, the open tree pack and one being stored
        self._pool = _BufferPool(self.target + (256 << 10), 3)

    def blob_id(self, data: bytes | memoryview) -> bytes:
        return crypto.content_id(self._id_key, data)

    def known(self, blob_id: bytes) -> bool:
        return blob_id in self.index or blob_id in self._reserved

    def add_blob(
        self,
        type: BlobType,
        data: bytes | memoryview,
        compression: Compression,
        blob_id: bytes | None = None,
        *,
        dedup: bool = True,
    ) -> tuple[bytes, bool]:
        """Add a blob unless it is stored already; returns (id, whether it was new).

        ``dedup=False`` (prune's repacking) stores it even if the index has it elsewhere."""
        bid = self.blob_id(data) if blob_id is None else blob_id
        with self._lock:
            if (dedup and bid in self.index) or bid in self._reserved:
                self.stats.blobs_known += 1
                return bid, False
            self._reserved.add(bid)
        payload, codec = compress(data, compression)
        need = len(payload) + BLOB_OVERHEAD
        while True:
            full = None
            done = False
            with self._lock:
                pack = self._open[type]
                if pack is not None and pack.room() >= need + (64 << 10):
                    pack.append(bid, payload, len(data), codec)
                    self.stats.blobs_new += 1
                    self.stats.bytes_new_raw += len(data)
                    self.stats.bytes_new_stored += need
                    done = True
                    if pack.size >= self.target:
                        self._open[type] = None
                        full = pack
                elif pack is not None:
                    full, self._open[type] = pack, None  # no room: close it, start another
            if full is not None and full.entries:
                self._store_pack(full)
            elif full is not None:  # an empty pack too small for this blob: never stored
                self._pool.put(full.buf)
            if done:
                return bid, True
            # get a fresh buffer (this may wait for a pack being stored) and try again
            buf = self._pool.get(need + PACK_PREFIX_LEN + (128 << 10))
            with self._lock:
                unused = self._open[type] is not None
                if not unused:
                    self._open[type] = _OpenPack(type, buf, self.repo.config.public_key)
            if unused:
                self._pool.put(buf)

    def _store_pack(self, pack: _OpenPack) -> None:
        try:
            data = pack.finish()
            pid = storage_id(data)
            self.repo.backend.store(pack_name(pid), data)
            size = len(data)
        finally:
            self._pool.put(pack.buf)
        indexed = IndexedPack(bytes.fromhex(pid), size, pack.sealed_key, pack.entries)
        self.index.add_pack(indexed)
        with self._lock:
            for e in pack.entries:
                self._reserved.discard(e.id)
            self.stats.packs_stored += 1
            self.stats.bytes_uploaded += size
        if self.on_pack_stored is not None:
            self.on_pack_stored(pid, size)
        with self._index_lock:
            self._pending.append(indexed)
            due = len(self._pending) >= self.flush_packs or (
                time.monotonic() - self._last_flush >= self.flush_seconds
            )
            if due:
                self._write_index_locked()

    def _write_index_locked(self) -> None:
        if not self._pending:
            return
        data = meta_object(
            IndexFile(list(self._pending)).to_bytes(),
            Kind.INDEX,
            meta_key=self.repo.secrets.meta_key,
        )
        iid = storage_id(data)
        if self.lock is not None:
            self.lock.check()
        self.repo.backend.store(index_name(iid), data)
        if self.lock is not None and not self.lock.held_until_now():
            with contextlib.suppress(SafeholdError):
                self.repo.backend.delete(index_name(iid))
            self.lock.check()  # raises: the lease lapsed
            raise Locked("lost the repository lock while storing an index object")
        self.index.index_ids.add(iid)
        self.index_ids.append(iid)
        self._pending.clear()
        self._last_flush = time.monotonic()
        with self._lock:
            self.stats.index_objects += 1
            self.stats.bytes_uploaded += len(data)

    def flush(self) -> None:
        """Store the packs still open and an index object for every stored pack not yet indexed."""
        with self._lock:
            packs = [p for p in self._open.values() if p is not None and p.entries]
            self._open = {BlobType.DATA: None, BlobType.TREE: None}
        for p in packs:
            self._store_pack(p)
        with self._index_lock:
            self._write_index_locked()
