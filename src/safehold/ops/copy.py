"""Copy snapshots from one repository into another, storing only the blobs the target lacks.

Each repository keys its blob ids with its own id key and cuts files with its own chunker (sizes
and seed), so how a snapshot travels depends on what the two share:

* ``by-id``: the same chunker sizes, chunker seed and id key (``init --copy-chunker-params``):
  blob ids and tree bytes are the same in both, so each blob the target lacks is read from the
  source (verified), and stored into the target (compressed and encrypted anew) under its id.
* ``re-id``: the same chunker sizes and seed but another id key: the cut points are the same, so
  each blob is stored under the target's id for it, and the trees are written anew.
* ``re-chunk``: another chunker: every file's content is streamed from the source through the
  target's chunker (one blob in memory at a time), and the trees are written anew.

In the two rewriting modes, the previous copy of a snapshot of the same host and paths serves as
a parent: a directory or file unchanged since then reuses what that copy stored, without reading
the source's data again.

The target is written as a backup writes it (docs/format.md §14.4, §15.2): under a shared lock,
with its index loaded once the lock is stored, packs indexed as they are stored (an interrupted
copy's uploads are reused by the next run), each snapshot stored last and only with a valid
lease. The source is read under a reader lock, so a prune of the source waits for the copy.

A copied snapshot records the source snapshot in its ``original`` field (docs/format.md §11); a
source snapshot that the target already has (by id or ``original``) is skipped, so copying twice
never makes two copies.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from safehold.compress import Compression
from safehold.errors import IntegrityError, Interrupted, SafeholdError, UsageError
from safehold.events import Event, EventSink, ignore_events
from safehold.format.pack import PackEntry
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node, tree_from_bytes, tree_to_bytes
from safehold.ids import BlobType
from safehold.ops.backup import commit_snapshot
from safehold.ops.walk import run_nested
from safehold.repository.locks import RepositoryLock, reader_lock
from safehold.repository.repo import Repository, filter_snapshots
from safehold.repository.writer import WriteSession

BY_ID = "by-id"
RE_ID = "re-id"
RE_CHUNK = "re-chunk"

BATCH_BYTES = 32 << 20
"""Stored bytes of source blobs gathered before they are read (by-id mode): reads of one pack
are merged into few range reads, and at most this much is held at once."""
MEMO_ENTRIES = 100_000
"""Source tree -> target tree pairs remembered (re-id and re-chunk modes)."""
TREE_COMPRESSION = Compression("zstd", 3)


@dataclass
class CopyOptions:
    """Which snapshots to copy: ids, id prefixes or ``latest`` (none: every snapshot), each
    narrowed by host, tags (all of them) and paths (all of them), as ``snapshots`` lists them."""

    snapshots: list[str] = field(default_factory=list)
    host: str | None = None
    tags: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    index_flush_packs: int = 4
    index_flush_seconds: float = 10.0


@dataclass
class CopyResult:
    mode: str  # "by-id", "re-id" or "re-chunk"
    copied: list[tuple[str, str]] = field(default_factory=list)  # (source id, new target id)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source id, target id)
    failed: dict[str, str] = field(default_factory=dict)  # source id -> why (source damage)
    blobs_new: int = 0
    data_added: int = 0  # plaintext bytes of the blobs stored
    data_added_stored: int = 0  # ... as stored (compressed, encrypted)
    bytes_uploaded: int = 0  # packs and index objects
    packs_stored: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "copied": [{"source": s, "snapshot": d} for s, d in self.copied],
            "skipped": [{"source": s, "snapshot": d} for s, d in self.skipped],
            "failed": [{"source": s, "error": why} for s, why in self.failed.items()],
            "blobs_new": self.blobs_new,
            "data_added": self.data_added,
            "data_added_stored": self.data_added_stored,
            "bytes_uploaded": self.bytes_uploaded,
            "packs_stored": self.packs_stored,
        }


def copy_mode(src: Repository, dst: Repository) -> str:
    """How blobs travel from ``src`` to ``dst`` (see the module's doc)."""
    if (
        src.chunker_params != dst.chunker_params
        or src.secrets.chunker_seed != dst.secrets.chunker_seed
    ):
        return RE_CHUNK
    if src.secrets.id_key != dst.secrets.id_key:
        return RE_ID
    return BY_ID


def _key(s: Snapshot) -> str:
    """The id of the first snapshot of a chain of copies."""
    return s.original.hex() if s.original is not None else s.id


def copy_snapshots(
    src: Repository,
    dst: Repository,
    opts: CopyOptions,
    *,
    events: EventSink = ignore_events,
    stop: threading.Event | None = None,
) -> CopyResult:
    """Copy the snapshots of ``src`` that ``opts`` selects into ``dst``, oldest first, skipping
    those ``dst`` has already. A snapshot whose data cannot be read in ``src`` (damage) is named
    in ``failed`` and the others are still copied. ``stop`` set: raises Interrupted at the next
    safe point (what was stored is indexed and reused by the next run). Reports ``info`` events
    (one per snapshot copied or skipped), ``warning`` events and ``progress`` events."""
    stop = stop or threading.Event()
    if src.config.repo_id == dst.config.repo_id:
        raise UsageError("the source and the target are the same repository")
    if src.secrets.private_key is None:
        raise UsageError("the source's key can write but not read: copy needs a full key")
    rlock = reader_lock(src.backend, src.clock)
    try:
        # listed after the reader lock is stored: a prune planned from now on waits for it
        every, wanted = _select(src, opts)
        for name, why in sorted(src.bad_snapshots.items()):
            events(Event("warning", f"source: skipped {name}, which cannot be read: {why}"))
        src.reload_index()
        held = dst.lock()
        try:
            return _Copy(src, dst, opts, events, stop, held, every).run(wanted)
        finally:
            held.release()
    finally:
        if rlock is not None:
            rlock.release()


def _select(src: Repository, opts: CopyOptions) -> tuple[list[Snapshot], list[Snapshot]]:
    """Every readable snapshot of the source, and those selected."""
    snaps = src.snapshots()
    filters: dict[str, Any] = {
        "host": opts.host,
        "tags": opts.tags or None,
        "paths": opts.paths or None,
    }
    if not opts.snapshots:
        return snaps, filter_snapshots(snaps, **filters)
    chosen: dict[str, Snapshot] = {}
    for spec in opts.snapshots:
        s = src.find_snapshot(spec, snapshots=snaps, **filters)
        chosen[s.id] = s
    return snaps, sorted(chosen.values(), key=lambda s: (s.time_ns, s.id))


class _Copy:
    def __init__(
        self,
        src: Repository,
        dst: Repository,
        opts: CopyOptions,
        events: EventSink,
        stop: threading.Event,
        lock: RepositoryLock,
        src_snapshots: list[Snapshot],
    ) -> None:
        self.src_snapshots = src_snapshots
        self.src = src
        self.dst = dst
        self.opts = opts
        self.events = events
        self.stop = stop
        self.lock = lock
        self.mode = copy_mode(src, dst)

    def run(self, wanted: list[Snapshot]) -> CopyResult:
        src, dst = self.src, self.dst
        res = CopyResult(self.mode)
        # the target's snapshots, then its index as it is now that prune can see our lock
        have: dict[str, Snapshot] = {}
        self.seen: set[str] = set()
        for s in dst.snapshots():
            self.seen.add(s.id)
            have.setdefault(s.id, s)
            if s.original is not None:
                have[s.original.hex()] = s
        dst.reload_index()
        by_key = {_key(s): s for s in self.src_snapshots}  # for the previous copies
        todo: list[Snapshot] = []
        for snap in wanted:
            there = have.get(snap.id) or have.get(_key(snap))
            if there is not None:
                res.skipped.append((snap.id, there.id))
                self.events(
                    Event(
                        "info",
                        f"snapshot {snap.id[:8]} is in the target already (as {there.id[:8]})",
                        {"source": snap.id, "snapshot": there.id, "skipped": True},
                    )
                )
            else:
                todo.append(snap)
        if not todo:
            return res
        session = dst.write_session(
            index_flush_packs=self.opts.index_flush_packs,
            index_flush_seconds=self.opts.index_flush_seconds,
            lock=self.lock,
        )
        copier: _ById | _Rewriter = (
            _ById(src, session, self.check_stop)
            if self.mode == BY_ID
            else _Rewriter(src, dst, session, self.mode, self.check_stop)
        )
        try:
            for n, snap in enumerate(todo):
                self.check_stop()
                if self._arrived(snap, have, res):
                    continue
                hint = None
                prev = self._previous_copy(snap, have, by_key)
                if prev is not None:
                    hint = (prev[0].tree, prev[1].tree)
                try:
                    tree = copier.copy(snap.tree, hint)
                except IntegrityError as e:
                    res.failed[snap.id] = str(e)
                    self.events(Event("warning", f"snapshot {snap.id[:8]} not copied: {e}"))
                    continue
                session.flush()
                if self._arrived(snap, have, res):  # another copy committed it meanwhile
                    continue
                new = self._commit(snap, tree, have)
                have[snap.id] = have[_key(snap)] = new
                by_key.setdefault(_key(snap), snap)
                res.copied.append((snap.id, new.id))
                self.events(
                    Event(
                        "info",
                        f"snapshot {snap.id[:8]} copied as {new.id[:8]}",
                        {"source": snap.id, "snapshot": new.id, "skipped": False},
                    )
                )
                st = session.stats
                self.events(
                    Event(
                        "progress",
                        data={
                            "snapshots_done": n + 1,
                            "snapshots_total": len(todo),
                            "blobs_new": st.blobs_new,
                            "bytes_added": st.bytes_new_stored,
                            "bytes_uploaded": st.bytes_uploaded,
                        },
                    )
                )
        except BaseException:
            with contextlib.suppress(BaseException):
                session.flush()  # what was stored stays reusable
            raise
        finally:
            st = session.stats
            res.blobs_new = st.blobs_new
            res.data_added = st.bytes_new_raw
            res.data_added_stored = st.bytes_new_stored
            res.bytes_uploaded = st.bytes_uploaded
            res.packs_stored = st.packs_stored
        return res

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("interrupted: stopped cleanly, what was stored will be reused")

    def _arrived(self, snap: Snapshot, have: dict[str, Snapshot], res: CopyResult) -> bool:
        """Whether a copy of ``snap`` appeared in the target since it was listed (another copy
        into the same repository): then it is skipped, not copied twice. The snapshots stored
        since are read; the others were read already."""
        for sid in sorted(set(self.dst.list_ids("snapshots/")) - self.seen):
            self.seen.add(sid)
            try:
                s = self.dst.load_snapshot(sid)
            except SafeholdError:
                continue
            have.setdefault(s.id, s)
            if s.original is not None:
                have.setdefault(s.original.hex(), s)
        there = have.get(snap.id) or have.get(_key(snap))
        if there is None:
            return False
        res.skipped.append((snap.id, there.id))
        self.events(
            Event(
                "info",
                f"snapshot {snap.id[:8]} was copied meanwhile (as {there.id[:8]})",
                {"source": snap.id, "snapshot": there.id, "skipped": True},
            )
        )
        return True

    def _previous_copy(
        self, snap: Snapshot, have: dict[str, Snapshot], by_key: dict[str, Snapshot]
    ) -> tuple[Snapshot, Snapshot] | None:
        """The latest earlier (source, target copy) pair of the same host and paths."""
        if self.mode == BY_ID:
            return None
        best: tuple[Snapshot, Snapshot] | None = None
        for key, copy in have.items():
            if copy.original is None or key != copy.original.hex():
                continue
            orig = by_key.get(key)
            if orig is None or orig.host != snap.host or sorted(orig.paths) != sorted(snap.paths):
                continue
            if best is None or (orig.time_ns, orig.id) > (best[0].time_ns, best[0].id):
                best = (orig, copy)
        return best

    def _commit(self, snap: Snapshot, tree: bytes, have: dict[str, Snapshot]) -> Snapshot:
        parent = None
        if snap.parent is not None:
            p = have.get(snap.parent.hex())
            parent = bytes.fromhex(p.id) if p is not None else None
        new = Snapshot(
            time_ns=snap.time_ns,
            host=snap.host,
            user=snap.user,
            paths=list(snap.paths),
            tree=tree,
            tags=list(snap.tags),
            parent=parent,
            uid=snap.uid,
            gid=snap.gid,
            program=snap.program,
            summary=dict(snap.summary),
            original=bytes.fromhex(_key(snap)),
        )
        commit_snapshot(self.dst, new, self.lock)
        return new


# --- by id ---------------------------------------------------------------------------------------


class _ById:
    """Blob ids and tree bytes are the same in both repositories: copy the missing blobs."""

    def __init__(self, src: Repository, session: WriteSession, check_stop: Any) -> None:
        self.src = src
        self.session = session
        self.check_stop = check_stop
        self.compression = Compression.parse(session.repo.config.compression)
        self.done: set[bytes] = set()  # trees whose whole content is stored in this run
        self.batch: dict[bytes, list[PackEntry]] = {}
        self.queued: set[bytes] = set()
        self.batch_bytes = 0

    def copy(self, root: bytes, hint: tuple[bytes, bytes] | None = None) -> bytes:
        done = set(self.done)
        try:
            self._copy(root)
        except BaseException:
            # trees marked done may lack data that was still to be read: forget them all
            self.done = done
            self.batch, self.batch_bytes = {}, 0
            self.queued.clear()
            raise
        return root

    def _copy(self, root: bytes) -> None:
        # depth first, each distinct tree once; a tree is stored after everything below it
        stack: list[tuple[bytes, bytes | None]] = [(root, None)]
        open_trees: set[bytes] = set()  # expanded, not finished: the path from the root
        while stack:
            self.check_stop()
            tid, raw = stack.pop()
            if raw is not None:  # everything below is stored
                open_trees.discard(tid)
                self.session.add_blob(BlobType.TREE, raw, TREE_COMPRESSION, tid)
                self.done.add(tid)
                continue
            if tid in self.done:
                continue
            data = bytes(self.src.read_blob(tid))
            nodes = tree_from_bytes(data)
            open_trees.add(tid)
            stack.append((tid, data))
            for n in nodes:
                if n.content:
                    for b in n.content:
                        self.want(b)
                if n.subtree is not None and n.subtree not in self.done:
                    if n.subtree in open_trees:
                        raise IntegrityError(
                            f"tree {n.subtree.hex()[:16]} contains itself (forged or damaged)"
                        )
                    stack.append((n.subtree, None))
        self.flush_batch()

    def want(self, blob_id: bytes) -> None:
        if blob_id in self.queued or self.session.known(blob_id):
            return
        loc = self.src.index.lookup(blob_id)
        if loc is None:
            raise IntegrityError(f"blob {blob_id.hex()[:16]} is not in the source's index")
        self.queued.add(blob_id)
        self.batch.setdefault(loc.pack_id, []).append(loc.entry)
        self.batch_bytes += loc.entry.length
        if self.batch_bytes >= BATCH_BYTES:
            self.flush_batch()

    def flush_batch(self) -> None:
        batch, self.batch, self.batch_bytes = self.batch, {}, 0
        try:
            for pack_id, entries in batch.items():
                for e, got in self.src.read_pack_blobs(pack_id, entries, errors=True):
                    self.check_stop()
                    blob = self.src.read_blob(e.id) if isinstance(got, IntegrityError) else got
                    self.session.add_blob(BlobType(e.type), blob, self.compression, e.id)
        finally:
            for entries in batch.values():
                self.queued.difference_update(e.id for e in entries)


# --- rewriting trees -----------------------------------------------------------------------------

_Walk = Generator[Any, Any, bytes]


class _BlobStream:
    """A file's content read from the source blob by blob (one blob in memory at a time)."""

    def __init__(self, src: Repository, ids: list[bytes], check_stop: Any) -> None:
        self.src = src
        self.ids = ids
        self.check_stop = check_stop
        self.next = 0
        self.cur: memoryview = memoryview(b"")

    def readinto(self, buffer: memoryview, /) -> int:
        while not self.cur:
            if self.next >= len(self.ids):
                return 0
            self.check_stop()
            self.cur = memoryview(self.src.read_blob(self.ids[self.next]))
            self.next += 1
        n = min(len(buffer), len(self.cur))
        buffer[:n] = self.cur[:n]
        self.cur = self.cur[n:]
        return n


class _Rewriter:
    """Trees written anew with the target's blob ids (re-id: same cut points; re-chunk: the
    content cut again by the target's chunker)."""

    def __init__(
        self,
        src: Repository,
        dst: Repository,
        session: WriteSession,
        mode: str,
        check_stop: Any,
    ) -> None:
        self.src = src
        self.dst = dst
        self.session = session
        self.mode = mode
        self.check_stop = check_stop
        self.compression = Compression.parse(dst.config.compression)
        self.chunker = dst.chunker() if mode == RE_CHUNK else None
        self.small = dst.chunker_params.min
        self.memo: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self.files: collections.OrderedDict[tuple[bytes, ...], list[bytes]] = (
            collections.OrderedDict()
        )
        self.active: set[bytes] = set()

    def copy(self, root: bytes, hint: tuple[bytes, bytes] | None = None) -> bytes:
        return run_nested(self._tree(root, hint))

    def _remember(self, memo: collections.OrderedDict[Any, Any], key: Any, value: Any) -> None:
        memo[key] = value
        if len(memo) > MEMO_ENTRIES:
            memo.popitem(last=False)

    def _hint_nodes(
        self, hint: tuple[bytes, bytes] | None
    ) -> tuple[dict[bytes, Node], dict[bytes, Node]]:
        if hint is None:
            return {}, {}
        try:
            old_src = {n.name: n for n in self.src.read_tree(hint[0])}
            old_dst = {n.name: n for n in self.dst.read_tree(hint[1])}
        except SafeholdError:
            return {}, {}  # no parent then: everything is read
        return old_src, old_dst

    def _tree(self, src_id: bytes, hint: tuple[bytes, bytes] | None) -> _Walk:
        known = self.session.known
        got = self.memo.get(src_id)
        if got is not None and known(got):
            return got
        if hint is not None and hint[0] == src_id and known(hint[1]):
            return hint[1]  # unchanged since the previous copy (its content is stored)
        if src_id in self.active:
            raise IntegrityError(f"tree {src_id.hex()[:16]} contains itself (forged or damaged)")
        self.active.add(src_id)
        try:
            nodes = self.src.read_tree(src_id)
            old_src, old_dst = self._hint_nodes(hint)
            out: list[Node] = []
            for n in nodes:
                self.check_stop()
                new = dataclasses.replace(n)
                a, b = old_src.get(n.name), old_dst.get(n.name)
                if n.subtree is not None:
                    sub_hint = None
                    if a is not None and b is not None and a.subtree and b.subtree:
                        sub_hint = (a.subtree, b.subtree)
                    new.subtree = yield self._tree(n.subtree, sub_hint)
                if n.content is not None:
                    new.content = self._content(n, a, b)
                out.append(new)
            tid = self.session.add_blob(BlobType.TREE, tree_to_bytes(out), TREE_COMPRESSION)[0]
        finally:
            self.active.discard(src_id)
        self._remember(self.memo, src_id, tid)
        return tid

    def _content(self, n: Node, a: Node | None, b: Node | None) -> list[bytes]:
        ids = n.content or []
        if not ids:
            return []
        known = self.session.known
        if (
            a is not None
            and b is not None
            and a.content == ids
            and b.content is not None
            and b.size == n.size
            and all(known(c) for c in b.content)
        ):
            return list(b.content)  # the same file as at the previous copy
        key = tuple(ids)
        got = self.files.get(key)
        if got is not None and all(known(c) for c in got):
            return got
        out = self._re_id(ids) if self.chunker is None else self._re_chunk(ids)
        self._remember(self.files, key, out)
        return out

    def _re_id(self, ids: list[bytes]) -> list[bytes]:
        out = []
        for bid in ids:
            self.check_stop()
            data = self.src.read_blob(bid)
            out.append(self.session.add_blob(BlobType.DATA, data, self.compression)[0])
        return out

    def _re_chunk(self, ids: list[bytes]) -> list[bytes]:
        assert self.chunker is not None
        total = 0
        for bid in ids:
            loc = self.src.index.lookup(bid)
            if loc is None:
                raise IntegrityError(f"blob {bid.hex()[:16]} is not in the source's index")
            total += loc.entry.raw_length
        stream = _BlobStream(self.src, ids, self.check_stop)
        chunks: Any
        if total <= self.small:  # as backup stores a small file: one blob
            buf = bytearray(total + 1)
            view = memoryview(buf)
            got = 0
            while got < len(buf):
                n = stream.readinto(view[got:])
                if not n:
                    break
                got += n
            if got > total:
                raise IntegrityError("a file's content is longer than its blobs say")
            chunks = [view[:got]] if got else []
        else:
            chunks = self.chunker.chunks(stream)
        out = []
        for chunk in chunks:
            self.check_stop()
            out.append(self.session.add_blob(BlobType.DATA, chunk, self.compression)[0])
        return out
