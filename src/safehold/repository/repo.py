"""Opening, creating and reading a repository; keys; snapshots."""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safehold import crypto
from safehold.backends.base import Backend
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
    UsageError,
    WrongPassword,
)
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
from safehold.repository.keys import key_info, make_key_file, try_key_file
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
        self.lock_retry_s = 0.0  # how long lock() waits for other clients' locks
        self.clock: Clock = REAL_CLOCK
        self.threads = 4  # parallel reads of index objects and snapshots; 1: none (simulation)
        self.chunker_params = ChunkerParams(
            config.chunk_avg, config.chunk_min, config.chunk_max, config.chunk_normalization
        )

    # --- creating and opening ---------------------------------------------------------------

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
        Compression.parse(options.compression)
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
            id_key=crypto.random_key(),
            chunker_seed=(int.from_bytes(os.urandom(8), "little") >> 1) or 1,  # 63 bits
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
        kdf = options.kdf or crypto.KdfParams.from_env()
        key_data = make_key_file(secrets, password, kdf)
        key_id = storage_id(key_data)
        backend.store(key_name(key_id), key_data)
        body = meta_object(config.to_bytes(), Kind.CONFIG, meta_key=secrets.meta_key)
        backend.store(CONFIG_NAME, config_header() + body)  # last: the repository now exists
        return cls(backend, config, secrets, key_id, _cache_for(cache_dir, secrets.repo_id))

    @classmethod
    def open(
        cls, backend: Backend, password: bytes, *, cache_dir: Path | None = None
    ) -> Repository:
        try:
            raw_config = backend.load(CONFIG_NAME)
        except NotFound:
            raise RepositoryNotFound(f"there is no repository at {backend.location}") from None
        body = split_config(raw_config)
        secrets, key_id = None, ""
        for info in sorted(backend.list("keys/"), key=lambda i: i.name):
            try:
                data = backend.load(info.name)
                if storage_id(data) != name_to_id(info.name):
                    continue  # a damaged key file cannot be trusted; another may still open
                secrets = try_key_file(data, password)
            except (FormatError, NotFound):
                continue
            if secrets is not None:
                key_id = name_to_id(info.name)
                break
        if secrets is None:
            raise WrongPassword("wrong password: no key of the repository opens with it")
        config = Config.from_bytes(
            open_object(
                body, Kind.CONFIG, meta_key=secrets.meta_key, private_key=None, what="config"
            )
        )
        if config.repo_id != secrets.repo_id or config.public_key != secrets.public_key:
            raise IntegrityError("the key file does not belong to this repository's config")
        return cls(backend, config, secrets, key_id, _cache_for(cache_dir, secrets.repo_id))

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
        loc = self.index.lookup(blob_id)
        if loc is None:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} is not in the index (data lost?)")
        e = loc.entry
        name = pack_name(loc.pack_id.hex())
        if e.type == BlobType.TREE and self.cache is not None:
            # tree packs are cached whole; a cached blob is authenticated like any other, and a
            # damaged cache file is dropped and read again from the repository
            cached = self.cache.get_range(name, e.offset, e.length)
            if cached is not None:
                try:
                    return self.decode_blob(loc.pack_id, e, cached)
                except IntegrityError:
                    self.cache.drop(name)
            packed = self.load_verified(name)
            self.cache.put(name, packed)
            return self.decode_blob(
                loc.pack_id, e, memoryview(packed)[e.offset : e.offset + e.length]
            )
        return self.decode_blob(loc.pack_id, e, self.backend.load(name, e.offset, e.length))

    def read_pack_blobs(
        self, pack_id: bytes, entries: list[PackEntry], *, max_gap: int = 1 << 20
    ) -> Iterator[tuple[PackEntry, bytes | memoryview]]:
        """Read several blobs of one pack with as few range reads as possible, in offset order."""
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
                yield (
                    e,
                    self.decode_blob(
                        pack_id, e, data[e.offset - start : e.offset - start + e.length]
                    ),
                )
            i = j

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
        from safehold.format.pack import TRAILER, check_entries, parse_trailer

        name = pack_name(pack_id)
        if size is None:
            size = self.backend.stat(name).size
        if size < PACK_PREFIX_LEN + TRAILER.size:
            raise IntegrityError(f"pack {pack_id[:16]} is truncated")
        prefix = self.backend.load(name, 0, PACK_PREFIX_LEN)
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

    def _load_snapshot_if_present(self, snapshot_id: str) -> Snapshot | None:
        try:
            return self.load_snapshot(snapshot_id)
        except NotFound:
            return None  # forgotten since it was listed

    def snapshots(self) -> list[Snapshot]:
        """Every snapshot, oldest first."""
        ids = self.list_ids("snapshots/")
        snaps = self._map(self._load_snapshot_if_present, ids)
        snaps = [s for s in snaps if s is not None]
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
                kf = key_info(self.backend.load(info.name))
            except (FormatError, NotFound):
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
        if len(keys) <= 1:
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


def _cache_for(cache_dir: Path | None, repo_id: bytes) -> Cache | None:
    if cache_dir is None:
        return None
    return Cache(cache_dir / repo_id.hex())
