"""Opening, creating and reading a repository; keys; snapshots."""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from safehold import crypto
from safehold.backends.base import Backend, older_versions
from safehold.chunker import Chunker, ChunkerParams
from safehold.clock import REAL_CLOCK, Clock
from safehold.compress import Compression, decompress
from safehold.errors import (
    AmbiguousSnapshot,
    FormatError,
    IntegrityError,
    NotFound,
    RepositoryExists,
    RepositoryNotFound,
    SafeholdError,
    SnapshotNotFound,
    UnsupportedVersion,
    UsageError,
)
from safehold.format.common import pack as pack_obj
from safehold.format.common import unpack
from safehold.format.config import Config, config_header, split_config
from safehold.format.index import IndexedPack, IndexFile
from safehold.format.keyfile import Secrets
from safehold.format.pack import HEADER_NONCE, PACK_PREFIX_LEN, PackEntry, header_from_bytes
from safehold.format.plan import PlanFile
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node, tree_from_bytes
from safehold.ids import (
    CONFIG_NAME,
    BlobType,
    index_name,
    is_hex_id,
    key_name,
    name_to_id,
    pack_name,
    plan_name,
    snapshot_name,
    storage_id,
)
from safehold.repository.cache import Cache
from safehold.repository.index import IndexState, MasterIndex
from safehold.repository.keys import (
    config_from_copy,
    key_info,
    make_key_file,
    unlock,
    with_config_copy,
)
from safehold.repository.locks import RepositoryLock
from safehold.repository.objects import Kind, meta_object, open_object, seal_object

if TYPE_CHECKING:
    from safehold.repository.writer import WriteSession

DEFAULT_PACK_SIZE = 16 << 20


@dataclass(frozen=True, slots=True)
class InitOptions:
    """What ``init`` fixes for the life of a repository."""

    chunk_avg: int = 1 << 20
    compression: str = "auto"
    pack_size: int = DEFAULT_PACK_SIZE
    kdf: crypto.KdfParams | None = None
    chunker_from: Repository | None = None
    """Chunk like this (open) repository: its chunker sizes, chunker seed and id key (``init
    --copy-chunker-params``), so that ``copy`` between the two deduplicates and copies blobs by
    id. ``chunk_avg`` is then ignored; every other secret is new."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    key_id: str
    kind: str
    created: str
    host: str
    user: str
    current: bool


class Repository:
    """An open repository. Thread-safe for reading and for one write session at a time."""

    def __init__(
        self,
        backend: Backend,
        config: Config,
        secrets: Secrets,
        key_id: str,
        cache: Cache | None = None,
    ) -> None:
        self.backend = backend
        self.config = config
        self.secrets = secrets
        self.key_id = key_id
        self.cache = cache
        self._index: MasterIndex | None = None
        self._index_lock = threading.Lock()
        self._pack_keys: collections.OrderedDict[bytes, crypto.Aead] = collections.OrderedDict()
        self._pack_keys_lock = threading.Lock()
        self._tree_cache: collections.OrderedDict[bytes, list[Node]] = collections.OrderedDict()
        self._tree_lock = threading.Lock()
        self._damage_lock = threading.Lock()
        self._damage_pending: set[tuple[bytes, bytes]] = set()  # not yet in the repository
        self._local: set[tuple[bytes, bytes]] | None = None  # the local cache's record
        self._local_dirty = False  # ... with pairs not yet written
        self._local_written = 0.0  # when it was last written (monotonic)
        self.damage_reasons: dict[tuple[bytes, bytes], str] = {}  # found by this process
        self.bad_snapshots: dict[str, str] = {}  # snapshot objects that cannot be read -> why
        self.lock_retry_s = 0.0  # how long lock() waits for other clients' locks
        self.clock: Clock = REAL_CLOCK
        self.threads = 4  # parallel reads of index objects and snapshots; 1: none (simulation)
        self.chunker_params = ChunkerParams(
            config.chunk_avg, config.chunk_min, config.chunk_max, config.chunk_normalization
        )

    # --- creating and opening ---------------------------------------------------------------

    config_damaged: str | None = None
    """Set by :meth:`open`: why the ``config`` object cannot be used (the repository was opened
    with the copy of the config kept in the key file), or None."""
    damaged_keys: tuple[tuple[str, str], ...] = ()
    """Set by :meth:`open`: (name, why) of each key file seen damaged while opening."""

    @classmethod
    def init(
        cls,
        backend: Backend,
        password: bytes,
        options: InitOptions | None = None,
        *,
        cache_dir: Path | None = None,
    ) -> Repository:
        options = options or InitOptions()
        if not password:
            raise UsageError("refusing an empty password: it would protect nothing")
        Compression.parse(options.compression)
        like = options.chunker_from
        if like is not None:
            chunk = like.chunker_params
        else:
            try:
                chunk = ChunkerParams.for_avg(options.chunk_avg)
            except ValueError as e:
                raise UsageError(str(e)) from None
        if not 1 << 20 <= options.pack_size <= 1 << 30:
            raise UsageError("the pack size must be between 1 MiB and 1 GiB")
        try:
            backend.stat(CONFIG_NAME)
            raise RepositoryExists(f"a repository already exists at {backend.location}")
        except NotFound:
            pass
        backend.create()
        if any(True for _ in backend.list("keys/")):
            raise RepositoryExists(f"{backend.location} already holds key files")
        private, public = crypto.generate_keypair()
        secrets = Secrets(
            repo_id=os.urandom(16),
            meta_key=crypto.random_key(),
            id_key=crypto.random_key() if like is None else like.secrets.id_key,
            chunker_seed=(
                (int.from_bytes(os.urandom(8), "little") >> 1) or 1  # 63 bits
                if like is None
                else like.secrets.chunker_seed
            ),
            public_key=public,
            private_key=private,
        )
        config = Config(
            repo_id=secrets.repo_id,
            chunk_avg=chunk.avg,
            chunk_min=chunk.min,
            chunk_max=chunk.max,
            chunk_normalization=chunk.normalization,
            compression=str(Compression.parse(options.compression)),
            pack_size=options.pack_size,
            public_key=public,
            created_ns=time.time_ns(),
        )
        config_plain = config.to_bytes()
        problem = config.problem()
        if problem is not None:
            raise UsageError(f"invalid repository parameters: {problem}")
        # each key file keeps a copy of the config, a way in if ``config`` is ever damaged
        secrets = with_config_copy(secrets, config_plain)
        kdf = options.kdf or crypto.KdfParams.from_env()
        key_data = make_key_file(secrets, password, kdf)
        key_id = storage_id(key_data)
        backend.store(key_name(key_id), key_data)
        body = meta_object(config_plain, Kind.CONFIG, meta_key=secrets.meta_key)
        backend.store(CONFIG_NAME, config_header() + body)  # last: the repository now exists
        return cls(backend, config, secrets, key_id, _cache_for(cache_dir, secrets))

    @classmethod
    def open(
        cls, backend: Backend, password: bytes, *, cache_dir: Path | None = None
    ) -> Repository:
        # The clear header first: a newer format fails before the password is used. A config
        # that is missing or damaged, beside key files, is replaced by the copy in the key file
        # (docs/format.md §14.2); ``config_damaged`` says so.
        from safehold.format.common import FORMAT_VERSION
        from safehold.repository.keys import newer_config, readable_key_file

        body: bytes | None = None
        damaged: str | None = None
        newer: UnsupportedVersion | None = None
        try:
            raw = backend.load(CONFIG_NAME)
            body = split_config(raw)
        except UnsupportedVersion as e:
            # a newer repository has newer key files too; beside a key file of our version, the
            # clear header is damaged (one flipped byte) unless the authenticated config itself
            # says it is newer (checked once a key opens)
            if readable_key_file(backend) is None:
                raise
            newer, body = e, raw[len(config_header()) :]
        except (NotFound, FormatError) as e:
            if not any(True for _ in backend.list("keys/")):
                if isinstance(e, NotFound):
                    raise RepositoryNotFound(
                        f"there is no repository at {backend.location}"
                    ) from None
                raise
            damaged = "config is missing" if isinstance(e, NotFound) else f"config: {e}"
        try:
            secrets, key_id, damaged_keys = unlock(backend, password)
        except SafeholdError:
            if newer is not None:
                raise newer from None  # no key opens: it may well be a newer repository
            raise
        config: Config | None = None
        if newer is not None and body is not None:
            try:
                plain = open_object(
                    body, Kind.CONFIG, meta_key=secrets.meta_key, private_key=None, what="config"
                )
            except IntegrityError:
                pass  # damaged beyond its header: the copy decides
            else:
                if newer_config(plain) is not None:
                    raise newer
            version = int.from_bytes(raw[8:10], "little")
            damaged = (
                f"config: its header claims format version {version}, but key file "
                f"keys/{key_id} is of version {FORMAT_VERSION}"
            )
            body = None
        if body is not None:
            try:
                plain = open_object(
                    body, Kind.CONFIG, meta_key=secrets.meta_key, private_key=None, what="config"
                )
                config = Config.from_bytes(plain)
            except IntegrityError as e:
                damaged = str(e) if str(e).startswith("config") else f"config: {e}"
            else:
                if config.repo_id != secrets.repo_id or config.public_key != secrets.public_key:
                    raise IntegrityError(
                        f"key file keys/{key_id} does not belong to this repository's config"
                    )
                secrets = with_config_copy(secrets, plain)  # keys added later keep a copy
        if config is None:
            config = config_from_copy(backend, secrets, key_id, damaged or "config is damaged")
        repo = cls(backend, config, secrets, key_id, _cache_for(cache_dir, secrets))
        repo.config_damaged = damaged
        repo.damaged_keys = tuple(sorted(damaged_keys.items()))
        return repo

    def close(self) -> None:
        self.backend.close()

    # --- objects ------------------------------------------------------------------------------

    def load_verified(self, name: str, *, use_cache: bool = False) -> bytes:
        """Load an id-named object and check it against its name (IntegrityError if not)."""
        oid = name_to_id(name)
        if use_cache and self.cache is not None:
            cached = self.cache.get(name, oid)
            if cached is not None:
                return cached
        data = self.backend.load(name)
        if storage_id(data) != oid:
            older = (d for d in older_versions(self.backend, name) if storage_id(d) == oid)
            data = next(older, b"")
            if not data:
                raise IntegrityError(f"{name} does not match its id (corrupt or tampered)")
        if use_cache and self.cache is not None:
            self.cache.put(name, data)
        return data

    def open_meta(self, data: bytes, kind: Kind, what: str) -> bytes:
        return open_object(
            data,
            kind,
            meta_key=self.secrets.meta_key,
            private_key=self.secrets.private_key,
            what=what,
        )

    # --- index --------------------------------------------------------------------------------

    @property
    def index(self) -> MasterIndex:
        with self._index_lock:
            if self._index is None:
                self._index = self._load_index()
            return self._index

    def reload_index(self, *, use_cache: bool = True) -> MasterIndex:
        """Load the index afresh; ``use_cache=False`` reads every index object from storage."""
        with self._index_lock:
            self._index = self._load_index(use_cache)
            return self._index

    def list_ids(self, prefix: str) -> list[str]:
        return [
            name_to_id(i.name) for i in self.backend.list(prefix) if is_hex_id(name_to_id(i.name))
        ]

    def read_index_file(self, index_id: str, *, use_cache: bool = True) -> IndexFile:
        name = index_name(index_id)
        data = self.load_verified(name, use_cache=use_cache)
        return IndexFile.from_bytes(self.open_meta(data, Kind.INDEX, name))

    def _map(self, fn: Any, items: list[str]) -> list[Any]:
        if self.threads <= 1 or len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            return list(pool.map(fn, items))

    def read_plan(self, plan_id: str) -> PlanFile:
        name = plan_name(plan_id)
        data = self.load_verified(name)
        return PlanFile.from_bytes(self.open_meta(data, Kind.PLAN, name))

    def load_plans(self) -> tuple[dict[str, PlanFile], dict[str, str]]:
        """The prune plans present, and the names of those that cannot be read (with why).
        A plan that cannot be read is never acted on."""
        plans: dict[str, PlanFile] = {}
        bad: dict[str, str] = {}
        for pid in self.list_ids("plans/"):
            try:
                plans[pid] = self.read_plan(pid)
            except NotFound:
                continue
            except SafeholdError as e:
                bad[plan_name(pid)] = str(e)
        return plans, bad

    def _load_index(self, use_cache: bool = True) -> MasterIndex:
        # plans first: a finishing plan deletes its superseded index objects before itself, so
        # an index object read after the plans were listed is never taken as live by mistake
        plans, bad_plans = self.load_plans()
        ids = self.list_ids("index/")
        index = MasterIndex()
        state = IndexState(unreadable=dict(bad_plans), plans=set(plans), plan_files=plans)

        def read(index_id: str) -> IndexFile | SafeholdError | None:
            try:
                return self.read_index_file(index_id, use_cache=use_cache)
            except NotFound:
                return None  # deleted since it was listed
            except SafeholdError as e:
                return e

        files = state.files
        for index_id, got in zip(ids, self._map(read, ids)):
            if isinstance(got, IndexFile):
                files[index_id] = got
            elif got is not None:
                state.unreadable[index_name(index_id)] = str(got)
        present = set(files)
        # superseded (authoritative): what a present plan replaces; claimed: what any present
        # index object says it supersedes (writers do not deduplicate against those)
        state.superseded = {s.hex() for p in plans.values() for s in p.superseded} & present
        state.claimed = state.superseded | (
            {s.hex() for f in files.values() for s in f.supersedes} & present
        )
        state.index_ids = present
        truth = self._settle_conflicts(files)
        live_ok = [i for i in present if i not in state.claimed]
        live_claimed = [i for i in present if i in state.claimed and i not in state.superseded]
        for index_id in sorted(live_ok):
            for p in files[index_id].packs:
                index.add_pack(truth.get(p.pack_id, p))
        for index_id in sorted(live_claimed):
            for p in files[index_id].packs:
                index.add_pack(truth.get(p.pack_id, p), dedup=False)
        for index_id in sorted(state.superseded):
            for p in files[index_id].packs:
                index.add_pack(truth.get(p.pack_id, p), live=False)
        for f in files.values():
            for pack_id, blob_id in f.damaged:
                index.mark_damaged(pack_id, blob_id)
        for pack_id, blob_id in self._local_damage():
            index.mark_damaged(pack_id, blob_id)
        with self._damage_lock:
            for pack_id, blob_id in self._damage_pending:
                index.mark_damaged(pack_id, blob_id)
        index.state = state
        if self.cache is not None:
            self.cache.forget_missing("index", set(ids))
        return index

    def _settle_conflicts(self, files: dict[str, IndexFile]) -> dict[bytes, IndexedPack]:
        """Packs that two index objects describe differently (one of them corrupt or forged:
        honest listings of a pack are identical), as the packs' own headers describe them. The
        index objects themselves stay as they are, for check to name."""
        first: dict[bytes, IndexedPack] = {}
        conflicts: set[bytes] = set()
        for f in files.values():
            for p in f.packs:
                seen = first.setdefault(p.pack_id, p)
                if seen is not p and seen != p:
                    conflicts.add(p.pack_id)
        truth: dict[bytes, IndexedPack] = {}
        if self.secrets.private_key is None:
            return truth  # a write-only key cannot read headers
        for pack_id in sorted(conflicts):
            try:
                truth[pack_id] = self.read_pack_index(pack_id.hex())
            except SafeholdError:
                continue  # missing or unreadable: no listing is better than another
        return truth

    # --- damage -------------------------------------------------------------------------------

    DAMAGE_CACHE_NAME = "damaged"

    def _local_damage(self) -> set[tuple[bytes, bytes]]:
        """The damage this machine has seen (kept in the local cache, sealed); read once."""
        with self._damage_lock:
            if self._local is not None:
                return self._local
        found: set[tuple[bytes, bytes]] = set()
        raw = self.cache.get_private(self.DAMAGE_CACHE_NAME) if self.cache is not None else None
        if raw is not None:
            try:
                found = {
                    (bytes(p), bytes(b))
                    for p, b in unpack(raw, "damage record")
                    if isinstance(p, bytes) and isinstance(b, bytes) and len(p) == len(b) == 32
                }
            except (FormatError, TypeError, ValueError):
                pass  # a cache file that cannot be read only costs speed
        with self._damage_lock:
            if self._local is None:
                self._local = found
            return self._local

    def _write_local_damage(self, *, at_once: bool) -> None:
        """Write the local record (at most once a second while reads keep finding damage)."""
        if self.cache is None:
            return
        now = time.monotonic()
        with self._damage_lock:
            if not self._local_dirty or (not at_once and now - self._local_written < 1.0):
                return
            data = pack_obj(sorted([p, b] for p, b in self._local or ()))
            self._local_dirty, self._local_written = False, now
        self.cache.put_private(self.DAMAGE_CACHE_NAME, data)

    def note_damaged(self, pack_id: bytes, blob_ids: Iterable[bytes], reason: str) -> None:
        """Record that the copies of these blobs in ``pack_id`` are damaged or gone: readers try
        other copies first, and the next backup stores the blobs again (which heals every
        snapshot that uses them). Kept in the local cache at once (then at most once a second
        while reads keep failing); :meth:`save_damage` writes the rest there and the record into
        the repository."""
        local = self._local_damage()
        with self._damage_lock:
            new = {(pack_id, b) for b in blob_ids if (pack_id, b) not in self.damage_reasons}
            if not new:
                return
            for pair in new:
                self.damage_reasons[pair] = reason
            self._damage_pending |= new
            if not new <= local:
                local |= new
                self._local_dirty = True
        index = self._index
        if index is not None:
            for p, b in new:
                index.mark_damaged(p, b)
        self._write_local_damage(at_once=False)

    def save_damage(self) -> str | None:
        """Write the damage found by this process into the repository as an index object that
        lists no packs (docs/format.md §9.4), so that every client learns it. Only with a full key
        (a read-only or write-only key leaves the record in the local cache). Returns the index
        object's id, or None if there was nothing to write or it could not be written."""
        self._write_local_damage(at_once=True)
        with self._damage_lock:
            pending = sorted(self._damage_pending)
        if not pending or self.secrets.private_key is None:
            return None
        try:
            iid = self.store_index(IndexFile(damaged=pending))
        except SafeholdError:
            return None  # storage refused (read-only, append-only rules): the cache keeps it
        with self._damage_lock:
            self._damage_pending -= set(pending)
        return iid

    # --- blobs --------------------------------------------------------------------------------

    def pack_aead(self, pack_id: bytes, sealed_key: bytes | None = None) -> crypto.Aead:
        with self._pack_keys_lock:
            aead = self._pack_keys.get(pack_id)
            if aead is not None:
                self._pack_keys.move_to_end(pack_id)
                return aead
        if sealed_key is None:
            pack = self.index.pack(pack_id)
            if pack is None:
                raise IntegrityError(f"pack {pack_id.hex()} is not in the index")
            sealed_key = pack.sealed_key
        if self.secrets.private_key is None:
            raise IntegrityError("this key can write but not read the repository")
        aead = crypto.Aead(crypto.unseal_key(self.secrets.private_key, sealed_key))
        with self._pack_keys_lock:
            self._pack_keys[pack_id] = aead
            if len(self._pack_keys) > 4096:
                self._pack_keys.popitem(last=False)
        return aead

    def decode_blob(
        self, pack_id: bytes, entry: PackEntry, stored: bytes | memoryview
    ) -> bytes | memoryview:
        """Decrypt, decompress and verify one blob's stored bytes."""
        what = f"blob {entry.id.hex()[:16]} in pack {pack_id.hex()[:16]}"
        if len(stored) != entry.length:
            raise IntegrityError(f"{what} is truncated")
        if entry.type == BlobType.DATA and entry.raw_length > self.config.chunk_max:
            # data blobs are chunks: none is longer than the chunker's maximum (a listing that
            # says otherwise is forged, and would make readers allocate what it claims)
            raise IntegrityError(f"{what} claims to be larger than any chunk can be")
        aead = self.pack_aead(pack_id)
        view = memoryview(stored)
        try:
            plain = aead.decrypt(bytes(view[:12]), view[12:])
        except IntegrityError:
            raise IntegrityError(f"{what} failed authentication (corrupt or tampered)") from None
        data = decompress(plain, entry.codec, entry.raw_length)
        if (
            len(data) != entry.raw_length
            or crypto.content_id(self.secrets.id_key, data) != entry.id
        ):
            raise IntegrityError(f"{what} does not match its id")
        return data

    def read_blob(self, blob_id: bytes) -> bytes | memoryview:
        """A blob's plaintext, verified. Every known copy is tried, undamaged ones first (and on a
        versioned bucket, earlier versions of a damaged pack); a copy that fails verification is
        recorded as damaged (:meth:`note_damaged`). IntegrityError if no copy is good."""
        locs = self.index.locations(blob_id)
        if not locs:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} is not in the index (data lost?)")
        first: SafeholdError | None = None
        for loc in locs:
            try:
                return self._read_blob_at(loc.pack_id, loc.entry)
            except IntegrityError as e:
                self.note_damaged(loc.pack_id, [blob_id], str(e))
                first = first or e
            except NotFound:
                first = first or IntegrityError(
                    f"blob {blob_id.hex()[:16]}: pack {loc.pack_id.hex()[:16]} is missing"
                )
        assert first is not None
        raise first

    def copy_is_good(self, pack_id: bytes, entry: PackEntry) -> bool:
        """Whether the copy of a blob in a pack reads and verifies now (a damage record can be
        wrong: a byte put back, a failure that passed, a forged record)."""
        try:
            self._read_blob_at(pack_id, entry)
            return True
        except (IntegrityError, NotFound):
            return False

    def _read_blob_at(self, pack_id: bytes, e: PackEntry) -> bytes | memoryview:
        name = pack_name(pack_id.hex())
        if e.type == BlobType.TREE and self.cache is not None:
            # tree packs are cached whole; a cached blob is authenticated like any other, and a
            # damaged cache file is dropped and read again from the repository
            cached = self.cache.get_range(name, e.offset, e.length)
            if cached is not None:
                try:
                    return self.decode_blob(pack_id, e, cached)
                except IntegrityError:
                    self.cache.drop(name)
            try:
                packed = self.load_verified(name)
            except IntegrityError:
                packed = None  # damaged somewhere: read this blob alone, cache nothing
            if packed is not None:
                self.cache.put(name, packed)
                return self.decode_blob(
                    pack_id, e, memoryview(packed)[e.offset : e.offset + e.length]
                )
        try:
            return self.decode_blob(pack_id, e, self.backend.load(name, e.offset, e.length))
        except IntegrityError as err:
            try:
                return self._read_older_version(pack_id, e)
            except IntegrityError:
                raise err from None

    @overload
    def read_pack_blobs(
        self,
        pack_id: bytes,
        entries: list[PackEntry],
        *,
        max_gap: int = ...,
        errors: Literal[False] = ...,
    ) -> Iterator[tuple[PackEntry, bytes | memoryview]]: ...

    @overload
    def read_pack_blobs(
        self,
        pack_id: bytes,
        entries: list[PackEntry],
        *,
        max_gap: int = ...,
        errors: Literal[True],
    ) -> Iterator[tuple[PackEntry, bytes | memoryview | IntegrityError]]: ...

    def read_pack_blobs(
        self,
        pack_id: bytes,
        entries: list[PackEntry],
        *,
        max_gap: int = 1 << 20,
        errors: bool = False,
    ) -> Iterator[tuple[PackEntry, bytes | memoryview | IntegrityError]]:
        """Read several blobs of one pack with as few range reads as possible, in offset order.

        A blob that fails verification raises IntegrityError, or with ``errors=True`` is yielded
        as ``(entry, IntegrityError)`` (and recorded as damaged) so the caller can go on with the
        others and try another copy with :meth:`read_blob`."""
        entries = sorted(entries, key=lambda e: e.offset)
        name = pack_name(pack_id.hex())
        i = 0
        while i < len(entries):
            j = i + 1
            while (
                j < len(entries)
                and entries[j].offset - (entries[j - 1].offset + entries[j - 1].length) <= max_gap
                and entries[j].offset + entries[j].length - entries[i].offset <= 64 << 20
            ):
                j += 1
            start = entries[i].offset
            end = entries[j - 1].offset + entries[j - 1].length
            data = memoryview(self.backend.load(name, start, end - start))
            for e in entries[i:j]:
                try:
                    blob = self.decode_blob(
                        pack_id, e, data[e.offset - start : e.offset - start + e.length]
                    )
                except IntegrityError as err:
                    if not errors:
                        raise
                    try:
                        blob = self._read_older_version(pack_id, e)
                    except IntegrityError:
                        self.note_damaged(pack_id, [e.id], str(err))
                        yield e, err
                        continue
                yield e, blob
            i = j

    def _read_older_version(self, pack_id: bytes, e: PackEntry) -> bytes | memoryview:
        name = pack_name(pack_id.hex())
        for older in older_versions(self.backend, name):
            try:
                return self.decode_blob(pack_id, e, older[e.offset : e.offset + e.length])
            except IntegrityError:
                continue
        raise IntegrityError(f"blob {e.id.hex()[:16]}: no earlier version of its pack is good")

    def read_tree(self, tree_id: bytes) -> list[Node]:
        with self._tree_lock:
            nodes = self._tree_cache.get(tree_id)
            if nodes is not None:
                self._tree_cache.move_to_end(tree_id)
                return nodes
        nodes = tree_from_bytes(self.read_blob(tree_id))
        with self._tree_lock:
            self._tree_cache[tree_id] = nodes
            if len(self._tree_cache) > 2048:
                self._tree_cache.popitem(last=False)
        return nodes

    def read_pack_index(self, pack_id: str) -> IndexedPack:
        """A pack's index entry, built from the pack itself (size, sealed key, header)."""
        name = pack_name(pack_id)
        size = self.backend.stat(name).size
        entries = self.read_pack_header(pack_id, size)
        sealed = self.backend.load(name, 4, PACK_PREFIX_LEN - 4)
        return IndexedPack(bytes.fromhex(pack_id), size, sealed, entries)

    def read_pack_header(self, pack_id: str, size: int | None = None) -> list[PackEntry]:
        """The blob list from a pack's own header (for check and index rebuilding)."""
        from safehold.format.pack import PACK_MAGIC, TRAILER, check_entries, parse_trailer

        name = pack_name(pack_id)
        if size is None:
            size = self.backend.stat(name).size
        if size < PACK_PREFIX_LEN + TRAILER.size:
            raise IntegrityError(f"pack {pack_id[:16]} is truncated")
        prefix = self.backend.load(name, 0, PACK_PREFIX_LEN)
        if prefix[:4] != PACK_MAGIC:
            raise IntegrityError(f"pack {pack_id[:16]} does not begin as a pack does (damaged)")
        tail = self.backend.load(name, size - TRAILER.size, TRAILER.size)
        try:
            off, ln = parse_trailer(tail, size)
        except FormatError as e:
            raise IntegrityError(f"pack {pack_id[:16]}: {e}") from None
        if self.secrets.private_key is None:
            raise IntegrityError("this key can write but not read the repository")
        aead = crypto.Aead(crypto.unseal_key(self.secrets.private_key, prefix[4:PACK_PREFIX_LEN]))
        hdr = aead.decrypt(HEADER_NONCE, self.backend.load(name, off, ln))
        entries = header_from_bytes(hdr)
        check_entries(entries, off)
        return entries

    # --- snapshots ----------------------------------------------------------------------------

    def load_snapshot(self, snapshot_id: str) -> Snapshot:
        name = snapshot_name(snapshot_id)
        data = self.load_verified(name, use_cache=True)
        plain = self.open_meta(data, Kind.SNAPSHOT, name)
        return Snapshot.from_bytes(plain, snapshot_id)

    def _load_snapshot_or_error(self, snapshot_id: str) -> Snapshot | SafeholdError | None:
        try:
            return self.load_snapshot(snapshot_id)
        except NotFound:
            return None  # forgotten since it was listed
        except (IntegrityError, UnsupportedVersion) as e:
            return e

    def snapshots(self) -> list[Snapshot]:
        """Every readable snapshot, oldest first. A snapshot object that cannot be read (damaged,
        forged, of an unknown version) is skipped and named in :attr:`bad_snapshots` (name ->
        why), so that one damaged object never stops the repository."""
        ids = self.list_ids("snapshots/")
        got = self._map(self._load_snapshot_or_error, ids)
        bad = {snapshot_name(i): str(g) for i, g in zip(ids, got) if isinstance(g, SafeholdError)}
        self.bad_snapshots = bad
        snaps = [s for s in got if isinstance(s, Snapshot)]
        if self.cache is not None:
            self.cache.forget_missing("snapshots", set(ids))
        snaps.sort(key=lambda s: (s.time_ns, s.id))
        return snaps

    def store_index(self, index: IndexFile) -> str:
        """Store an index object; returns its id."""
        data = meta_object(index.to_bytes(), Kind.INDEX, meta_key=self.secrets.meta_key)
        iid = storage_id(data)
        self.backend.store(index_name(iid), data)
        return iid

    def save_snapshot(self, snap: Snapshot) -> str:
        data = seal_object(snap.to_bytes(), Kind.SNAPSHOT, public_key=self.config.public_key)
        sid = storage_id(data)
        self.backend.store(snapshot_name(sid), data)
        snap.id = sid
        return sid

    def find_snapshot(
        self,
        spec: str,
        *,
        host: str | None = None,
        tags: list[str] | None = None,
        paths: list[str] | None = None,
        snapshots: list[Snapshot] | None = None,
    ) -> Snapshot:
        """A snapshot by unique id prefix, or ``latest`` (honouring host, tag and path filters)."""
        snaps = self.snapshots() if snapshots is None else snapshots
        if spec == "latest":
            matching = filter_snapshots(snaps, host=host, tags=tags, paths=paths)
            if not matching:
                raise SnapshotNotFound("no snapshot matches 'latest' with the given filters")
            return matching[-1]
        if not spec or any(c not in "0123456789abcdef" for c in spec.lower()):
            raise SnapshotNotFound(f"no snapshot {spec!r} (expected an id, a prefix or 'latest')")
        found = [s for s in snaps if s.id.startswith(spec.lower())]
        if not found:
            raise SnapshotNotFound(f"no snapshot with id {spec!r}")
        if len(found) > 1:
            raise AmbiguousSnapshot(f"snapshot id prefix {spec!r} is ambiguous: use more digits")
        return found[0]

    # --- writing ------------------------------------------------------------------------------

    def write_session(self, **kwargs: object) -> WriteSession:
        from safehold.repository.writer import WriteSession

        return WriteSession(self, **kwargs)  # type: ignore[arg-type]

    def chunker(self) -> Chunker:
        return Chunker(self.chunker_params, self.secrets.chunker_seed)

    def lock(
        self, *, exclusive: bool = False, op: str = "", retry_s: float | None = None
    ) -> RepositoryLock:
        """Take a lock; wait up to ``retry_s`` seconds (default: ``self.lock_retry_s``)."""
        lock = RepositoryLock(self.backend, exclusive, op, self.clock)
        lock.acquire(self.lock_retry_s if retry_s is None else retry_s)
        return lock

    # --- keys ---------------------------------------------------------------------------------

    def list_keys(self) -> list[KeyEntry]:
        out = []
        for info in self.backend.list("keys/"):
            kid = name_to_id(info.name)
            try:
                data = self.backend.load(info.name)
            except NotFound:
                continue
            try:
                if storage_id(data) != kid:
                    raise FormatError("does not match its name")
                kf = key_info(data)
            except FormatError:
                # listed (kind "damaged") so that it can be named and removed
                out.append(KeyEntry(kid, "damaged", "", "", "", False))
                continue
            out.append(KeyEntry(kid, kf.kind, kf.created, kf.host, kf.user, kid == self.key_id))
        return sorted(out, key=lambda k: k.created)

    def add_key(self, password: bytes, kdf: crypto.KdfParams | None = None) -> str:
        data = make_key_file(self.secrets, password, kdf or crypto.KdfParams.from_env())
        kid = storage_id(data)
        self.backend.store(key_name(kid), data)
        return kid

    def remove_key(self, key_id_prefix: str) -> str:
        keys = self.list_keys()
        found = [k for k in keys if k.key_id.startswith(key_id_prefix)]
        if not found or not key_id_prefix:
            raise UsageError(f"no key with id {key_id_prefix!r}")
        if len(found) > 1:
            raise UsageError(f"key id prefix {key_id_prefix!r} is ambiguous")
        if found[0].kind != "damaged" and sum(1 for k in keys if k.kind != "damaged") <= 1:
            raise UsageError("refusing to remove the last key: the repository would be unreadable")
        if found[0].current:
            raise UsageError("refusing to remove the key in use: open with another key first")
        self.backend.delete(key_name(found[0].key_id))
        return found[0].key_id

    def change_password(self, new_password: bytes, kdf: crypto.KdfParams | None = None) -> str:
        """Write a key file for the new password, then remove the current one (never zero keys)."""
        new_id = self.add_key(new_password, kdf)
        old = self.key_id
        self.key_id = new_id
        try:
            self.backend.delete(key_name(old))
        except SafeholdError as e:
            raise SafeholdError(
                f"the new password was added (key {new_id[:10]}) but the old key {old[:10]} "
                f"could not be removed, so the old password still works: {e}"
            ) from None
        return new_id


def filter_snapshots(
    snaps: list[Snapshot],
    *,
    host: str | None = None,
    tags: list[str] | None = None,
    paths: list[str] | None = None,
) -> list[Snapshot]:
    """Snapshots on ``host`` having every tag in ``tags`` and every path in ``paths``."""
    out = []
    for s in snaps:
        if host and s.host != host:
            continue
        if tags and not set(tags) <= set(s.tags):
            continue
        if paths and not {os.path.abspath(p) for p in paths} <= set(s.paths):
            continue
        out.append(s)
    return out


CACHE_KEY_CONTEXT = b"safehold 1 local cache key".ljust(32, b"\0")


def _cache_for(cache_dir: Path | None, secrets: Secrets) -> Cache | None:
    """The repository's local cache; what it keeps privately is sealed under a key derived from
    the repository's meta key (never the key itself)."""
    if cache_dir is None:
        return None
    key = crypto.meta_object_key(secrets.meta_key, CACHE_KEY_CONTEXT)
    return Cache(cache_dir / secrets.repo_id.hex(), key=key)
