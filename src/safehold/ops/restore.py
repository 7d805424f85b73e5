"""Restore: plan which entries of a snapshot to write, then write them under a target directory.

Every name is checked (no ``/``, ``.``, ``..``, NUL or empty names) and every directory is opened
with O_NOFOLLOW relative to its parent's descriptor, so a malicious repository cannot make restore
write outside the target, not even through a symlink it restored itself.

A bad day costs only what it touches:

* every file (and symlink, FIFO, device) is written under a hidden temporary name in its
  directory (``.safehold-tmp-<random>-<name>``) and renamed into place only once it is complete
  and verified: a file that cannot be restored whole (a damaged or missing blob, a full disk, an
  I/O error) never appears under its real name, an existing file of that name stays as it was,
  and the temporary file is removed;
* a directory whose tree cannot be read is named and skipped; the rest of the snapshot restores;
* entries of kinds restore does not create (sockets) are named, not silently skipped;
* the result says what really happened: what was restored, what failed and why (damage in the
  repository or an error writing the target), what was not restored by design.

Nothing recurses (a 10,000-level tree restores like a flat one), and restore holds a bounded
number of descriptors whatever the depth or the number of hardlinks: a few directories stay open
(least recently used closed first, any other reopened one level at a time from its nearest open
ancestor), each worker holds at most one file, and hardlinks are made by name at the end.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import pathspec

from safehold import crypto
from safehold.errors import IntegrityError, Interrupted, NotFound, SafeholdError, UsageError
from safehold.events import Event, EventSink, ignore_events
from safehold.format.pack import PackEntry
from safehold.format.snapshot import Snapshot
from safehold.format.tree import FILE_TYPE_BITS, Node
from safehold.ops.walk import (
    Parts,
    check_name,
    entry_limit,
    records_counts,
    tree_totals,
    walk_tree,
)
from safehold.repository.repo import Repository

__all__ = [
    "Failure",
    "PlanItem",
    "RestoreOptions",
    "RestoreResult",
    "check_name",
    "iter_files",
    "plan_restore",
    "restore",
]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_NEW_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
TMP_PREFIX = b".safehold-tmp-"
"""Entries are written under ``TMP_PREFIX + <random> + "-" + <name>`` and renamed into place."""
KEEP_DIRS = 16
"""Directories of the target restore keeps open (besides the target itself)."""
MAX_WORKERS = 8
"""Writer threads at most: each holds one file and one directory open at a time."""


@dataclass
class RestoreOptions:
    target: str = ""
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    verify: bool = False
    owner: bool | None = None  # restore owners: default when running as root
    workers: int = 4


@dataclass(frozen=True, slots=True)
class Failure:
    """An entry that was not restored: its path in the snapshot (``/a/b``), why, and whether
    the cause is damage in the repository (otherwise: an error writing the target)."""

    path: str
    reason: str
    damage: bool

    def __str__(self) -> str:
        return f"not restored: {self.path}: {self.reason}"


@dataclass
class RestoreResult:
    files: int = 0  # files restored whole (each hardlinked name counts)
    dirs: int = 0
    others: int = 0  # symlinks, FIFOs, devices restored
    bytes: int = 0
    verified: int = 0
    failed: list[Failure] = field(default_factory=list)
    """Entries that could not be restored (a directory: with everything below it)."""
    not_restored: list[str] = field(default_factory=list)
    """Entries of kinds restore does not create (sockets; devices without root), by path."""
    warnings: list[str] = field(default_factory=list)
    """Restored entries whose owner could not be set, and the like."""

    @property
    def damaged(self) -> bool:
        """Whether some entry failed because of damage in the repository."""
        return any(f.damage for f in self.failed)

    @property
    def errors(self) -> list[str]:
        """Every message: failures, entries not restored by design, warnings."""
        return [str(f) for f in self.failed] + self.not_restored + self.warnings


@dataclass(slots=True)
class PlanItem:
    parts: tuple[bytes, ...]
    node: Node


def _match_path(parts: tuple[bytes, ...]) -> str:
    return "/".join(os.fsdecode(p) for p in parts)


def _show(parts: tuple[bytes, ...]) -> str:
    return "/" + _match_path(parts)


@dataclass(slots=True)
class _OpenDir:
    parts: Parts
    pos: int  # its position in the plan
    included: bool  # matched by an include pattern (or every entry is included)
    kept: bool = False  # something below it is in the plan


def plan_restore(
    repo: Repository,
    snapshot: Snapshot,
    *,
    includes: list[str] | None = None,
    excludes: list[str] | None = None,
    subpath: str | None = None,
    on_error: Callable[[Parts, SafeholdError, bool], None] | None = None,
    limit: int | None = None,
    stop: threading.Event | None = None,
) -> list[PlanItem]:
    """The entries to restore, parents before children (pre-order), without recursion.

    ``on_error(parts, error, unreadable_dir)``: a directory whose tree cannot be read
    (``unreadable_dir``), or an entry with an unsafe or duplicate name, is reported and left out
    of the plan (without ``on_error``: raises). ``limit``: the
    entries the walk may meet (default: :func:`~safehold.ops.walk.entry_limit`). ``stop``:
    once set, planning stops promptly with :class:`Interrupted` (checked at every entry and
    before every tree is read)."""
    stop = stop or threading.Event()
    try:
        return _plan(
            _StopOnRead.wrap(repo, stop),
            snapshot,
            includes=includes,
            excludes=excludes,
            subpath=subpath,
            on_error=on_error,
            limit=limit,
            stop=stop,
        )
    except _Stopped:
        raise Interrupted("interrupted") from None


class _Stopped(Exception):
    """A walk met the stop event. Deliberately not a :class:`SafeholdError`: the walks of
    :mod:`safehold.ops.walk` report those as unreadable trees and go on, this one must end them."""


class _StopOnRead:
    """The repository as restore's walks see it: every tree read first checks the stop event,
    so that a walk (:func:`~safehold.ops.walk.tree_totals` sizing a large snapshot, which
    yields nothing until it is done, and :func:`~safehold.ops.walk.walk_tree`) ends promptly
    with :class:`_Stopped` once it is set. Everything else is the repository's own."""

    def __init__(self, repo: Repository, stop: threading.Event) -> None:
        self._repo = repo
        self._stop = stop

    @classmethod
    def wrap(cls, repo: Repository, stop: threading.Event) -> Repository:
        if isinstance(repo, _StopOnRead):
            return repo
        return cast(Repository, cls(repo, stop))

    def read_tree(self, tree_id: bytes) -> list[Node]:
        if self._stop.is_set():
            raise _Stopped
        return self._repo.read_tree(tree_id)

    def read_blob(self, blob_id: bytes) -> bytes | memoryview:
        if self._stop.is_set():
            raise _Stopped
        return self._repo.read_blob(blob_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._repo, name)


def _plan(
    repo: Repository,
    snapshot: Snapshot,
    *,
    includes: list[str] | None,
    excludes: list[str] | None,
    subpath: str | None,
    on_error: Callable[[Parts, SafeholdError, bool], None] | None,
    limit: int | None,
    stop: threading.Event,
) -> list[PlanItem]:
    inc = pathspec.GitIgnoreSpec.from_lines([p.lstrip("/") for p in includes or []])
    exc = pathspec.GitIgnoreSpec.from_lines([p.lstrip("/") for p in excludes or []])
    plan: list[PlanItem] = []
    open_dirs: list[_OpenDir] = []
    pruned: set[Parts] = set()  # excluded directories: their trees are not read
    bad: set[Parts] = set()  # directories whose tree cannot be read

    def report(parts: Parts, err: SafeholdError) -> None:
        bad.add(parts)
        if on_error is None:
            raise err
        # right after a directory is planned its tree is read: a failure then is the directory's
        unreadable = bool(open_dirs) and open_dirs[-1].parts == parts
        on_error(parts, err, unreadable)

    def finish(d: _OpenDir) -> None:
        if d.parts in bad or (not d.kept and not d.included):
            del plan[d.pos :]  # nothing below it was kept
        elif open_dirs:
            open_dirs[-1].kept = True

    root_tree = snapshot.tree
    base: Parts = ()
    if subpath:
        root_tree, base = _descend(repo, snapshot.tree, subpath)
    walk = walk_tree(
        repo,
        root_tree,
        prefix=base,
        limit=entry_limit(snapshot) if limit is None else limit,
        on_error=report,
        descend=lambda parts, _node: parts not in pruned,
        check_names=True,
    )
    for parts, node in walk:
        if stop.is_set():
            raise _Stopped
        while open_dirs and open_dirs[-1].parts != parts[:-1]:
            finish(open_dirs.pop())
        included = open_dirs[-1].included if open_dirs else False
        rel = _match_path(parts)
        is_dir = node.type == "dir"
        if excludes and exc.match_file(rel + "/" if is_dir else rel):
            if is_dir:
                pruned.add(parts)
            continue
        inc_here = included or not includes or inc.match_file(rel + "/" if is_dir else rel)
        if is_dir:
            open_dirs.append(_OpenDir(parts, len(plan), inc_here))
            plan.append(PlanItem(parts, node))
        elif inc_here:
            plan.append(PlanItem(parts, node))
            if open_dirs:
                open_dirs[-1].kept = True
    while open_dirs:
        finish(open_dirs.pop())
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


class _DirHandles:
    """Open directories of the target by their path below it: at most ``keep`` stay open when
    nobody uses them (least recently used closed first); any other is opened from its nearest
    open ancestor, one level at a time, with O_NOFOLLOW. Thread-safe."""

    def __init__(self, root_fd: int, keep: int = KEEP_DIRS) -> None:
        self.root = root_fd
        self.keep = keep
        self.lock = threading.Lock()
        self.fds: collections.OrderedDict[Parts, list[int]] = collections.OrderedDict()

    def acquire(self, parts: Parts) -> int:
        """The directory's descriptor, held until :meth:`release`."""
        if not parts:
            return self.root
        with self.lock:
            ent = self.fds.get(parts)
            if ent is not None:
                ent[1] += 1
                self.fds.move_to_end(parts)
                return ent[0]
            k = len(parts) - 1
            while k and parts[:k] not in self.fds:
                k -= 1
            prev: Parts | None = None
            fd = self.root
            if k:
                prev = parts[:k]
                base = self.fds[prev]
                base[1] += 1
                fd = base[0]
            try:
                for i in range(k, len(parts)):
                    nfd = os.open(parts[i], _DIR_FLAGS, dir_fd=fd)
                    key = parts[: i + 1]
                    self.fds[key] = [nfd, 1]
                    if prev is not None:
                        self.fds[prev][1] -= 1
                    prev, fd = key, nfd
                    self._evict()
            except BaseException:
                if prev is not None:
                    self.fds[prev][1] -= 1
                    self._evict()
                raise
            return fd

    def release(self, parts: Parts) -> None:
        if not parts:
            return
        with self.lock:
            self.fds[parts][1] -= 1
            self._evict()

    def forget(self, prefix: Parts) -> None:
        """Close what is open at or below ``prefix`` (about to be removed)."""
        with self.lock:
            n = len(prefix)
            for key in [k for k, e in self.fds.items() if k[:n] == prefix and e[1] == 0]:
                os.close(self.fds.pop(key)[0])

    def _evict(self) -> None:
        while len(self.fds) > self.keep:
            victim = next((k for k, e in self.fds.items() if e[1] == 0), None)
            if victim is None:
                return
            os.close(self.fds.pop(victim)[0])

    def close(self) -> None:
        with self.lock:
            for fd, _ in self.fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.fds.clear()
            with contextlib.suppress(OSError):
                os.close(self.root)


@dataclass(slots=True)
class _Link:
    """The first name of a hardlinked inode: the others are linked to it once it is restored."""

    parts: Parts
    node: Node
    ok: bool | None = None  # None: not written (interrupted)
    reason: str = ""
    damage: bool = False


@dataclass(slots=True)
class _FileJob:
    parts: Parts
    node: Node
    link: _Link | None = None


def _same_content(a: Node, b: Node) -> bool:
    return (a.content, a.size) == (b.content, b.size)


def _temp_name(name: bytes) -> bytes:
    return TMP_PREFIX + os.urandom(6).hex().encode() + b"-" + name[:200]


def _is_damage(e: BaseException) -> bool:
    # OverflowError, ValueError: a value from the repository the system refuses (forged)
    return isinstance(e, (IntegrityError, NotFound, OverflowError, ValueError))


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


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
        self.lock = threading.Lock()
        workers = min(max(1, opts.workers), MAX_WORKERS)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="safehold-restore")
        self.in_flight = threading.BoundedSemaphore(workers * 4)
        self.futures: list[Future[None]] = []
        self._zero_ids: dict[int, bytes] = {}
        self.batch: list[_FileJob] = []
        self.batch_bytes = 0
        self.uid, self.gid = os.geteuid(), os.getegid()
        self.dirs: _DirHandles | None = None

    # --- reporting ----------------------------------------------------------------------------

    def fail(self, parts: Parts, reason: str, *, damage: bool) -> None:
        f = Failure(_show(parts), reason, damage)
        with self.lock:
            self.result.failed.append(f)
        self.events(Event("warning", str(f), {"path": f.path, "damage": damage}))

    def tree_error(self, parts: Parts, err: SafeholdError, unreadable_dir: bool) -> None:
        """A directory whose tree cannot be read, or an entry with an invalid name."""
        reason = _reason(err)
        if unreadable_dir:
            reason = f"the directory cannot be read, nothing below it was restored: {reason}"
        self.fail(parts, reason, damage=_is_damage(err))

    def skipped(self, parts: Parts, what: str) -> None:
        msg = f"not restored: {_show(parts)} is {what}"
        with self.lock:
            self.result.not_restored.append(msg)
        self.events(Event("warning", msg, {"path": _show(parts)}))

    def warn(self, msg: str) -> None:
        with self.lock:
            self.result.warnings.append(msg)
        self.events(Event("warning", msg))

    def zero_id(self, length: int) -> bytes:
        zid = self._zero_ids.get(length)
        if zid is None:
            zid = self._zero_ids[length] = crypto.content_id(
                self.repo.secrets.id_key, bytes(length)
            )
        return zid

    # --- the run ------------------------------------------------------------------------------

    def run(self, plan: list[PlanItem], root_fd: int) -> None:
        dirs = self.dirs = _DirHandles(root_fd)
        made: list[PlanItem] = []  # directories made or found, for their metadata at the end
        links: dict[tuple[int, int], _Link] = {}
        later: list[tuple[PlanItem, _Link]] = []  # further names of hardlinked inodes
        skip: Parts | None = None  # a directory that could not be made: nothing below it
        try:
            for item in plan:
                if self.stop.is_set():
                    return
                parts, node = item.parts, item.node
                if skip is not None and parts[: len(skip)] == skip:
                    continue
                skip = None
                if node.type == "dir":
                    try:
                        self.make_dir(parts)
                    except OSError as e:
                        self.fail(
                            parts,
                            f"cannot create the directory ({_reason(e)}); "
                            "nothing below it was restored",
                            damage=False,
                        )
                        skip = parts
                        continue
                    made.append(item)
                    self.result.dirs += 1
                elif node.type == "file":
                    link = None
                    if node.nlink > 1:
                        key = (node.dev, node.ino)
                        first = links.get(key)
                        if first is not None:
                            later.append((item, first))
                            continue
                        link = links[key] = _Link(parts, node)
                    self.add_file(_FileJob(parts, node, link))
                else:
                    self.special(parts, node)
            self.flush_batch()
            self.wait()
            while later:
                later = self.add_links(later)
                if self.stop.is_set():
                    return
            for item in reversed(made):  # children before their parents
                if self.stop.is_set():
                    return
                self.dir_meta(item)
        finally:
            self.pool.shutdown(wait=True, cancel_futures=self.stop.is_set())
            dirs.close()

    def wait(self) -> None:
        futures, self.futures = self.futures, []
        for fut in futures:
            fut.result()

    # --- entries ------------------------------------------------------------------------------

    def make_dir(self, parts: Parts) -> None:
        assert self.dirs is not None
        pfd = self.dirs.acquire(parts[:-1])
        name = parts[-1]
        try:
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
            except FileExistsError:
                st = os.lstat(name, dir_fd=pfd)
                if stat.S_ISDIR(st.st_mode):
                    return
                os.unlink(name, dir_fd=pfd)  # a file or symlink where a directory goes
                os.mkdir(name, 0o700, dir_fd=pfd)
        finally:
            self.dirs.release(parts[:-1])

    def dir_meta(self, item: PlanItem) -> None:
        assert self.dirs is not None
        try:
            fd = self.dirs.acquire(item.parts)
        except OSError as e:
            self.warn(f"cannot set metadata of {_show(item.parts)}: {_reason(e)}")
            return
        try:
            self.set_meta(item.parts, item.node, fd=fd)
        except (OSError, SafeholdError) as e:
            # its entries are restored, but the directory is not as the snapshot has it
            with self.lock:
                self.result.dirs -= 1
            self.fail(item.parts, f"cannot set its metadata: {_reason(e)}", damage=_is_damage(e))
        finally:
            self.dirs.release(item.parts)

    def set_meta(
        self,
        parts: Parts,
        node: Node,
        *,
        fd: int | None = None,
        dir_fd: int = -1,
        name: bytes = b"",
    ) -> None:
        """Owner, extended attributes, mode and times: through ``fd``, or of ``name`` in
        ``dir_fd`` (not following a symlink). A value the system refuses as invalid (which the
        tree parser's bounds should have caught) is :class:`IntegrityError`: the entry fails,
        the rest of the restore goes on."""
        try:
            self._set_meta(parts, node, fd=fd, dir_fd=dir_fd, name=name)
        except (OverflowError, ValueError) as e:
            raise IntegrityError(f"its metadata cannot be set: {e}") from None

    def _set_meta(
        self, parts: Parts, node: Node, *, fd: int | None, dir_fd: int, name: bytes
    ) -> None:
        target: Any = fd if fd is not None else name
        kw: dict[str, Any] = {} if fd is not None else {"dir_fd": dir_fd, "follow_symlinks": False}
        if self.owner and (node.uid, node.gid) != (self.uid, self.gid):
            try:
                os.chown(target, node.uid, node.gid, **kw)
            except OSError as e:
                self.warn(f"cannot set the owner of {_show(parts)}: {_reason(e)}")
        if node.xattrs and fd is not None:
            for k, v in node.xattrs.items():
                with contextlib.suppress(OSError):
                    os.setxattr(fd, k, v)
        if node.type != "symlink":
            os.chmod(target, stat.S_IMODE(node.mode), **kw)
        os.utime(target, ns=(node.atime_ns or node.mtime_ns, node.mtime_ns), **kw)

    def place(self, dfd: int, tmp: bytes, parts: Parts) -> None:
        """Rename ``tmp`` to the entry's name, replacing what is there (a directory too)."""
        name = parts[-1]
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            return
        except OSError as e:
            if e.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not stat.S_ISDIR(os.lstat(name, dir_fd=dfd).st_mode):
                raise
        assert self.dirs is not None
        self.dirs.forget(parts)
        _rmtree_at(dfd, name)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

    def special(self, parts: Parts, node: Node) -> None:
        """A symlink, FIFO or device (made under a temporary name, then renamed into place);
        other kinds are named as not restored."""
        t = node.type
        if t not in ("symlink", "fifo", "chardev", "blockdev"):
            self.skipped(parts, "a socket" if t == "socket" else f"of kind {t!r}")
            return
        if t in ("chardev", "blockdev") and os.geteuid() != 0:
            self.skipped(parts, "a device (creating one needs root)")
            return
        assert self.dirs is not None
        tmp = _temp_name(parts[-1])
        made = placed = False
        try:
            dfd = self.dirs.acquire(parts[:-1])
        except OSError as e:
            self.fail(parts, _reason(e), damage=False)
            return
        try:
            if t == "symlink":
                os.symlink(node.target, tmp, dir_fd=dfd)
            elif t == "fifo":
                os.mkfifo(tmp, stat.S_IMODE(node.mode), dir_fd=dfd)
            else:  # the file type is the node's, whatever the mode's type bits say
                os.mknod(tmp, FILE_TYPE_BITS[t] | stat.S_IMODE(node.mode), node.rdev, dir_fd=dfd)
            made = True
            self.set_meta(parts, node, dir_fd=dfd, name=tmp)
            self.place(dfd, tmp, parts)
            placed = True
            with self.lock:
                self.result.others += 1
        except (OSError, OverflowError, ValueError, SafeholdError) as e:
            self.fail(parts, _reason(e), damage=_is_damage(e))
        finally:
            if made and not placed:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
            self.dirs.release(parts[:-1])

    def add_links(self, later: list[tuple[PlanItem, _Link]]) -> list[tuple[PlanItem, _Link]]:
        """One round of the further names of hardlinked inodes, waited for; returns what is left
        for the next round. A group whose first name could not be written for a reason of the
        target (an immutable file of that name, a full or read-only filesystem) goes on from
        its next name: that one is written as a file and becomes the group's first, the others
        are linked to it in the next round. When the content itself cannot be read (damage),
        every name is named with that reason."""
        again: list[tuple[PlanItem, _Link]] = []
        promoted: dict[int, _Link] = {}  # by id() of the failed first name
        for item, first in later:
            if self.stop.is_set():
                return []
            if first.ok is False and not first.damage and _same_content(item.node, first.node):
                new = promoted.get(id(first))
                if new is None:
                    new = promoted[id(first)] = _Link(item.parts, item.node)
                    self.add_file(_FileJob(item.parts, item.node, new))
                else:
                    again.append((item, new))
                continue
            self.add_link(item, first)
        self.flush_batch()
        self.wait()
        return again

    def add_link(self, item: PlanItem, first: _Link) -> None:
        """Another name of a hardlinked inode: linked to the first name once that is restored
        (a copy when linking fails, or when the two nodes do not hold the same content)."""
        parts, node = item.parts, item.node
        if first.ok is None:
            return  # interrupted
        if not _same_content(node, first.node):
            self.add_file(_FileJob(parts, node))
            return
        if not first.ok:
            self.fail(
                parts,
                f"a hardlink of {_show(first.parts)}, which was not restored: {first.reason}",
                damage=first.damage,
            )
            return
        assert self.dirs is not None
        src = self.dirs.acquire(first.parts[:-1])
        try:
            dst = self.dirs.acquire(parts[:-1])
        except OSError as e:
            self.dirs.release(first.parts[:-1])
            self.fail(parts, _reason(e), damage=False)
            return
        tmp = _temp_name(parts[-1])
        linked = placed = False
        try:
            os.link(first.parts[-1], tmp, src_dir_fd=src, dst_dir_fd=dst, follow_symlinks=False)
            linked = True
            self.place(dst, tmp, parts)
            placed = True
            with self.lock:
                self.result.files += 1
        except OSError:
            self.add_file(_FileJob(parts, node))  # a copy instead
        finally:
            if linked and not placed:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dst)
            self.dirs.release(parts[:-1])
            self.dirs.release(first.parts[:-1])

    # --- file contents ------------------------------------------------------------------------

    def add_file(self, job: _FileJob) -> None:
        if job.node.size >= BATCH_FILE_LIMIT:
            self.submit([job])
            return
        self.batch.append(job)
        self.batch_bytes += job.node.size
        if len(self.batch) >= BATCH_FILES or self.batch_bytes >= BATCH_BYTES:
            self.flush_batch()

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
                for e, data in self.repo.read_pack_blobs(
                    pack_id, list(entries.values()), errors=True
                ):
                    if not isinstance(data, BaseException):
                        out[e.id] = data
            except SafeholdError:
                pass  # a blob not read here is read alone (any copy), its file named if it fails
        return out

    def write_file(self, job: _FileJob, blobs: dict[bytes, bytes | memoryview]) -> None:
        """Write one file under a temporary name, verify it, set its metadata and rename it
        into place; on any failure remove the temporary file and name the file."""
        if self.stop.is_set():
            return
        parts, node = job.parts, job.node
        assert self.dirs is not None
        try:
            dfd = self.dirs.acquire(parts[:-1])
        except OSError as e:
            self._file_failed(job, e)
            return
        tmp = _temp_name(parts[-1])
        fd = -1
        made = placed = False
        try:
            fd = os.open(tmp, _NEW_FILE_FLAGS, 0o600, dir_fd=dfd)
            made = True
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
                if self.stop.is_set():
                    return
            if pos != node.size:
                raise IntegrityError(f"its size says {node.size}, its content holds {pos}")
            if end != pos:
                os.ftruncate(fd, pos)  # a hole at the end
            if os.fstat(fd).st_size != pos:
                raise OSError(errno.EIO, "the restored file has the wrong size")
            if self.opts.verify:
                self.verify(fd, node)
            self.set_meta(parts, node, fd=fd)
            fd, closing = -1, fd
            os.close(closing)  # a delayed write error shows here
            self.place(dfd, tmp, parts)
            placed = True
            with self.lock:
                self.result.files += 1
                self.result.bytes += pos
            if job.link is not None:
                job.link.ok = True
        except (OSError, OverflowError, ValueError, SafeholdError) as e:
            self._file_failed(job, e)
        finally:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            if made and not placed:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
            self.dirs.release(parts[:-1])

    def _file_failed(self, job: _FileJob, e: BaseException) -> None:
        damage = _is_damage(e)
        self.fail(job.parts, _reason(e), damage=damage)
        if job.link is not None:
            job.link.ok, job.link.reason, job.link.damage = False, _reason(e), damage

    def verify(self, fd: int, node: Node) -> None:
        pos = 0
        for bid in node.content or []:
            loc = self.repo.index.lookup(bid)
            assert loc is not None
            n = loc.entry.raw_length
            data = os.pread(fd, n, pos)
            if len(data) != n or crypto.content_id(self.repo.secrets.id_key, data) != bid:
                raise OSError(
                    errno.EIO, "verification failed: the written content reads back different"
                )
            pos += n
        with self.lock:
            self.result.verified += 1


BATCH_FILE_LIMIT = 1 << 20
"""Files smaller than this are restored in batches; larger ones blob by blob, one job each."""
BATCH_FILES = 64
BATCH_BYTES = 8 << 20

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


def _open_path(dir_fd: int, names: list[bytes]) -> int:
    """Open the directory ``names`` below ``dir_fd`` one level at a time (O_NOFOLLOW), holding
    at most two descriptors; returns ``dir_fd`` itself for an empty path."""
    fd = dir_fd
    for name in names:
        nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
        if fd != dir_fd:
            os.close(fd)
        fd = nfd
    return fd


def _rmtree_at(dir_fd: int, name: bytes) -> None:
    """Remove the directory ``name`` in ``dir_fd`` with everything below it, without recursion
    and with at most three descriptors open whatever its depth."""
    path = [name]
    while path:
        fd = _open_path(dir_fd, path)
        sub: bytes | None = None
        try:
            with os.scandir(fd) as it:
                entries = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in it]
            for ename, is_dir in entries:
                if is_dir:
                    sub = ename
                else:
                    os.unlink(ename, dir_fd=fd)
        finally:
            os.close(fd)
        if sub is not None:
            path.append(sub)
            continue
        pfd = _open_path(dir_fd, path[:-1])
        try:
            os.rmdir(path[-1], dir_fd=pfd)
        finally:
            if pfd != dir_fd:
                os.close(pfd)
        path.pop()


def _ignore(_parts: Parts, _err: SafeholdError) -> None:
    pass


_TARGET_FLAGS = _DIR_FLAGS & ~os.O_NOFOLLOW


def _open_target(target: str) -> int:
    """The target directory (made with its parents if missing), opened. The target itself may
    be a symlink to a directory (``/restore -> /mnt/big``): that one symlink is followed, as
    ``cd`` would; nothing below it ever is (every entry is opened with O_NOFOLLOW)."""
    try:
        os.makedirs(target, exist_ok=True)
        return os.open(target, _TARGET_FLAGS)
    except OSError as e:
        if os.path.islink(target) and not os.path.exists(target):
            raise UsageError(
                f"cannot restore to {target}: it is a symlink to {os.readlink(target)}, "
                "which does not exist"
            ) from None
        raise UsageError(f"cannot restore to {target}: {_reason(e)}") from None


def restore(
    repo: Repository,
    snapshot: Snapshot,
    opts: RestoreOptions,
    *,
    events: EventSink = ignore_events,
    stop: threading.Event | None = None,
) -> RestoreResult:
    """Restore ``snapshot`` (or the parts selected by includes/excludes) under ``opts.target``.

    Damage costs only what it touches: the result names every entry not restored
    (:attr:`RestoreResult.failed`, :attr:`RestoreResult.not_restored`). Raises only for what
    stops everything: a snapshot whose trees expand beyond what it recorded (hostile), a target
    that cannot be opened, an interruption."""
    if not opts.target:
        raise UsageError("restore needs a --target directory")
    stop = stop or threading.Event()
    r = _Restorer(repo, opts, events, stop)
    try:
        limit = entry_limit(snapshot)
        view = _StopOnRead.wrap(repo, stop)  # a signal ends sizing and planning promptly
        try:
            if not records_counts(snapshot):
                # no recorded count bounds the plan: size the snapshot first, reading each
                # distinct tree once, so that a hostile DAG is refused before anything is
                # planned or written
                tree_totals(view, snapshot.tree, limit=limit, on_error=_ignore)
            plan = _plan(
                view,
                snapshot,
                includes=opts.includes,
                excludes=opts.excludes,
                subpath=None,
                on_error=r.tree_error,
                limit=limit,
                stop=stop,
            )
        except _Stopped:
            raise Interrupted("interrupted") from None
        root_fd = _open_target(opts.target)
        r.run(plan, root_fd)
    finally:
        r.pool.shutdown(wait=True, cancel_futures=True)
        with contextlib.suppress(SafeholdError):
            repo.save_damage()  # the next backup stores again what was found damaged
    if stop.is_set():
        raise Interrupted("interrupted")
    return r.result


def iter_files(
    repo: Repository, tree: bytes, prefix: str = "", *, limit: int | None = None
) -> Iterator[tuple[str, Node]]:
    """Every entry below ``tree`` with its path (``/a/b``), pre-order, without recursion;
    bounded by ``limit`` entries (see :func:`~safehold.ops.walk.walk_tree`)."""
    for parts, node in walk_tree(repo, tree, limit=limit):
        yield prefix + "/" + "/".join(os.fsdecode(p) for p in parts), node
