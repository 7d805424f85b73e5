"""Reading the source filesystem: metadata capture and exclusion rules.

Paths may be longer than the system allows in one call (PATH_MAX, 4096 bytes on Linux): a path at
least :data:`PATH_LIMIT` long is reached through directory descriptors, a piece at a time
(:func:`located`), so a tree hundreds of levels deep backs up like a flat one.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pathspec

from safehold.errors import UsageError
from safehold.format.tree import OWNER_MAX, Node

CACHEDIR_TAG = "CACHEDIR.TAG"
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"
PATH_LIMIT = 3072
"""Paths at least this long (bytes) are reached through directory descriptors."""
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
_PROC_FD = b"/proc/self/fd/"

Listing = list[tuple[bytes, "os.stat_result | OSError"]]


def _pieces(path: bytes) -> list[bytes]:
    """``path`` cut at slashes into pieces shorter than :data:`PATH_LIMIT` (the first one
    absolute when ``path`` is, the others relative to the one before)."""
    parts = path.split(b"/")
    pieces: list[bytes] = []
    cur: list[bytes] = []
    size = 0
    for part in parts:
        if cur and size + len(part) + 1 >= PATH_LIMIT:
            pieces.append(b"/".join(cur) or b"/")
            cur, size = [], 0
        cur.append(part)
        size += len(part) + 1
    if cur:
        pieces.append(b"/".join(cur) or b"/")
    return [p for p in pieces if p]


def open_dir(path: bytes) -> int:
    """A descriptor of the directory ``path``, however long (OSError if it cannot be opened)."""
    if len(path) < PATH_LIMIT:
        return os.open(path, _DIR_FLAGS)
    pieces = _pieces(path)
    fd = os.open(pieces[0], _DIR_FLAGS)
    try:
        for piece in pieces[1:]:
            nfd = os.open(piece, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def located(path: bytes) -> Iterator[tuple[int | None, bytes]]:
    """``(dir_fd, name)`` reaching ``path`` for the ``dir_fd=`` form of a call: ``(None, path)``
    when the path is short enough to use whole, else a descriptor of its parent (closed after)
    and its last component."""
    if len(path) < PATH_LIMIT:
        yield None, path
        return
    parent, _, name = path.rstrip(b"/").rpartition(b"/")
    fd = open_dir(parent or b"/")
    try:
        yield fd, name
    finally:
        os.close(fd)


def short_path(dir_fd: int | None, name: bytes) -> bytes:
    """A path for calls that take no ``dir_fd`` (xattrs): through ``/proc/self/fd``, valid while
    ``dir_fd`` is open."""
    return name if dir_fd is None else _PROC_FD + str(dir_fd).encode() + b"/" + name


def lstat(path: bytes) -> os.stat_result:
    with located(path) as (fd, name):
        return os.stat(name, dir_fd=fd, follow_symlinks=False)


def lexists(path: bytes) -> bool:
    try:
        lstat(path)
    except OSError:
        return False
    return True


def open_file(path: bytes, flags: int) -> int:
    """``os.open`` for a path of any length (never following a symlink in its last component
    when ``flags`` has O_NOFOLLOW)."""
    with located(path) as (fd, name):
        return os.open(name, flags, dir_fd=fd)


def list_dir(path: bytes, only: set[bytes] | None = None) -> Listing:
    """A directory's entries (only those named in ``only`` when given) with their lstat or the
    error that prevented it, sorted by name. OSError when the directory cannot be listed."""
    out: Listing = []
    if len(path) < PATH_LIMIT:
        with os.scandir(path) as it:
            entries = sorted(
                (e for e in it if only is None or e.name in only), key=lambda e: e.name
            )
        for entry in entries:
            try:
                out.append((entry.name, entry.stat(follow_symlinks=False)))
            except OSError as e:
                out.append((entry.name, e))
        return out
    fd = open_dir(path)
    try:
        with os.scandir(fd) as it:
            named = sorted(
                (os.fsencode(e.name), e) for e in it if only is None or os.fsencode(e.name) in only
            )
        for name, fd_entry in named:
            try:
                out.append((name, fd_entry.stat(follow_symlinks=False)))
            except OSError as e:
                out.append((name, e))
    finally:
        os.close(fd)
    return out


@functools.lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""
    return name if len(name.encode("utf-8", "surrogateescape")) <= OWNER_MAX else ""  # as readers


@functools.lru_cache(maxsize=4096)
def group_name(gid: int) -> str:
    try:
        name = grp.getgrgid(gid).gr_name
    except KeyError:
        return ""
    return name if len(name.encode("utf-8", "surrogateescape")) <= OWNER_MAX else ""


def node_type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISCHR(mode):
        return "chardev"
    if stat.S_ISBLK(mode):
        return "blockdev"
    return "socket"


def read_xattrs(path: bytes) -> dict[bytes, bytes] | None:
    """The extended attributes of ``path`` (not following a symlink), None if there are none."""
    with located(path) as (fd, name):
        return _read_xattrs(short_path(fd, name))


def _read_xattrs(path: bytes) -> dict[bytes, bytes] | None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return None
    if not names:
        return None
    out = {}
    for n in names:
        try:
            out[n.encode("utf-8", "surrogateescape")] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
    return out or None


def node_from_stat(name: bytes, st: os.stat_result, path: bytes) -> Node:
    """A tree node for ``path`` from its lstat result (content and subtree filled in later)."""
    typ = node_type(st.st_mode)
    node = Node(
        name=name,
        type=typ,
        mode=st.st_mode,
        uid=st.st_uid,
        gid=st.st_gid,
        user=user_name(st.st_uid),
        group=group_name(st.st_gid),
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        atime_ns=0,  # not recorded: reading a file changes it, and trees would never repeat
        size=st.st_size if typ in ("file", "symlink") else 0,
        dev=st.st_dev,
        ino=st.st_ino,
        nlink=st.st_nlink,
        rdev=st.st_rdev if typ in ("chardev", "blockdev") else 0,
    )
    if typ == "symlink":
        with located(path) as (fd, lname):
            node.target = os.readlink(lname, dir_fd=fd)
    node.xattrs = read_xattrs(path)
    return node


@dataclass
class ExcludeRules:
    """What a backup leaves out: gitignore-style patterns and the other --exclude-* flags."""

    patterns: list[str] = field(default_factory=list)
    caches: bool = False
    if_present: list[str] = field(default_factory=list)
    larger_than: int | None = None
    one_file_system: bool = False
    _spec: pathspec.GitIgnoreSpec | None = None

    def __post_init__(self) -> None:
        lines = [p for p in self.patterns if p.strip() and not p.lstrip().startswith("#")]
        self._spec = pathspec.GitIgnoreSpec.from_lines(lines) if lines else None

    @classmethod
    def build(
        cls,
        patterns: Iterable[str] = (),
        exclude_files: Iterable[str] = (),
        **kwargs: object,
    ) -> ExcludeRules:
        pats = list(patterns)
        for f in exclude_files:
            try:
                with open(f, encoding="utf-8") as fh:
                    pats.extend(line.rstrip("\n") for line in fh)
            except OSError as e:
                raise UsageError(f"cannot read exclude file {f}: {e.strerror}") from None
        return cls(patterns=pats, **kwargs)  # type: ignore[arg-type]

    def excludes_path(self, path: bytes, is_dir: bool) -> bool:
        if self._spec is None:
            return False
        rel = os.fsdecode(path).lstrip("/")
        return self._spec.match_file(rel + "/" if is_dir else rel)

    def excludes_dir_contents(self, path: bytes) -> bool:
        """True when a directory's contents are to be left out (cache dirs, marker files)."""
        for marker in self.if_present:
            if lexists(os.path.join(path, os.fsencode(marker))):
                return True
        if self.caches:
            try:
                fd = open_file(
                    os.path.join(path, CACHEDIR_TAG.encode()),
                    os.O_RDONLY | getattr(os, "O_CLOEXEC", 0),
                )
                with os.fdopen(fd, "rb") as f:
                    if f.read(len(CACHEDIR_SIGNATURE)) == CACHEDIR_SIGNATURE:
                        return True
            except OSError:
                pass
        return False
