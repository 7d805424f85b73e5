#!/usr/bin/env python3
"""Compare two file trees entry by entry (stdlib only; uses blake3 when importable).

    python tests/support/treecmp.py SOURCE RESTORED [--owner] [--atime] [--max N]

prints every difference and exits 1, or prints ``IDENTICAL: N entries`` and exits 0.

From Python: ``compare_trees(source, restored)`` returns the list of differences (empty
when identical); ``tree_digest(root)`` records a tree so that it can be compared later
with ``compare_digests`` (e.g. a snapshot's source before it was changed).

Compared for every entry (names are relative bytes paths, the root itself is ``b"."``;
trees are walked with ``os.scandir`` on bytes paths, so names need not be UTF-8):
type; permission bits (``stat.S_IMODE``; not for symlinks); size and a content hash of
regular files; symlink targets; mtime in nanoseconds (``lstat``: files, directories and
symlinks alike); the hardlink partition (which names share an inode, never the inode
numbers); sparseness (a regular file of the source with ``st_blocks * 512 < st_size``
must not have more than its source's allocation + 1 MiB allocated); device numbers;
and optionally uid/gid (``check_owner``) and atime (``check_atime``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "SPARSE_SLACK",
    "Entry",
    "compare_digests",
    "compare_trees",
    "kind_of",
    "tree_digest",
]

#: How many bytes a restored sparse file may have allocated beyond its source.
SPARSE_SLACK = 1 << 20
_BUF = 1 << 20

try:  # blake3 is a project dependency, but the helper works without it
    import blake3 as _blake3

    def _hasher() -> Any:
        return _blake3.blake3()

    HASH_NAME = "blake3"
except ImportError:  # pragma: no cover - depends on the environment

    def _hasher() -> Any:
        return hashlib.sha256()

    HASH_NAME = "sha256"


class Entry(NamedTuple):
    """What ``tree_digest`` records for one entry."""

    kind: str  # file, dir, symlink, fifo, socket, chardev, blockdev, other
    mode: int  # stat.S_IMODE
    size: int  # st_size (for directories: 0, their size depends on the file system)
    mtime_ns: int
    atime_ns: int
    uid: int
    gid: int
    content: bytes | None  # a regular file's content hash, or a symlink's target
    inode: tuple[int, int]  # (st_dev, st_ino): only used to find hardlink groups
    nlink: int
    allocated: int  # st_blocks * 512
    rdev: int  # device number of character and block devices, else 0


def kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "chardev"),
        (stat.S_ISBLK, "blockdev"),
    ):
        if test(mode):
            return name
    return "other"


def _open_noatime(path: bytes) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC
    noatime = getattr(os, "O_NOATIME", 0)
    if noatime:
        try:
            return os.open(path, flags | noatime)
        except PermissionError:  # O_NOATIME needs ownership (or CAP_FOWNER)
            pass
    return os.open(path, flags)


def file_hash(path: bytes | str | os.PathLike[str], buf: bytearray | None = None) -> bytes:
    """The content hash used by ``tree_digest`` (blake3, or sha256 without blake3)."""
    h = _hasher()
    buf = buf if buf is not None else bytearray(_BUF)
    view = memoryview(buf)
    fd = _open_noatime(os.fsencode(path))
    try:
        while n := os.readv(fd, [buf]):
            h.update(view[:n])
    finally:
        os.close(fd)
    digest: bytes = h.digest()
    return digest


def _entry(path: bytes, st: os.stat_result, buf: bytearray) -> Entry:
    kind = kind_of(st.st_mode)
    content: bytes | None = None
    if kind == "file":
        try:
            content = file_hash(path, buf)
        except OSError as e:
            content = f"<unreadable: {e.strerror}>".encode()
    elif kind == "symlink":
        content = os.readlink(path)
    return Entry(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        size=0 if kind == "dir" else st.st_size,
        mtime_ns=st.st_mtime_ns,
        atime_ns=st.st_atime_ns,
        uid=st.st_uid,
        gid=st.st_gid,
        content=content,
        inode=(st.st_dev, st.st_ino),
        nlink=st.st_nlink,
        allocated=st.st_blocks * 512,
        rdev=st.st_rdev if kind in ("chardev", "blockdev") else 0,
    )


def tree_digest(root: Path | str | bytes) -> dict[bytes, Entry]:
    """Record every entry below ``root`` (and ``root`` itself as ``b"."``), hashing content.

    Symlinks are recorded, never followed. Keys are relative bytes paths joined with b"/".
    """
    broot = os.fsencode(root)
    buf = bytearray(_BUF)
    st = os.lstat(broot)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(os.fsdecode(broot))
    out: dict[bytes, Entry] = {b".": _entry(broot, st, buf)}
    stack: list[tuple[bytes, bytes]] = [(broot, b"")]
    while stack:
        path, rel = stack.pop()
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            name = rel + e.name
            st = e.stat(follow_symlinks=False)
            out[name] = _entry(e.path, st, buf)
            if stat.S_ISDIR(st.st_mode):
                stack.append((e.path, name + b"/"))
    return out


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def show(name: bytes) -> str:
    """A printable form of a bytes name: invalid UTF-8 and control characters escaped."""
    return name.decode("utf-8", "backslashreplace").translate(_CONTROL)


def _ns(t: int) -> str:
    return f"{t // 1_000_000_000}.{t % 1_000_000_000:09d}"


def _link_groups(d: dict[bytes, Entry], names: Iterable[bytes]) -> dict[bytes, frozenset[bytes]]:
    by_inode: dict[tuple[int, int], list[bytes]] = {}
    for n in names:
        e = d[n]
        if e.kind != "dir":
            by_inode.setdefault(e.inode, []).append(n)
    return {n: frozenset(group) for group in by_inode.values() for n in group}


def compare_digests(
    a: dict[bytes, Entry],
    b: dict[bytes, Entry],
    *,
    check_owner: bool = False,
    check_atime: bool = False,
) -> list[str]:
    """Differences between two digests; ``a`` is the source (its sparse files set the bar)."""
    out: list[str] = []
    common: list[bytes] = []
    for name in sorted(a.keys() | b.keys()):
        if name not in b:
            out.append(f"missing: {show(name)} ({a[name].kind})")
        elif name not in a:
            out.append(f"extra: {show(name)} ({b[name].kind})")
        elif a[name].kind != b[name].kind:
            out.append(f"type differs: {show(name)}: {a[name].kind} != {b[name].kind}")
        else:
            common.append(name)
            out.extend(_compare_entry(name, a[name], b[name], check_owner, check_atime))
    # hardlinks: the partition of the common names into groups sharing an inode
    ga = _link_groups(a, common)
    gb = _link_groups(b, common)
    pb = set(gb.values())
    reported: set[bytes] = set()
    for group in sorted(set(ga.values()) - pb, key=min):
        if len(group) > 1:  # names linked in the source are split up
            parts = sorted({gb[n] for n in group}, key=min)
            out.append(
                f"hardlinks differ: {show(min(group))}: {_names(group)} are one file in the "
                f"source, {' + '.join(_names(p) for p in parts)} restored"
            )
            reported |= group
    for group in sorted(pb - set(ga.values()), key=min):
        if not group & reported:  # names that are separate files in the source are linked
            parts = sorted({ga[n] for n in group}, key=min)
            out.append(
                f"hardlinks differ: {show(min(group))}: {_names(group)} are one file restored, "
                f"{' + '.join(_names(p) for p in parts)} in the source"
            )
    return out


def _names(group: Iterable[bytes]) -> str:
    return "[" + ", ".join(show(n) for n in sorted(group)) + "]"


def _compare_entry(name: bytes, x: Entry, y: Entry, owner: bool, atime: bool) -> list[str]:
    out: list[str] = []
    n = show(name)
    if x.kind == "file":
        if x.size != y.size:
            out.append(f"size differs: {n}: {x.size} != {y.size}")
        if x.content != y.content:
            out.append(f"content differs: {n}")
        if x.allocated < x.size and y.allocated > x.allocated + SPARSE_SLACK:
            out.append(
                f"not sparse: {n}: {y.allocated} bytes allocated for {y.size}, "
                f"the source has {x.allocated}"
            )
    elif x.kind == "symlink" and x.content != y.content:
        tx = show(x.content or b"")
        ty = show(y.content or b"")
        out.append(f"symlink target differs: {n}: {tx} != {ty}")
    if x.kind != "symlink" and x.mode != y.mode:
        out.append(f"mode differs: {n}: {x.mode:#o} != {y.mode:#o}")
    if x.rdev != y.rdev:
        out.append(f"device differs: {n}: {x.rdev:#x} != {y.rdev:#x}")
    if x.mtime_ns != y.mtime_ns:
        delta = (y.mtime_ns - x.mtime_ns) / 1e9
        out.append(
            f"mtime differs: {n} ({x.kind}): {_ns(x.mtime_ns)} != {_ns(y.mtime_ns)} "
            f"({delta:+.9f} s)"
        )
    if atime and x.atime_ns != y.atime_ns:
        out.append(f"atime differs: {n}: {_ns(x.atime_ns)} != {_ns(y.atime_ns)}")
    if owner and (x.uid, x.gid) != (y.uid, y.gid):
        out.append(f"owner differs: {n}: {x.uid}:{x.gid} != {y.uid}:{y.gid}")
    return out


def compare_trees(
    a: Path | str | bytes,
    b: Path | str | bytes,
    *,
    check_owner: bool = False,
    check_atime: bool = False,
) -> list[str]:
    """Human-readable differences between tree ``a`` (the source) and ``b``; [] if identical."""
    return compare_digests(
        tree_digest(a), tree_digest(b), check_owner=check_owner, check_atime=check_atime
    )


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("source", type=os.fsencode)
    ap.add_argument("restored", type=os.fsencode)
    ap.add_argument("--owner", action="store_true", help="compare uid/gid too")
    ap.add_argument("--atime", action="store_true", help="compare atime too")
    ap.add_argument("--max", type=int, default=0, help="print at most N differences")
    a = ap.parse_args(argv)
    da = tree_digest(a.source)
    db = tree_digest(a.restored)
    diffs = compare_digests(da, db, check_owner=a.owner, check_atime=a.atime)
    if not diffs:
        out(f"IDENTICAL: {len(da)} entries")
        return 0
    shown = diffs[: a.max] if a.max > 0 else diffs
    for line in shown:
        out(line)
    if len(shown) < len(diffs):
        out(f"... and {len(diffs) - len(shown)} more")
    out(f"DIFFERENT: {len(diffs)} differences ({len(da)} entries in source, {len(db)} restored)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
