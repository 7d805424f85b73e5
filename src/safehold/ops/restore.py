"""Restore: plan which entries of a snapshot to write, then write them under a target directory.

Every name is checked (no ``/``, ``.``, ``..``, NUL or empty names) and every directory is opened
with O_NOFOLLOW relative to its parent's descriptor, so a malicious repository cannot make restore
write outside the target, not even through a symlink it restored itself.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pathspec

from safehold import crypto
from safehold.errors import IntegrityError, Interrupted, SafeholdError, UsageError
from safehold.events import Event, EventSink, ignore_events
from safehold.format.pack import PackEntry
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node
from safehold.repository.repo import Repository

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass
class RestoreOptions:
    target: str = ""
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    verify: bool = False
    owner: bool | None = None  # restore owners: default when running as root
    workers: int = 4


@dataclass
class RestoreResult:
    files: int = 0
    dirs: int = 0
    others: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)
    verified: int = 0


def check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise IntegrityError(f"refusing unsafe name {name!r} in the snapshot")


@dataclass(slots=True)
class PlanItem:
    parts: tuple[bytes, ...]
    node: Node


def _match_path(parts: tuple[bytes, ...]) -> str:
    return "/".join(os.fsdecode(p) for p in parts)


def plan_restore(
    repo: Repository,
    snapshot: Snapshot,
    *,
    includes: list[str] | None = None,
    excludes: list[str] | None = None,
    subpath: str | None = None,
) -> list[PlanItem]:
    """The entries to restore, parents before children (pre-order)."""
    inc = pathspec.GitIgnoreSpec.from_lines([p.lstrip("/") for p in includes or []])
    exc = pathspec.GitIgnoreSpec.from_lines([p.lstrip("/") for p in excludes or []])
    plan: list[PlanItem] = []

    def walk(tree_id: bytes, parts: tuple[bytes, ...], included: bool) -> bool:
        nodes = repo.read_tree(tree_id)
        seen: set[bytes] = set()
        any_kept = False
        for node in nodes:
            check_name(node.name)
            if node.name in seen:
                raise IntegrityError(f"duplicate name {node.name!r} in a snapshot tree")
            seen.add(node.name)
            p = (*parts, node.name)
            rel = _match_path(p)
            is_dir = node.type == "dir"
            if excludes and exc.match_file(rel + "/" if is_dir else rel):
                continue
            inc_here = included or not includes or inc.match_file(rel + "/" if is_dir else rel)
            if is_dir:
                pos = len(plan)
                plan.append(PlanItem(p, node))
                assert node.subtree is not None
                kept = walk(node.subtree, p, inc_here)
                if not kept and not inc_here:
                    del plan[pos]
                else:
                    any_kept = True
            elif inc_here:
                plan.append(PlanItem(p, node))
                any_kept = True
        return any_kept

    root_tree = snapshot.tree
    base: tuple[bytes, ...] = ()
    if subpath:
        root_tree, base = _descend(repo, snapshot.tree, subpath)
    walk(root_tree, base, False)
    return plan


def _descend(repo: Repository, tree: bytes, subpath: str) -> tuple[bytes, tuple[bytes, ...]]:
    parts = tuple(os.fsencode(p) for p in subpath.strip("/").split("/") if p)
    cur = tree
    for part in parts:
        match = [n for n in repo.read_tree(cur) if n.name == part]
        if not match or match[0].type != "dir" or match[0].subtree is None:
            raise UsageError(f"{subpath} is not a directory in the snapshot")
        cur = match[0].subtree
    return cur, parts


class _Restorer:
    def __init__(
        self, repo: Repository, opts: RestoreOptions, events: EventSink, stop: threading.Event
    ) -> None:
        self.repo = repo
        self.opts = opts
        self.events = events
        self.stop = stop
        self.result = RestoreResult()
        self.owner = os.geteuid() == 0 if opts.owner is None else opts.owner
        self.links: dict[tuple[int, int], tuple[int, bytes]] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max(1, opts.workers), thread_name_prefix="safehold-restore")
        self.in_flight = threading.BoundedSemaphore(max(1, opts.workers) * 8)
        self.futures: list[Future[None]] = []
        self._zero_ids: dict[int, bytes] = {}
        self.batch: list[_FileJob] = []
        self.batch_bytes = 0
        self.uid, self.gid = os.geteuid(), os.getegid()

    def error(self, msg: str) -> None:
        with self.lock:
            self.result.errors.append(msg)
        self.events(Event("warning", msg))

    def zero_id(self, length: int) -> bytes:
        zid = self._zero_ids.get(length)
        if zid is None:
            zid = self._zero_ids[length] = crypto.content_id(
                self.repo.secrets.id_key, bytes(length)
            )
        return zid

    # --- entries ----------------------------------------------------------------------------

    def _clear(self, dir_fd: int, name: bytes, keep_dir: bool) -> None:
        """Remove what stands at ``name`` unless it is a directory and ``keep_dir``."""
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if keep_dir:
                return
            _rmtree_at(dir_fd, name)
        else:
            os.unlink(name, dir_fd=dir_fd)

    def make_dir(self, dir_fd: int, name: bytes, parent_fresh: bool) -> tuple[int, bool]:
        """Open (making it if needed) a directory; also says whether it was made now, empty."""
        if not parent_fresh:
            self._clear(dir_fd, name, keep_dir=True)
        fresh = True
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            fresh = False
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd), fresh

    def set_meta(self, dir_fd: int, name: bytes, node: Node, fd: int | None = None) -> None:
        target: Any = fd if fd is not None else name
        kw: dict[str, Any] = {} if fd is not None else {"dir_fd": dir_fd, "follow_symlinks": False}
        if self.owner and (node.uid, node.gid) != (self.uid, self.gid):
            try:
                os.chown(target, node.uid, node.gid, **kw)
            except OSError as e:
                self.error(f"cannot set owner of {os.fsdecode(name)}: {e.strerror}")
        if node.xattrs and fd is not None:
            for k, v in node.xattrs.items():
                try:
                    os.setxattr(fd, k, v)
                except OSError:
                    pass
        if node.type != "symlink":
            os.chmod(target, stat.S_IMODE(node.mode), **kw)
        os.utime(target, ns=(node.atime_ns or node.mtime_ns, node.mtime_ns), **kw)

    def entry(self, dir_fd: int, parts: tuple[bytes, ...], node: Node, fresh: bool) -> None:
        """Create one non-directory entry; ``fresh``: its directory was just made, empty."""
        name = parts[-1]
        t = node.type
        if not fresh:
            self._clear(dir_fd, name, keep_dir=False)
        if t == "file":
            key = (node.dev, node.ino)
            if node.nlink > 1 and key in self.links:
                src_fd, src_name = self.links[key]
                try:
                    os.link(
                        src_name, name, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False
                    )
                    self.result.files += 1
                    return
                except OSError:
                    pass  # fall back to a copy
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                0o600,
                dir_fd=dir_fd,
            )
            if node.nlink > 1:
                keep = os.dup(dir_fd)
                self.links[key] = (keep, name)
            self.result.files += 1
            job = _FileJob(fd, parts, node)
            if node.size >= BATCH_FILE_LIMIT:
                self.submit([job])
            else:
                self.batch.append(job)
                self.batch_bytes += node.size
                if len(self.batch) >= BATCH_FILES or self.batch_bytes >= BATCH_BYTES:
                    self.flush_batch()
        elif t == "symlink":
            os.symlink(node.target, name, dir_fd=dir_fd)
            self.set_meta(dir_fd, name, node)
            self.result.others += 1
        elif t == "fifo":
            os.mkfifo(name, stat.S_IMODE(node.mode), dir_fd=dir_fd)
            self.set_meta(dir_fd, name, node)
            self.result.others += 1
        elif t in ("chardev", "blockdev"):
            if os.geteuid() != 0:
                self.error(f"skipped device {_match_path(parts)} (needs root)")
                return
            os.mknod(name, node.mode, node.rdev, dir_fd=dir_fd)
            self.set_meta(dir_fd, name, node)
            self.result.others += 1
        else:
            self.result.others += 1  # sockets are not restored

    def submit(self, jobs: list[_FileJob]) -> None:
        self.in_flight.acquire()
        self.futures.append(self.pool.submit(self.write_files, jobs))

    def flush_batch(self) -> None:
        if self.batch:
            self.submit(self.batch)
            self.batch, self.batch_bytes = [], 0

    def write_files(self, jobs: list[_FileJob]) -> None:
        """Write a batch of small files (their blobs read pack by pack, in few range reads), or
        one large file (blob by blob, so memory stays bounded)."""
        try:
            blobs: dict[bytes, bytes | memoryview] = {}
            if len(jobs) > 1 or jobs[0].node.size < BATCH_FILE_LIMIT:
                blobs = self.prefetch(jobs)
            for job in jobs:
                self.write_file(job, blobs)
        finally:
            self.in_flight.release()

    def prefetch(self, jobs: list[_FileJob]) -> dict[bytes, bytes | memoryview]:
        by_pack: dict[bytes, dict[bytes, PackEntry]] = {}
        index = self.repo.index
        for job in jobs:
            for bid in job.node.content or []:
                loc = index.lookup(bid)
                if loc is not None:
                    by_pack.setdefault(loc.pack_id, {})[bid] = loc.entry
        out: dict[bytes, bytes | memoryview] = {}
        for pack_id, entries in by_pack.items():
            try:
                for e, data in self.repo.read_pack_blobs(pack_id, list(entries.values())):
                    out[e.id] = data
            except SafeholdError:
                pass  # each blob is read again on its own, and its file named if it fails
        return out

    def write_file(self, job: _FileJob, blobs: dict[bytes, bytes | memoryview]) -> None:
        fd, parts, node = job.fd, job.parts, job.node
        try:
            if self.stop.is_set():
                return
            pos = end = 0  # end: how far the file has been written
            for bid in node.content or []:
                loc = self.repo.index.lookup(bid)
                if loc is None:
                    raise IntegrityError(f"blob {bid.hex()[:16]} is missing from the index")
                n = loc.entry.raw_length
                if bid != self.zero_id(n):
                    data = blobs.get(bid)
                    if data is None:
                        data = self.repo.read_blob(bid)
                    end = max(end, _write_sparse(fd, memoryview(data), pos))
                pos += n
            if end != pos:
                os.ftruncate(fd, pos)  # a hole at the end
            with self.lock:
                self.result.bytes += pos
            if self.opts.verify:
                self.verify(fd, node)
            self.set_meta(-1, parts[-1], node, fd=fd)
        except (OSError, SafeholdError) as e:
            msg = e.strerror if isinstance(e, OSError) else str(e)
            self.error(f"cannot restore {_match_path(parts)}: {msg}")
        finally:
            os.close(fd)

    def verify(self, fd: int, node: Node) -> None:
        pos = 0
        for bid in node.content or []:
            loc = self.repo.index.lookup(bid)
            assert loc is not None
            n = loc.entry.raw_length
            data = os.pread(fd, n, pos)
            if len(data) != n or crypto.content_id(self.repo.secrets.id_key, data) != bid:
                raise IntegrityError("verification failed: restored content differs")
            pos += n
        with self.lock:
            self.result.verified += 1


BATCH_FILE_LIMIT = 1 << 20
"""Files smaller than this are restored in batches; larger ones blob by blob, one job each."""
BATCH_FILES = 64
BATCH_BYTES = 8 << 20


@dataclass(slots=True)
class _FileJob:
    fd: int
    parts: tuple[bytes, ...]
    node: Node


HOLE_BLOCK = 64 * 1024
_ZEROS = bytes(HOLE_BLOCK)


def _pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    off = 0
    while off < len(view):
        off += os.pwrite(fd, view[off:], pos + off)


def _write_sparse(fd: int, view: memoryview, pos: int) -> int:
    """Write ``view`` at ``pos``, skipping aligned all-zero blocks so holes stay holes (the file
    is created empty and truncated to its size at the end, so skipped blocks read as zeros).
    Returns the end of the last byte actually written, ``pos`` if none was: the caller extends
    the file with ftruncate when that falls short of the file's size."""
    n = len(view)
    if n < HOLE_BLOCK:
        _pwrite_all(fd, view, pos)
        return pos + n
    written = pos
    start = 0  # start of the pending non-zero run
    i = (-pos) % HOLE_BLOCK  # first offset in view aligned in the file
    while i + HOLE_BLOCK <= n:
        if view[i : i + HOLE_BLOCK] == _ZEROS:
            if i > start:
                _pwrite_all(fd, view[start:i], pos + start)
                written = pos + i
            start = i + HOLE_BLOCK
        i += HOLE_BLOCK
    if start < n:
        _pwrite_all(fd, view[start:], pos + start)
        written = pos + n
    return written


def _rmtree_at(dir_fd: int, name: bytes) -> None:
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for entry in os.scandir(fd):
            ename = os.fsencode(entry.name)
            if entry.is_dir(follow_symlinks=False):
                _rmtree_at(fd, ename)
            else:
                os.unlink(ename, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def restore(
    repo: Repository,
    snapshot: Snapshot,
    opts: RestoreOptions,
    *,
    events: EventSink = ignore_events,
    stop: threading.Event | None = None,
) -> RestoreResult:
    """Restore ``snapshot`` (or the parts selected by includes/excludes) under ``opts.target``."""
    if not opts.target:
        raise UsageError("restore needs a --target directory")
    stop = stop or threading.Event()
    plan = plan_restore(repo, snapshot, includes=opts.includes, excludes=opts.excludes)
    os.makedirs(opts.target, exist_ok=True)
    r = _Restorer(repo, opts, events, stop)
    root_fd = os.open(opts.target, _DIR_FLAGS)
    # the open directories from the root down: (parts, fd, node, made empty by this restore)
    stack: list[tuple[tuple[bytes, ...], int, Node | None, bool]] = [((), root_fd, None, False)]

    def close_top() -> None:
        # every entry of the directory exists now (file contents may still be being written,
        # which does not change a directory): its metadata can be set
        parts, fd, node, _ = stack.pop()
        try:
            if node is not None:
                r.set_meta(-1, parts[-1], node, fd=fd)
        except OSError as e:
            r.error(f"cannot set metadata of {_match_path(parts)}: {e.strerror}")
        finally:
            os.close(fd)

    try:
        for item in plan:
            if stop.is_set():
                raise Interrupted("interrupted")
            while stack[-1][0] != item.parts[:-1]:
                close_top()
            _, parent_fd, _, parent_fresh = stack[-1]
            try:
                if item.node.type == "dir":
                    fd, fresh = r.make_dir(parent_fd, item.parts[-1], parent_fresh)
                    stack.append((item.parts, fd, item.node, fresh))
                    r.result.dirs += 1
                else:
                    r.entry(parent_fd, item.parts, item.node, parent_fresh)
            except OSError as e:
                if item.node.type == "dir":
                    raise SafeholdError(
                        f"cannot create directory {_match_path(item.parts)}: {e.strerror}"
                    ) from None
                r.error(f"cannot restore {_match_path(item.parts)}: {e.strerror}")
        r.flush_batch()
        while len(stack) > 1:
            close_top()
        for fut in r.futures:
            fut.result()
    finally:
        r.pool.shutdown(wait=True, cancel_futures=stop.is_set())
        for fd, _ in r.links.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        for _, fd, _, _ in stack:
            with contextlib.suppress(OSError):
                os.close(fd)
    if stop.is_set():
        raise Interrupted("interrupted")
    return r.result


def iter_files(repo: Repository, tree: bytes, prefix: str = "") -> Iterator[tuple[str, Node]]:
    """Every entry below ``tree`` with its path (``/a/b``), pre-order."""
    for node in repo.read_tree(tree):
        path = f"{prefix}/{os.fsdecode(node.name)}"
        yield path, node
        if node.type == "dir" and node.subtree is not None:
            yield from iter_files(repo, node.subtree, path)
