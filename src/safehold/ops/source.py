"""Reading the source filesystem: metadata capture and exclusion rules."""

from __future__ import annotations

import functools
import grp
import os
import pwd
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

import pathspec

from safehold.errors import UsageError
from safehold.format.tree import Node

CACHEDIR_TAG = "CACHEDIR.TAG"
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"


@functools.lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@functools.lru_cache(maxsize=4096)
def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""


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
        node.target = os.readlink(path)
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
            if os.path.lexists(os.path.join(path, os.fsencode(marker))):
                return True
        if self.caches:
            try:
                with open(os.path.join(path, CACHEDIR_TAG.encode()), "rb") as f:
                    if f.read(len(CACHEDIR_SIGNATURE)) == CACHEDIR_SIGNATURE:
                        return True
            except OSError:
                pass
        return False
