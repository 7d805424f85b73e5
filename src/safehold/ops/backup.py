"""Backup: walk the source, chunk and store new data in parallel, then commit a snapshot.

The walk runs in the calling thread; files are read, chunked, hashed, compressed, encrypted and
packed by a pool of worker threads (the native libraries release the GIL), with a bound on the
files in flight so memory stays bounded whatever the data size. Directory trees are finalized in
post-order as their files complete. The snapshot object is stored last, after every pack and
index object it needs: an interrupted backup leaves no snapshot, and its stored packs are indexed
and reused by the next run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import getpass
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from safehold._version import __version__
from safehold.chunker import Chunker, Readable
from safehold.compress import Compression, CompressionRules
from safehold.errors import Interrupted, Locked, SafeholdError, SnapshotNotFound, UsageError
from safehold.events import Event, EventSink, ignore_events
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node, tree_to_bytes
from safehold.ids import BlobType, snapshot_name
from safehold.ops.dircache import DirCache, DirState, damage_digest, fingerprint
from safehold.ops.source import (
    CACHEDIR_TAG,
    ExcludeRules,
    list_dir,
    lstat,
    node_from_stat,
    open_file,
)
from safehold.repository.index import MasterIndex
from safehold.repository.locks import RepositoryLock
from safehold.repository.repo import Repository, filter_snapshots
from safehold.repository.writer import WriteSession

_O_NOATIME = getattr(os, "O_NOATIME", 0)
SCAN_THREADS = 4
SLOW_SCAN_S = 10e-6
"""Listing a directory slower than this per entry means its metadata came from the disk."""
REREAD_CTIME = 0
"""The ctime recorded for a file that changed while it was read (no file has it): the next
backup never takes the file as unmodified, whatever its timestamps say then."""
RACY_NS = 3_000_000_000
"""On a file system with whole-second timestamps, a file whose mtime or ctime is this close to
the end of its read is read again by the next backup (FAT's mtime ticks every 2 s)."""


@dataclass
class BackupOptions:
    """Everything a backup can be told; the CLI and the library share this type."""

    paths: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    exclude_files: list[str] = field(default_factory=list)
    exclude_caches: bool = False
    exclude_if_present: list[str] = field(default_factory=list)
    exclude_larger_than: int | None = None
    one_file_system: bool = False
    tags: list[str] = field(default_factory=list)
    host: str | None = None
    parent: str | None = None
    dry_run: bool = False
    compression: str | None = None  # default: the repository's setting
    compression_for: list[str] = field(default_factory=list)
    stdin_filename: str | None = None  # back up the ``stdin`` stream under this name
    workers: int = 4  # 0: everything in the calling thread (deterministic; for simulation)
    index_flush_packs: int = 4
    index_flush_seconds: float = 10.0


@dataclass
class BackupResult:
    snapshot: Snapshot | None
    summary: dict[str, Any]
    warnings: list[str]


@dataclass
class _Counters:
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    files_failed: int = 0
    dirs: int = 0
    dirs_unchanged: int = 0  # reused from the directory cache
    others: int = 0
    files_done: int = 0
    bytes_done: int = 0
    bytes_read: int = 0
    total_files: int | None = None
    total_bytes: int | None = None


_Listing = list[tuple[bytes, os.stat_result | None, OSError | None]] | OSError


@dataclass
class _DirJob:
    node: Node | None
    items: list[tuple[Node, Future[list[bytes] | None] | None, _DirJob | None]] = field(
        default_factory=list
    )
    tree_id: bytes | None = None
    path: bytes = b""
    fingerprint: bytes | None = None
    cached: DirState | None = None  # set when the directory is unchanged since the cached run
    fast_children: list[tuple[bytes, _DirJob]] = field(default_factory=list)
    failed: bool = False  # something in it could not be read: do not cache its tree


_Walk = Generator[Any, Any, _DirJob]
"""A directory walk: it yields the walks of its subdirectories to :func:`_run` instead of
calling them, and is sent their results; it returns its own job."""


def _run(walk: _Walk) -> _DirJob:
    """Run a walk with an explicit stack of walks: a tree's depth costs heap, never Python's
    recursion limit (each walk resumes the one that yielded it, exactly as a call would)."""
    stack = [walk]
    value: Any = None
    error: BaseException | None = None
    while True:
        top = stack[-1]
        try:
            sub = top.send(value) if error is None else top.throw(error)
        except StopIteration as done:
            stack.pop()
            if not stack:
                job: _DirJob = done.value
                return job
            value, error = done.value, None
            continue
        except BaseException as e:
            stack.pop()
            if not stack:
                raise
            value, error = None, e
            continue
        stack.append(sub)
        value, error = None, None


@dataclass(slots=True)
class _Link:
    """What the first name seen of a hardlinked inode looked like: other names are taken for the
    same file only if they agree (an inode number reused between two lstat calls, or a file
    system with unstable inode numbers, must never make two files one)."""

    ident: tuple[int, int, int]  # size, mtime, ctime
    content: list[bytes] | None = None


def _coarse(node: Node) -> bool:
    """Whether the file's timestamps look whole-second (a file system without finer ones)."""
    return node.mtime_ns % 1_000_000_000 == 0 and node.ctime_ns % 1_000_000_000 == 0


def _ident(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


class _Archiver:
    def __init__(
        self,
        repo: Repository,
        opts: BackupOptions,
        session: WriteSession,
        events: EventSink,
        stop: threading.Event,
    ) -> None:
        self.repo = repo
        self.opts = opts
        self.session = session
        self.events = events
        self.stop = stop
        self.rules = ExcludeRules.build(
            opts.excludes,
            opts.exclude_files,
            caches=opts.exclude_caches,
            if_present=opts.exclude_if_present,
            larger_than=opts.exclude_larger_than,
            one_file_system=opts.one_file_system,
        )
        self.compression = CompressionRules.parse(
            opts.compression or repo.config.compression, opts.compression_for
        )
        self.tree_compression = Compression("zstd", 3)
        self.counters = _Counters()
        self.warnings: list[str] = []
        self._warn_lock = threading.Lock()
        self._local = threading.local()
        self.workers = max(1, opts.workers)
        self.pool: Any = (
            ThreadPoolExecutor(self.workers, thread_name_prefix="safehold-backup")
            if opts.workers > 0
            else InlineExecutor()
        )
        self.in_flight = threading.BoundedSemaphore(self.workers * 4)
        self.pending: collections.deque[_DirJob] = collections.deque()
        self.scan_pool: Any = (
            ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="safehold-scan")
            if opts.workers > 0
            else InlineExecutor()
        )
        self.prefetched: dict[bytes, Future[tuple[_Listing, float]]] = {}
        self.fatal: BaseException | None = None
        self.small = repo.chunker_params.min
        self.links: dict[tuple[int, int], _Link] = {}  # (dev, ino) -> the first name's identity
        index = session.index
        self.unusable = _unusable_blobs(index)
        self.dircache = DirCache(
            repo.cache,
            index.state.index_ids - index.state.claimed,
            damage=damage_digest(self.unusable),
        )

    # --- reporting --------------------------------------------------------------------------

    def warn(self, message: str) -> None:
        with self._warn_lock:
            self.warnings.append(message)
        self.events(Event("warning", message))

    def check_stop(self) -> None:
        if self.fatal is not None:
            raise self.fatal
        if self.stop.is_set():
            raise Interrupted("interrupted: stopped cleanly, what was stored will be reused")

    # --- files ------------------------------------------------------------------------------

    def _chunker(self) -> Chunker:
        c: Chunker | None = getattr(self._local, "chunker", None)
        if c is None:
            c = self._local.chunker = self.repo.chunker()
        return c

    def _store_chunks(self, chunks: Any, setting: Compression) -> tuple[list[bytes], int]:
        content: list[bytes] = []
        total = 0
        session = self.session
        for chunk in chunks:
            if self.stop.is_set() or self.fatal is not None:
                raise Interrupted("interrupted")
            bid = session.blob_id(chunk)
            if not self.opts.dry_run:
                session.add_blob(BlobType.DATA, chunk, setting, bid)
            elif not session.known(bid):
                session.stats.bytes_new_raw += len(chunk)
            content.append(bid)
            total += len(chunk)
            with self._warn_lock:
                self.counters.bytes_done += len(chunk)
                self.counters.bytes_read += len(chunk)
        return content, total

    def save_file(self, path: bytes, node: Node) -> list[bytes] | None:
        try:
            return self._save_file(path, node)
        except OSError as e:
            if isinstance(e, FileNotFoundError):
                self.warn(f"{os.fsdecode(path)} vanished while backing up")
            else:
                self.warn(f"cannot read {os.fsdecode(path)}: {e.strerror or e}")
            with self._warn_lock:
                self.counters.files_failed += 1
            return None
        except Interrupted:
            return None
        except BaseException as e:
            self.fatal = e
            raise
        finally:
            self.in_flight.release()
            with self._warn_lock:
                self.counters.files_done += 1

    def _save_file(self, path: bytes, node: Node) -> list[bytes] | None:
        flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = open_file(path, flags | _O_NOATIME)
        except PermissionError:
            fd = open_file(path, flags)
        with os.fdopen(fd, "rb", buffering=0) as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                self.warn(f"{os.fsdecode(path)} changed type while backing up; skipped")
                return None
            setting = self.compression.for_path(os.fsdecode(path))
            if st.st_size <= self.small:
                data = f.read()
                chunks: Any = [data] if data else []
            else:
                chunks = self._chunker().chunks(f)
            content, total = self._store_chunks(chunks, setting)
            st2 = os.fstat(fd)
        if (
            total != node.size
            or st2.st_size != total
            or st2.st_mtime_ns != node.mtime_ns
            or st2.st_ctime_ns != node.ctime_ns
        ):
            # what was read may mix old and new content (a torn read): keep the metadata seen
            # before reading, and mark the node so that the next backup reads the file again
            # whatever the file's timestamps say then
            self.warn(
                f"{os.fsdecode(path)} changed while it was read; saved as read, "
                "the next backup reads it again"
            )
            node.size = total
            node.ctime_ns = REREAD_CTIME
        elif _coarse(node) and max(node.mtime_ns, node.ctime_ns) >= time.time_ns() - RACY_NS:
            # on a file system with whole-second timestamps (FAT, ext4 with small inodes, some
            # network file systems), a change in the same second as this read would leave size
            # and times as they are: read it again next time (git's "racily clean" rule)
            node.ctime_ns = REREAD_CTIME
        return content

    # --- directories ------------------------------------------------------------------------

    def parent_nodes(self, tree_id: bytes | None) -> dict[bytes, Node] | None:
        if tree_id is None:
            return None
        if not self.repo.index.usable(tree_id):
            return None  # known damaged or lost: this part is read afresh (nothing is missed)
        try:
            return {n.name: n for n in self.repo.read_tree(tree_id)}
        except SafeholdError as e:
            # damage in the repository (recorded now), not in this backup: its files are read
            # again and saved whole, so it is said, but it is no warning about this snapshot
            self.events(Event("info", f"parent snapshot tree unreadable, reading files again: {e}"))
            return None

    def unchanged(self, prev: Node | None, node: Node) -> bool:
        if prev is None or prev.type != "file" or prev.content is None:
            return False
        if prev.ctime_ns == REREAD_CTIME:
            return False  # it changed while it was read last time
        if (prev.size, prev.mtime_ns, prev.ctime_ns, prev.ino) != (
            node.size,
            node.mtime_ns,
            node.ctime_ns,
            node.ino,
        ):
            return False
        # a blob whose every copy is known damaged is not "in" the index: read the file again
        index = self.session.index
        return all(c in index for c in prev.content)

    def tree_reusable(self, tree_id: bytes) -> bool:
        """Whether a cached tree may be reused as it is: it is in the index, and none of its
        files refers to a blob known damaged (its subdirectories are checked on their own). The
        tree is read only when the known damage changed since the cache was saved."""
        if tree_id not in self.session.index:
            return False
        bad = self.unusable
        if not bad or self.dircache.verified:
            return True
        try:
            nodes = self.repo.read_tree(tree_id)
        except SafeholdError:
            return False
        return not any(c in bad for n in nodes if n.content for c in n.content)

    def links_agree(self, entries: list[tuple[bytes, os.stat_result]]) -> bool:
        """Whether every hardlinked file among ``entries`` agrees with its inode's first name."""
        for _, st in entries:
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                link = self.links.get((st.st_dev, st.st_ino))
                if link is not None and link.ident != _ident(st):
                    return False
        return True

    def link_metadata(self, node: Node, st: os.stat_result) -> None:
        """Register a hardlinked file's inode, or take it apart from a different file seen first
        under the same (dev, ino): then it is stored as a file of its own."""
        key = (node.dev, node.ino)
        link = self.links.get(key)
        if link is None:
            self.links[key] = _Link(_ident(st))
        elif link.ident != _ident(st):
            node.nlink = 1

    def link_content(self, node: Node) -> None:
        """A hardlinked file's content must be that of every other name of its inode."""
        link = self.links.get((node.dev, node.ino))
        if link is None or node.content is None:
            return
        if link.content is None:
            link.content = node.content
        elif link.content != node.content:
            node.nlink = 1

    def add_entry(
        self,
        job: _DirJob,
        path: bytes,
        name: bytes,
        st: os.stat_result,
        parent: dict[bytes, Node] | None,
        root_dev: int,
        node: Node | None = None,
    ) -> Generator[Any, Any, None]:
        if node is None:
            if self.excluded(path, st):
                return
            try:
                node = node_from_stat(name, st, path)
            except OSError as e:
                self.warn(f"cannot read {os.fsdecode(path)}: {e.strerror or e}")
                job.failed = True
                return
        prev = parent.get(name) if parent else None
        if node.type == "dir":
            self.counters.dirs += 1
            sub = yield from self.walk_subdir(
                path, node, prev.subtree if prev and prev.type == "dir" else None, st, root_dev
            )
            job.items.append((node, None, sub))
        elif node.type == "file":
            if node.nlink > 1:
                self.link_metadata(node, st)
            if self.unchanged(prev, node):
                assert prev is not None
                node.content = prev.content
                self.counters.files_unmodified += 1
                self.counters.files_done += 1
                self.counters.bytes_done += node.size
                job.items.append((node, None, None))
            else:
                if prev is None:
                    self.counters.files_new += 1
                else:
                    self.counters.files_changed += 1
                self.in_flight.acquire()
                self.check_stop()
                fut = self.pool.submit(self.save_file, path, node)
                job.items.append((node, fut, None))
        else:
            self.counters.others += 1
            job.items.append((node, None, None))

    def excluded(self, path: bytes, st: os.stat_result) -> bool:
        if self.rules.excludes_path(path, stat.S_ISDIR(st.st_mode)):
            return True
        return (
            stat.S_ISREG(st.st_mode)
            and self.rules.larger_than is not None
            and st.st_size > self.rules.larger_than
        )

    def scan_dir(self, path: bytes) -> _Listing:
        """A directory's entries with their lstat, sorted by name, excludes applied."""
        only = None
        if self.rules.excludes_dir_contents(path):
            only = {CACHEDIR_TAG.encode()} if self.rules.caches else set()
        try:
            listing = list_dir(path, only)
        except OSError as e:
            return e
        base = path if path.endswith(b"/") else path + b"/"
        out: list[tuple[bytes, os.stat_result | None, OSError | None]] = []
        for name, st in listing:
            if isinstance(st, OSError):
                out.append((name, None, st))
            elif not self.excluded(base + name, st):
                out.append((name, st, None))
        return out

    def timed_scan(self, path: bytes) -> tuple[_Listing, float]:
        t0 = time.perf_counter()
        listing = self.scan_dir(path)
        return listing, time.perf_counter() - t0

    def walk_subdir(
        self,
        path: bytes,
        node: Node | None,
        parent_tree: bytes | None,
        st: os.stat_result,
        root_dev: int,
    ) -> _Walk:
        self.counters.dirs += 1
        if self.rules.one_file_system and st.st_dev != root_dev:
            sub = _DirJob(node)  # a mount point: kept, its contents are not
            self.pending.append(sub)
            return sub
        job: _DirJob = yield self.walk_dir(path, node, parent_tree, root_dev)
        return job

    def walk_dir(
        self, path: bytes, node: Node | None, parent_tree: bytes | None, root_dev: int
    ) -> _Walk:
        self.check_stop()
        fut = self.prefetched.pop(path, None)
        listing, took = fut.result() if fut is not None else self.timed_scan(path)
        job = _DirJob(node, path=path)
        # when reading directories has to wait for the disk (a cold cache), list the
        # subdirectories ahead in threads so that several reads are in flight; when it does not,
        # prefetching only costs GIL hand-offs
        if (
            not isinstance(listing, OSError)
            and took > SLOW_SCAN_S * (len(listing) + 1)
            and len(self.prefetched) < 4096
        ):
            pbase = path if path.endswith(b"/") else path + b"/"
            for name, st, _ in listing:
                if st is not None and stat.S_ISDIR(st.st_mode):
                    self.prefetched[pbase + name] = self.scan_pool.submit(
                        self.timed_scan, pbase + name
                    )
        if isinstance(listing, OSError):
            self.warn(f"cannot read directory {os.fsdecode(path)}: {listing.strerror or listing}")
            job.failed = True
            listing = []
        base = path if path.endswith(b"/") else path + b"/"
        ok = [(name, st) for name, st, err in listing if st is not None and err is None]
        if len(ok) == len(listing):
            job.fingerprint = fingerprint(ok)
            cached = self.dircache.get(path)
            if (
                cached is not None
                and cached.fingerprint == job.fingerprint
                and self.links_agree(ok)
                and self.tree_reusable(cached.tree)
            ):
                return (yield from self.walk_unchanged(job, cached, ok, base, root_dev))
        parent = self.parent_nodes(parent_tree)
        for name, st, err in listing:
            self.check_stop()
            child = base + name
            if isinstance(err, FileNotFoundError):
                self.warn(f"{os.fsdecode(child)} vanished while backing up")
            elif err is not None:
                self.warn(f"cannot read {os.fsdecode(child)}: {err.strerror or err}")
                job.failed = True
            else:
                assert st is not None
                yield from self.add_entry(job, child, name, st, parent, root_dev)
        self.pending.append(job)
        self.drain(block=False)
        return job

    def walk_unchanged(
        self,
        job: _DirJob,
        cached: DirState,
        entries: list[tuple[bytes, os.stat_result]],
        base: bytes,
        root_dev: int,
    ) -> _Walk:
        """A directory whose entries are as in the cached run: only its subdirectories are
        walked; its files are neither read nor compared one by one."""
        job.cached = cached
        c = self.counters
        c.dirs_unchanged += 1
        for name, st in entries:
            if stat.S_ISDIR(st.st_mode):
                sub = yield from self.walk_subdir(
                    base + name, None, cached.children.get(name), st, root_dev
                )
                job.fast_children.append((name, sub))
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    self.links.setdefault((st.st_dev, st.st_ino), _Link(_ident(st)))
                c.files_unmodified += 1
                c.files_done += 1
                c.bytes_done += st.st_size
            else:
                c.others += 1
        self.pending.append(job)
        self.drain(block=False)
        return job

    def drain(self, *, block: bool) -> None:
        while self.pending:
            job = self.pending[0]
            if not block and not all(f is None or f.done() for _, f, _ in job.items):
                return
            self.pending.popleft()
            self.finalize(job)
            job.items = []  # the parent needs only the tree id: free the nodes now
            job.fast_children = []

    def finalize(self, job: _DirJob) -> None:
        if job.cached is not None:
            self.finalize_unchanged(job, job.cached)
            return
        nodes = []
        for node, fut, sub in job.items:
            if fut is not None:
                content = fut.result()
                self.check_stop()
                if content is None:
                    job.failed = True
                    continue
                node.content = content
                if node.ctime_ns == REREAD_CTIME:
                    job.failed = True  # read again next time: the directory is not cached
            if node.type == "file" and node.nlink > 1:
                self.link_content(node)
            if sub is not None:
                if sub.tree_id is None:
                    raise AssertionError("a subdirectory was not finalized before its parent")
                node.subtree = sub.tree_id
            nodes.append(node)
        job.tree_id = self.store_tree(nodes)
        if job.fingerprint is not None and not job.failed:
            children = {n.name: n.subtree for n in nodes if n.subtree is not None}
            self.dircache.put(job.path, DirState(job.fingerprint, job.tree_id, children))

    def finalize_unchanged(self, job: _DirJob, cached: DirState) -> None:
        children = {}
        for name, sub in job.fast_children:
            assert sub.tree_id is not None, "a subdirectory was not finalized before its parent"
            children[name] = sub.tree_id
        if children == cached.children:
            job.tree_id = cached.tree
        else:  # something deeper changed: the old tree with the new subtree ids
            nodes = []
            for n in self.repo.read_tree(cached.tree):
                if n.type == "dir" and n.name in children:
                    n = dataclasses.replace(n, subtree=children[n.name])
                nodes.append(n)
            job.tree_id = self.store_tree(nodes)
        self.dircache.put(job.path, DirState(cached.fingerprint, job.tree_id, children))

    def store_tree(self, nodes: list[Node]) -> bytes:
        data = tree_to_bytes(nodes)
        if self.opts.dry_run:
            return self.session.blob_id(data)
        return self.session.add_blob(BlobType.TREE, data, self.tree_compression)[0]

    # --- the virtual root -------------------------------------------------------------------

    def backup_paths(self, paths: list[bytes], parent_tree: bytes | None) -> bytes:
        root: dict[bytes, Any] = {}
        for p in paths:
            parts = [x for x in p.split(b"/") if x]
            if not parts:
                raise UsageError("backing up / itself is not supported; name its folders instead")
            cur = root
            for i, part in enumerate(parts):
                if i == len(parts) - 1:
                    cur[part] = p
                else:
                    nxt = cur.setdefault(part, {})
                    if not isinstance(nxt, dict):
                        break  # an ancestor is backed up whole already
                    cur = nxt
        job = _run(self.walk_virtual(b"", root, self.parent_nodes(parent_tree)))
        self.drain(block=True)
        assert job.tree_id is not None
        return job.tree_id

    def walk_virtual(
        self, path: bytes, children: dict[bytes, Any], parent: dict[bytes, Node] | None
    ) -> _Walk:
        job = _DirJob(None)
        for name in sorted(children):
            child = children[name]
            cpath = path + b"/" + name
            try:
                st = lstat(cpath)
            except OSError as e:
                self.warn(f"cannot back up {os.fsdecode(cpath)}: {e.strerror or e}")
                continue
            if isinstance(child, dict):
                node = node_from_stat(name, st, cpath)
                prev = parent.get(name) if parent else None
                sub_parent = self.parent_nodes(prev.subtree if prev and prev.subtree else None)
                sub = yield self.walk_virtual(cpath, child, sub_parent)
                job.items.append((node, None, sub))
            else:
                yield from self.add_entry(job, cpath, name, st, parent, st.st_dev)
        self.pending.append(job)
        return job

    def backup_stdin(self, stream: Readable, name: str) -> bytes:
        now = time.time_ns()
        content, total = self._store_chunks(
            self._chunker().chunks(stream), self.compression.for_path(name)
        )
        node = Node(
            name=os.fsencode(name),
            type="file",
            mode=stat.S_IFREG | 0o644,
            uid=os.getuid(),
            gid=os.getgid(),
            mtime_ns=now,
            ctime_ns=now,
            atime_ns=now,
            size=total,
            content=content,
        )
        self.counters.files_new = 1
        self.counters.files_done = 1
        data = tree_to_bytes([node])
        if self.opts.dry_run:
            return self.session.blob_id(data)
        return self.session.add_blob(BlobType.TREE, data, self.tree_compression)[0]

    def scan_totals(self, paths: list[bytes]) -> None:
        """Count files and bytes ahead of the backup, for the ETA (best effort)."""
        files = size = 0
        stack = list(paths)
        while stack and not self.stop.is_set():
            p = stack.pop()
            try:
                st = os.lstat(p)
                if stat.S_ISDIR(st.st_mode):
                    with os.scandir(p) as it:
                        for e in it:
                            if e.is_dir(follow_symlinks=False):
                                stack.append(e.path)
                            elif e.is_file(follow_symlinks=False):
                                files += 1
                                size += e.stat(follow_symlinks=False).st_size
                elif stat.S_ISREG(st.st_mode):
                    files += 1
                    size += st.st_size
            except OSError:
                continue
        self.counters.total_files, self.counters.total_bytes = files, size


def _unusable_blobs(index: MasterIndex) -> set[bytes]:
    """Blobs whose known copies are all damaged (``in`` says no: a writer stores them again)."""
    return {b for _, b in index.damaged() if b not in index}


def _withdraw(repo: Repository, snap: Snapshot) -> None:
    try:
        repo.backend.delete(snapshot_name(snap.id))
    except SafeholdError as e:
        raise Locked(
            f"lost the repository lock while storing snapshot {snap.id[:8]}, and could not "
            f"withdraw it ({e}): run 'safehold check' before relying on it"
        ) from None
    raise Locked(
        f"lost the repository lock while storing snapshot {snap.id[:8]}; it was withdrawn, and "
        "what was stored is reused by the next run"
    )


def _choose_parent(
    repo: Repository, opts: BackupOptions, host: str, paths: list[str]
) -> Snapshot | None:
    snaps = repo.snapshots()
    if opts.parent:
        return repo.find_snapshot(opts.parent, snapshots=snaps)
    same = [s for s in filter_snapshots(snaps, host=host) if sorted(s.paths) == sorted(paths)]
    return same[-1] if same else None


class InlineExecutor:
    """An executor that runs each task at once in the calling thread."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


def backup(
    repo: Repository,
    opts: BackupOptions,
    *,
    events: EventSink = ignore_events,
    stdin: Readable | None = None,
    stop: threading.Event | None = None,
    progress_interval: float = 0.5,
    estimate_totals: bool = False,
    lock: RepositoryLock | None = None,
) -> BackupResult:
    """Back up ``opts.paths`` (or ``stdin`` as ``opts.stdin_filename``) into a new snapshot.

    The backup holds a shared repository lock (it takes one unless ``lock``, a lock the caller
    holds, is given) and reads the index only once the lock is stored, so that prune can see it
    and wait for it. It commits only while the lock's lease is provably valid; if the lease
    lapsed while the snapshot was being stored, the snapshot is withdrawn again (Locked).
    """
    if opts.dry_run:
        return _backup(repo, opts, events, stdin, stop, progress_interval, estimate_totals, None)
    held = repo.lock() if lock is None else lock
    try:
        return _backup(repo, opts, events, stdin, stop, progress_interval, estimate_totals, held)
    finally:
        if lock is None:
            held.release()


def _backup(
    repo: Repository,
    opts: BackupOptions,
    events: EventSink,
    stdin: Readable | None,
    stop: threading.Event | None,
    progress_interval: float,
    estimate_totals: bool,
    lock: RepositoryLock | None,
) -> BackupResult:
    started = time.time()
    stop = stop or threading.Event()
    if opts.stdin_filename is not None:
        if stdin is None:
            raise UsageError("--stdin needs a stream to read")
        if not opts.stdin_filename or "/" in opts.stdin_filename:
            raise UsageError("--stdin-filename must be a plain file name")
        paths = ["/" + opts.stdin_filename]
    else:
        if not opts.paths:
            raise UsageError("nothing to back up: name at least one path")
        paths = []
        for p in opts.paths:
            ap = os.path.normpath(os.path.abspath(p))
            if not os.path.lexists(ap):
                raise UsageError(f"{p}: no such file or directory")
            paths.append(ap)
    host = opts.host or socket.gethostname()
    try:
        parent = _choose_parent(repo, opts, host, paths)
    except SnapshotNotFound as e:
        raise UsageError(f"--parent: {e}") from None
    if lock is not None:
        # the index as it is now that prune can see this lock; loaded after the snapshots were
        # listed, so it holds every blob of the parent (index objects precede their snapshot)
        repo.reload_index()
    session = repo.write_session(
        index_flush_packs=opts.index_flush_packs, index_flush_seconds=opts.index_flush_seconds
    )
    arch = _Archiver(repo, opts, session, events, stop)
    done = threading.Event()

    def report() -> None:
        while not done.wait(progress_interval):
            c = arch.counters
            events(
                Event(
                    "progress",
                    data={
                        "files_done": c.files_done,
                        "bytes_done": c.bytes_done,
                        "total_files": c.total_files,
                        "total_bytes": c.total_bytes,
                        "bytes_added": session.stats.bytes_new_stored,
                        "elapsed": time.time() - started,
                    },
                )
            )

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    bpaths = [os.fsencode(p) for p in paths]
    if opts.stdin_filename is None and estimate_totals:
        threading.Thread(target=arch.scan_totals, args=(bpaths,), daemon=True).start()
    try:
        if opts.stdin_filename is not None:
            assert stdin is not None
            tree = arch.backup_stdin(stdin, opts.stdin_filename)
        else:
            tree = arch.backup_paths(bpaths, parent.tree if parent else None)
        arch.pool.shutdown(wait=True)
        arch.scan_pool.shutdown(wait=True)
        arch.check_stop()
        if not opts.dry_run:
            session.flush()
            if opts.stdin_filename is None:
                arch.dircache.save(bpaths)
    except BaseException:
        stop.set()
        arch.pool.shutdown(wait=True, cancel_futures=True)
        arch.scan_pool.shutdown(wait=True, cancel_futures=True)
        if not opts.dry_run:
            with contextlib.suppress(BaseException):
                session.flush()  # what was stored stays reusable
        raise
    finally:
        done.set()
        reporter.join()
    c = arch.counters
    st = session.stats
    summary: dict[str, Any] = {
        "files_new": c.files_new,
        "files_changed": c.files_changed,
        "files_unmodified": c.files_unmodified,
        "files_failed": c.files_failed,
        "dirs": c.dirs,
        "dirs_unchanged": c.dirs_unchanged,
        "other_entries": c.others,
        "bytes_processed": c.bytes_done,
        "bytes_read": c.bytes_read,
        "blobs_new": st.blobs_new,
        "data_added": st.bytes_new_raw,
        "data_added_stored": st.bytes_new_stored,
        "bytes_uploaded": st.bytes_uploaded,
        "packs_stored": st.packs_stored,
        "duration_s": round(time.time() - started, 3),
        "dry_run": opts.dry_run,
        "warnings": len(arch.warnings),
    }
    snap = None
    if not opts.dry_run:
        try:
            user = getpass.getuser()
        except Exception:
            user = str(os.getuid())
        snap = Snapshot(
            time_ns=int(started * 1e9),
            host=host,
            user=user,
            paths=paths,
            tree=tree,
            tags=sorted(set(opts.tags)),
            parent=bytes.fromhex(parent.id) if parent else None,
            uid=os.getuid(),
            gid=os.getgid(),
            program=f"safehold {__version__}",
            summary=summary,
        )
        if lock is not None:
            lock.check()  # refuse to commit without a valid lease
        repo.save_snapshot(snap)
        if lock is not None and not lock.held_until_now():
            # the lease may have lapsed while the snapshot was stored: prune may have stopped
            # waiting for this backup, so the snapshot must not stay
            _withdraw(repo, snap)
        summary["snapshot"] = snap.id
    summary["parent"] = parent.id if parent else None
    return BackupResult(snap, summary, arch.warnings)
