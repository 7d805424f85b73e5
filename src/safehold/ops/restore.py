"""Restore: plan which entries of a snapshot to write, then write them under a target directory.

Every name is checked (no ``/``, ``.``, ``..``, NUL or empty names) and every directory is opened
with O_NOFOLLOW relative to its parent's descriptor, so a malicious repository cannot make restore
write outside the target, not even through a symlink it restored itself.
"""

from __future__ import annotations

import contextlib
import errno
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

    def make_dir(self, dir_fd: int, name: bytes) -> int:
        self._clear(dir_fd, name, keep_dir=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)

    def set_meta(self, dir_fd: int, name: bytes, node: Node, fd: int | None = None) -> None:
        target: Any = fd if fd is not None else name
        kw: dict[str, Any] = {} if fd is not None else {"dir_fd": dir_fd, "follow_symlinks": False}
        if self.owner:
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

    def entry(self, dir_fd: int, parts: tuple[bytes, ...], node: Node) -> None:
        name = parts[-1]
        t = node.type
        if t == "file":
            key = (node.dev, node.ino)
            if node.nlink > 1 and key in self.links:
                src_fd, src_name = self.links[key]
                self._clear(dir_fd, name, keep_dir=False)
                try:
                    os.link(
                        src_name, name, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False
                    )
                    self.result.files += 1
                    return
                except OSError:
                    pass  # fall back to a copy
            self._clear(dir_fd, name, keep_dir=False)
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                0o600,
                dir_fd=dir_fd,
            )
            if node.nlink > 1:
                keep = os.dup(dir_fd)
                self.links[key] = (keep, name)
            self.in_flight.acquire()
            self.futures.append(self.pool.submit(self.write_file, fd, parts, node))
            self.result.files += 1
        elif t == "symlink":
            self._clear(dir_fd, name, keep_dir=False)
            os.symlink(node.target, name, dir_fd=dir_fd)
            self.set_meta(dir_fd, name, node)
            self.result.others += 1
        elif t == "fifo":
            self._clear(dir_fd, name, keep_dir=False)
            os.mkfifo(name, stat.S_IMODE(node.mode), dir_fd=dir_fd)
            self.set_meta(dir_fd, name, node)
            self.result.others += 1
        elif t in ("chardev", "blockdev"):
            if os.geteuid() != 0:
                self.error(f"skipped device {_match_path(parts)} (needs root)")
                return
            self._clear(dir_fd, name, keep_dir=False)
            os.mknod(name, node.mode, node.rdev, dir_fd=dir_fd)
            self.set_meta(dir_fd, name, node)
            self.result.others += 1
        else:
            self.result.others += 1  # sockets are not restored

    def write_file(self, fd: int, parts: tuple[bytes, ...], node: Node) -> None:
        try:
            if self.stop.is_set():
                return
            pos = 0
            for bid in node.content or []:
                loc = self.repo.index.lookup(bid)
                if loc is None:
                    raise IntegrityError(f"blob {bid.hex()[:16]} is missing from the index")
                n = loc.entry.raw_length
                if bid != self.zero_id(n):
                    _write_sparse(fd, memoryview(self.repo.read_blob(bid)), pos)
                pos += n
            os.ftruncate(fd, pos)
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
            self.in_flight.release()

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


HOLE_BLOCK = 64 * 1024
_ZEROS = bytes(HOLE_BLOCK)


def _pwrite_all(fd: int, view: memoryview, pos: int) -> None:
    off = 0
    while off < len(view):
        off += os.pwrite(fd, view[off:], pos + off)


def _write_sparse(fd: int, view: memoryview, pos: int) -> None:
    """Write ``view`` at ``pos``, skipping aligned all-zero blocks so holes stay holes (the file
    is created empty and truncated to its size at the end, so skipped blocks read as zeros)."""
    n = len(view)
    if n < HOLE_BLOCK:
        _pwrite_all(fd, view, pos)
        return
    start = 0  # start of the pending non-zero run
    i = (-pos) % HOLE_BLOCK  # first offset in view aligned in the file
    while i + HOLE_BLOCK <= n:
        if view[i : i + HOLE_BLOCK] == _ZEROS:
            if i > start:
                _pwrite_all(fd, view[start:i], pos + start)
            start = i + HOLE_BLOCK
        i += HOLE_BLOCK
    if start < n:
        _pwrite_all(fd, view[start:], pos + start)


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
    # (parts, fd, node) of the open directories from the root down
    stack: list[tuple[tuple[bytes, ...], int, Node | None]] = [((), root_fd, None)]

    def close_top() -> None:
        parts, fd, node = stack.pop()
        os.close(fd)
        if node is not None:
            dirs_meta.append((parts, node))

    dirs_meta: list[tuple[tuple[bytes, ...], Node]] = []
    try:
        for item in plan:
            if stop.is_set():
                raise Interrupted("interrupted")
            while stack[-1][0] != item.parts[:-1]:
                close_top()
            parent_fd = stack[-1][1]
            try:
                if item.node.type == "dir":
                    fd = r.make_dir(parent_fd, item.parts[-1])
                    stack.append((item.parts, fd, item.node))
                    r.result.dirs += 1
                else:
                    r.entry(parent_fd, item.parts, item.node)
            except OSError as e:
                if item.node.type == "dir":
                    raise SafeholdError(
                        f"cannot create directory {_match_path(item.parts)}: {e.strerror}"
                    ) from None
                r.error(f"cannot restore {_match_path(item.parts)}: {e.strerror}")
        while len(stack) > 1:
            close_top()
        for fut in r.futures:
            fut.result()
        # directory metadata last, deepest first, once nothing more is written inside them
        for parts, node in sorted(dirs_meta, key=lambda x: -len(x[0])):
            _set_dir_meta(r, root_fd, parts, node)
    finally:
        stop_pool = stop.is_set()
        r.pool.shutdown(wait=True, cancel_futures=stop_pool)
        for fd, _ in r.links.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        for _, fd, _ in stack:
            with contextlib.suppress(OSError):
                os.close(fd)
    if stop.is_set():
        raise Interrupted("interrupted")
    return r.result


def _set_dir_meta(r: _Restorer, root_fd: int, parts: tuple[bytes, ...], node: Node) -> None:
    fds = []
    try:
        fd = root_fd
        for p in parts[:-1]:
            fd = os.open(p, _DIR_FLAGS, dir_fd=fd)
            fds.append(fd)
        dfd = os.open(parts[-1], _DIR_FLAGS, dir_fd=fd)
        try:
            r.set_meta(fd, parts[-1], node, fd=dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        if e.errno != errno.ENOENT:
            r.error(f"cannot set metadata of {_match_path(parts)}: {e.strerror}")
    finally:
        for f in fds:
            os.close(f)


def iter_files(repo: Repository, tree: bytes, prefix: str = "") -> Iterator[tuple[str, Node]]:
    """Every entry below ``tree`` with its path (``/a/b``), pre-order."""
    for node in repo.read_tree(tree):
        path = f"{prefix}/{os.fsdecode(node.name)}"
        yield path, node
        if node.type == "dir" and node.subtree is not None:
            yield from iter_files(repo, node.subtree, path)
