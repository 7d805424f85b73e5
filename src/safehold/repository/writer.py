"""The write session: packs new blobs, stores packs, writes index objects as it goes.

Blobs are deduplicated against the master index and against blobs already added in this session.
Packs are stored as they fill; every few packs (or seconds) an index object lists them, so the
uploads of an interrupted backup are reused by the next run. Snapshots are saved separately and
last, by the caller, after :meth:`WriteSession.flush`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from safehold import crypto
from safehold.compress import Compression, compress
from safehold.format.index import IndexedPack, IndexFile
from safehold.format.pack import (
    HEADER_NONCE,
    PACK_END_MAGIC,
    PACK_MAGIC,
    PACK_PREFIX_LEN,
    TRAILER,
    PackEntry,
    header_to_bytes,
)
from safehold.ids import BlobType, index_name, pack_name, storage_id
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


@dataclass(slots=True)
class _OpenPack:
    type: BlobType
    aead: crypto.Aead
    sealed_key: bytes
    parts: list[bytes | memoryview] = field(default_factory=list)
    size: int = PACK_PREFIX_LEN
    entries: list[PackEntry] = field(default_factory=list)


class WriteSession:
    def __init__(
        self,
        repo: Repository,
        *,
        index_flush_packs: int = 4,
        index_flush_seconds: float = 10.0,
        on_pack_stored: Callable[[str, int], None] | None = None,
    ) -> None:
        self.repo = repo
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
    ) -> tuple[bytes, bool]:
        """Add a blob unless it is stored already; returns (id, whether it was new)."""
        bid = self.blob_id(data) if blob_id is None else blob_id
        with self._lock:
            if bid in self.index or bid in self._reserved:
                self.stats.blobs_known += 1
                return bid, False
            self._reserved.add(bid)
        payload, codec = compress(data, compression)
        if payload is data and isinstance(payload, memoryview):
            payload = bytes(payload)  # the caller's buffer will be reused
        full = None
        with self._lock:
            pack = self._open[type]
            if pack is None:
                pack = self._open[type] = self._new_pack(type)
            nonce = crypto.counter_nonce(len(pack.entries))
            ct = pack.aead.encrypt(nonce, payload)
            length = len(nonce) + len(ct)
            pack.entries.append(PackEntry(type, bid, pack.size, length, len(data), codec))
            pack.parts.append(nonce)
            pack.parts.append(ct)
            pack.size += length
            self.stats.blobs_new += 1
            self.stats.bytes_new_raw += len(data)
            self.stats.bytes_new_stored += length
            if pack.size >= self.target:
                self._open[type] = None
                full = pack
        if full is not None:
            self._store_pack(full)
        return bid, True

    def _new_pack(self, type: BlobType) -> _OpenPack:
        key = crypto.random_key()
        sealed = crypto.seal_key(self.repo.config.public_key, key)
        return _OpenPack(type, crypto.Aead(key), sealed, [PACK_MAGIC + sealed])

    def _store_pack(self, pack: _OpenPack) -> None:
        header = pack.aead.encrypt(HEADER_NONCE, header_to_bytes(pack.entries))
        pack.parts.append(header)
        pack.parts.append(TRAILER.pack(len(header), PACK_END_MAGIC))
        data = b"".join(pack.parts)
        pack.parts.clear()
        pid = storage_id(data)
        self.repo.backend.store(pack_name(pid), data)
        indexed = IndexedPack(bytes.fromhex(pid), len(data), pack.sealed_key, pack.entries)
        # the pack key is already known: remember it so reading back needs no unsealing
        self.index.add_pack(indexed)
        with self._lock:
            for e in pack.entries:
                self._reserved.discard(e.id)
            self.stats.packs_stored += 1
            self.stats.bytes_uploaded += len(data)
        if self.on_pack_stored is not None:
            self.on_pack_stored(pid, len(data))
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
        self.repo.backend.store(index_name(iid), data)
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
