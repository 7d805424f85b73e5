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
import signal
import socket
import stat
import subprocess
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
from safehold.ops.walk import run_nested
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
STDERR_KEEP = 64 * 1024
"""How much of a source command's standard error is kept (its end)."""
KILL_AFTER_S = 3.0
"""A source command still running this long after SIGTERM is sent SIGKILL."""


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
    # back up this shell command's standard output as ``stdin_filename`` (default "stdin"); the
    # backup fails, storing no snapshot, when the command fails
    stdin_command: str | None = None
    # files and symlinks matching these patterns (gitignore style, as excludes) that are in the
    # parent snapshot but no longer in the source (and not excluded) are carried forward
    keep_deleted: list[str] = field(default_factory=list)
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
    files_carried: int = 0  # carried forward from the parent (keep_deleted)
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
    carried: bool = False  # it holds entries carried from the parent: do not cache its tree


_Walk = Generator[Any, Any, _DirJob]
"""A directory walk: it yields the walks of its subdirectories to :func:`_run` instead of
calling them, and is sent their results; it returns its own job."""


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
        self.keep: ExcludeRules | None = None
        if opts.keep_deleted:
            try:
                self.keep = ExcludeRules(patterns=list(opts.keep_deleted))
            except Exception as e:  # pathspec's own errors
                raise UsageError(f"invalid --keep-deleted pattern: {e}") from None
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
        keep: dict[bytes, Node] | None = None,
    ) -> Generator[Any, Any, None]:
        """``keep``: the parent snapshot's entries of this directory, when keep_deleted patterns
        are given (``parent`` may instead come from the directory cache)."""
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
            kprev = keep.get(name) if keep else None
            sub = yield from self.walk_subdir(
                path,
                node,
                prev.subtree if prev and prev.type == "dir" else None,
                st,
                root_dev,
                kprev.subtree if kprev and kprev.type == "dir" else None,
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
        keep_tree: bytes | None = None,
    ) -> _Walk:
        self.counters.dirs += 1
        if self.rules.one_file_system and st.st_dev != root_dev:
            sub = _DirJob(node)  # a mount point: kept, its contents are not
            self.pending.append(sub)
            return sub
        job: _DirJob = yield self.walk_dir(path, node, parent_tree, root_dev, keep_tree)
        return job

    def walk_dir(
        self,
        path: bytes,
        node: Node | None,
        parent_tree: bytes | None,
        root_dev: int,
        keep_tree: bytes | None = None,
    ) -> _Walk:
        """``parent_tree``: this directory's tree to compare files with (from the parent
        snapshot, or from the directory cache below a directory reused from it);
        ``keep_tree``: its tree in the parent snapshot, where entries are carried from (only
        with keep_deleted patterns)."""
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
        unlisted = isinstance(listing, OSError)
        if isinstance(listing, OSError):
            self.warn(f"cannot read directory {os.fsdecode(path)}: {listing.strerror or listing}")
            job.failed = True
            listing = []
        base = path if path.endswith(b"/") else path + b"/"
        ok = [(name, st) for name, st, err in listing if st is not None and err is None]
        if len(ok) == len(listing):
            job.fingerprint = fingerprint(ok)
            cached = self.dircache.get(path)
            # with keep_deleted, a cached tree is reused only when it is the parent snapshot's
            # tree of this directory (then every entry of the parent is here still: a cached
            # tree never holds carried entries) or when the parent has no such directory
            if (
                cached is not None
                and cached.fingerprint == job.fingerprint
                and (self.keep is None or keep_tree is None or keep_tree == cached.tree)
                and self.links_agree(ok)
                and self.tree_reusable(cached.tree)
            ):
                return (yield from self.walk_unchanged(job, cached, ok, base, root_dev, keep_tree))
        parent = self.parent_nodes(parent_tree)
        keep: dict[bytes, Node] | None = None
        if self.keep is not None and keep_tree is not None:
            keep = parent if keep_tree == parent_tree else self.parent_nodes(keep_tree)
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
                yield from self.add_entry(job, child, name, st, parent, root_dev, keep=keep)
        if keep and not unlisted:  # what could not be listed is not known to be deleted
            self.carry_missing(job, path, {name for name, _, _ in listing}, keep)
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
        keep_tree: bytes | None = None,
    ) -> _Walk:
        """A directory whose entries are as in the cached run: only its subdirectories are
        walked; its files are neither read nor compared one by one."""
        job.cached = cached
        c = self.counters
        c.dirs_unchanged += 1
        for name, st in entries:
            if stat.S_ISDIR(st.st_mode):
                child_tree = cached.children.get(name)
                sub = yield from self.walk_subdir(
                    base + name,
                    None,
                    child_tree,
                    st,
                    root_dev,
                    # the parent's tree is this cached one (or there is none)
                    child_tree if keep_tree is not None else None,
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

    # --- keep_deleted ------------------------------------------------------------------------

    def carry_missing(
        self, job: _DirJob, path: bytes, present: set[bytes], keep: dict[bytes, Node]
    ) -> None:
        """Carry the parent's entries that are gone from the directory ``path`` (not those left
        out by the excludes: an excluded file is not a deleted one)."""
        missing = [n for name, n in keep.items() if name not in present]
        if not missing or self.rules.excludes_dir_contents(path):
            return
        base = path if path.endswith(b"/") else path + b"/"
        for prev in sorted(missing, key=lambda n: n.name):
            self.check_stop()
            cpath = base + prev.name
            if prev.type == "dir":
                if prev.subtree is None or self.rules.excludes_path(cpath, True):
                    continue
                tree = self.carry_dir(cpath, prev.subtree)
                if tree is not None:
                    job.items.append((dataclasses.replace(prev, subtree=tree), None, None))
                    job.carried = True
            else:
                node = self.carry_leaf(cpath, prev)
                if node is not None:
                    job.items.append((node, None, None))
                    job.carried = True

    def carry_leaf(self, path: bytes, prev: Node) -> Node | None:
        """The node to carry for a vanished file or symlink of the parent, or None."""
        keep = self.keep
        if keep is None or prev.type not in ("file", "symlink"):
            return None
        if not keep.excludes_path(path, False) or self.rules.excludes_path(path, False):
            return None
        if prev.type == "file":
            if prev.content is None:
                return None
            limit = self.rules.larger_than
            if limit is not None and prev.size > limit:
                return None  # excluded now
            index = self.session.index
            if not all(c in index for c in prev.content):
                self.warn(
                    f"cannot carry {os.fsdecode(path)} forward: its data is damaged or missing "
                    "in the repository"
                )
                return None
        self.counters.files_carried += 1
        # nlink 1: its inode number may belong to another file by now, and a restore must not
        # make the two one
        return dataclasses.replace(prev, nlink=1)

    def carry_dir(self, path: bytes, tree: bytes) -> bytes | None:
        """The tree of a vanished directory of the parent holding only what is carried from it
        (depth first with an explicit stack), or None when nothing in it is carried."""
        top = self.parent_nodes(tree)
        if top is None:
            return None
        # each frame: its path, the entries still to look at, what it keeps, its own node
        stack: list[tuple[bytes, list[Node], list[Node], Node | None]] = [
            (path, sorted(top.values(), key=lambda n: n.name, reverse=True), [], None)
        ]
        while True:
            dpath, todo, kept, dnode = stack[-1]
            if not todo:
                stack.pop()
                tid = self.store_tree(kept) if kept else None
                if not stack:
                    return tid
                if tid is not None:
                    assert dnode is not None
                    stack[-1][2].append(dataclasses.replace(dnode, subtree=tid))
                continue
            self.check_stop()
            prev = todo.pop()
            cpath = dpath + b"/" + prev.name
            if prev.type == "dir":
                if prev.subtree is None or self.rules.excludes_path(cpath, True):
                    continue
                nodes = self.parent_nodes(prev.subtree)
                if nodes:
                    stack.append(
                        (
                            cpath,
                            sorted(nodes.values(), key=lambda n: n.name, reverse=True),
                            [],
                            prev,
                        )
                    )
            else:
                node = self.carry_leaf(cpath, prev)
                if node is not None:
                    kept.append(node)

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
        if job.fingerprint is not None and not job.failed and not job.carried:
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
        job = run_nested(self.walk_virtual(b"", root, self.parent_nodes(parent_tree)))
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
                keep = parent if self.keep is not None else None
                yield from self.add_entry(job, cpath, name, st, parent, st.st_dev, keep=keep)
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


def commit_snapshot(repo: Repository, snap: Snapshot, lock: RepositoryLock | None) -> None:
    """Store a snapshot under a held lock (None: a dry run's or a test's own arrangement). It
    is refused without a valid lease, and withdrawn if the lease lapsed while it was stored:
    prune may have stopped waiting for the writer, so the snapshot must not stay."""
    if lock is not None:
        lock.check()
    repo.save_snapshot(snap)
    if lock is not None and not lock.held_until_now():
        _withdraw(repo, snap)


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


class CommandFailed(SafeholdError):
    """A backup's source command could not be started, failed or was killed."""


def _label(command: str) -> str:
    one = " ".join(command.split())
    return f"'{one}'" if len(one) <= 80 else f"'{one[:77]}...'"


class CommandSource:
    """A shell command (``/bin/sh -c``) whose standard output is read as a stream.

    It runs in a process group of its own, so that a stop reaches whatever it started (a shell
    that forks, a pipeline): SIGTERM to the group, SIGKILL after :data:`KILL_AFTER_S`. Its
    standard error is read by a thread, keeping the last :data:`STDERR_KEEP` bytes. Use as a
    context manager; :meth:`finish` after the output ended raises when the command failed.
    """

    def __init__(self, command: str, stop: threading.Event) -> None:
        self.command = command
        self.label = _label(command)
        self.stop = stop
        try:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                start_new_session=True,
            )
        except OSError as e:
            raise CommandFailed(
                f"cannot start the command {self.label}: {e.strerror or e}"
            ) from None
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._out = self.proc.stdout.fileno()
        self._tail = bytearray()
        self.truncated = False
        self.killed = False  # stopped by us
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._err = threading.Thread(
            target=self._read_stderr, args=(self.proc.stderr.fileno(),), daemon=True
        )
        self._watch = threading.Thread(target=self._watch_stop, daemon=True)
        self._err.start()
        self._watch.start()

    def readinto(self, buffer: memoryview, /) -> int | None:
        return os.readv(self._out, [buffer])

    def _read_stderr(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return
            if not data:
                return
            self._tail += data
            if len(self._tail) > 2 * STDERR_KEEP:
                del self._tail[:-STDERR_KEEP]
                self.truncated = True

    @property
    def stderr(self) -> str:
        tail = bytes(self._tail)
        if len(tail) > STDERR_KEEP:
            tail = tail[-STDERR_KEEP:]
            self.truncated = True
        return tail.decode("utf-8", "replace")

    def _watch_stop(self) -> None:
        while not self._done.is_set():
            if self.stop.wait(0.1):
                if not self._done.is_set():
                    self.terminate()
                return

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, sig)

    def terminate(self) -> None:
        """Stop the command and what it started: SIGTERM, then SIGKILL if it lingers."""
        with self._lock:
            if self.killed:
                return
            self.killed = True
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(KILL_AFTER_S)
            except subprocess.TimeoutExpired:
                pass
            self._signal(signal.SIGKILL)  # the group's stragglers too
            self.proc.wait()

    def _last_line(self) -> str:
        lines = [x.strip() for x in self.stderr.splitlines() if x.strip()]
        if not lines:
            return ""
        last = lines[-1]
        return ": " + (last if len(last) <= 200 else last[:197] + "...")

    def finish(self) -> None:
        """Wait for the command (its output has ended); raise unless it exited with status 0."""
        while True:
            try:
                rc = self.proc.wait(0.1)
                self._done.set()
                break
            except subprocess.TimeoutExpired:
                if self.stop.is_set():
                    self.terminate()
        self._err.join(5)
        if self.stop.is_set() or self.killed:
            raise Interrupted("interrupted: the command was stopped, no snapshot was stored")
        if rc > 0:
            raise CommandFailed(
                f"the command {self.label} exited with status {rc}{self._last_line()}"
            )
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = str(-rc)
            raise CommandFailed(
                f"the command {self.label} was killed by signal {name}{self._last_line()}"
            )

    def close(self, events: EventSink) -> None:
        """End the command if it still runs, and report its standard error."""
        if self.proc.poll() is None:
            self.terminate()
        self._done.set()
        self._watch.join()
        self._err.join(5)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        text = self.stderr
        if text:
            lines = text.count("\n") + (0 if text.endswith("\n") else 1)
            events(
                Event(
                    "info",
                    f"the command {self.label} wrote {lines} lines to its standard error"
                    + (" (its last 64 KiB kept)" if self.truncated else ""),
                    data={"command": self.command, "stderr": text, "truncated": self.truncated},
                )
            )


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
    """Back up ``opts.paths`` (or ``stdin``, or the standard output of ``opts.stdin_command``,
    as the file ``opts.stdin_filename``) into a new snapshot.

    A source command that cannot be started, exits non-zero or is killed fails the backup with
    :class:`CommandFailed` (no snapshot is stored; what was uploaded is indexed and reused); a
    stop ends it (SIGTERM, then SIGKILL) and raises Interrupted. Its standard error (the last
    64 KiB) is reported by an ``info`` event whose ``data["stderr"]`` holds it.

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
    name = opts.stdin_filename
    if opts.stdin_command is not None:
        if stdin is not None:
            raise UsageError("back up either standard input or a command's output, not both")
        if opts.paths:
            raise UsageError("a command's output is backed up alone: it takes no paths")
        if not opts.stdin_command.strip():
            raise UsageError("the command to back up the output of is empty")
        name = "stdin" if name is None else name
    if name is not None:
        if stdin is None and opts.stdin_command is None:
            raise UsageError("--stdin needs a stream to read")
        if not name or "/" in name or name in (".", ".."):
            raise UsageError("--stdin-filename must be a plain file name")
        paths = ["/" + name]
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
        index_flush_packs=opts.index_flush_packs,
        index_flush_seconds=opts.index_flush_seconds,
        lock=lock,
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
    if name is None and estimate_totals:
        threading.Thread(target=arch.scan_totals, args=(bpaths,), daemon=True).start()
    try:
        if opts.stdin_command is not None:
            assert name is not None
            command = CommandSource(opts.stdin_command, stop)
            try:
                tree = arch.backup_stdin(command, name)
                command.finish()  # a failed command: no snapshot
            finally:
                command.close(events)
        elif name is not None:
            assert stdin is not None
            tree = arch.backup_stdin(stdin, name)
        else:
            tree = arch.backup_paths(bpaths, parent.tree if parent else None)
        arch.pool.shutdown(wait=True)
        arch.scan_pool.shutdown(wait=True)
        arch.check_stop()
        if not opts.dry_run:
            session.flush()
            if name is None:
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
        "files_carried": c.files_carried,
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
        commit_snapshot(repo, snap, lock)
        summary["snapshot"] = snap.id
    summary["parent"] = parent.id if parent else None
    return BackupResult(snap, summary, arch.warnings)
