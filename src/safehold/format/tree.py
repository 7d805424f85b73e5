"""Tree blobs: one per directory, its entries sorted by name (bytes)."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Any

from safehold.errors import FormatError
from safehold.format.common import FORMAT_VERSION, check_version, field, need_map, pack, unpack

NODE_TYPES = ("file", "dir", "symlink", "fifo", "chardev", "blockdev", "socket")

# the bounds of a node's numeric fields (docs/format.md §10): a tree holding a value outside them
# is refused as damaged or forged, before any of it can reach a system call
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1
MODE_MAX = 0o177777
FILE_TYPE_BITS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "chardev": stat.S_IFCHR,
    "blockdev": stat.S_IFBLK,
    "socket": stat.S_IFSOCK,
}
"""The ``st_mode`` file-type bits of each node type."""
_MODE_TYPES = frozenset((0, *FILE_TYPE_BITS.values()))

# the bounds of a node's variable-length fields (docs/format.md §10), each above the limit the
# systems safehold backs up put on it (so that an honest backup never writes more): a tree holding
# a longer one is refused as damaged or forged
NAME_MAX = 4096
"""Bytes of an entry's name (Linux and macOS: 255; PATH_MAX is 4096)."""
TARGET_MAX = 65536
"""Bytes of a symlink's target (Linux: below PATH_MAX, 4096; readlink returns at most that)."""
OWNER_MAX = 1024
"""Bytes (UTF-8) of a user or group name (glibc: LOGIN_NAME_MAX 256; useradd: 32)."""
XATTR_NAME_MAX = 255
"""Bytes of an extended attribute's name (Linux: XATTR_NAME_MAX 255)."""
XATTR_VALUE_MAX = 65536
"""Bytes of an extended attribute's value (Linux: XATTR_SIZE_MAX 65536)."""
XATTR_COUNT_MAX = 16384
"""Extended attributes of one entry (Linux: listxattr returns their names NUL-terminated in at
most XATTR_LIST_MAX = 65536 bytes, each at least 4 bytes: a namespace prefix such as ``user.``
and a NUL; so fewer than 16,384)."""


@dataclass(slots=True)
class Node:
    """One directory entry. ``name`` is bytes so that non-UTF-8 names survive."""

    name: bytes
    type: str
    mode: int = 0
    uid: int = 0
    gid: int = 0
    user: str = ""
    group: str = ""
    mtime_ns: int = 0
    ctime_ns: int = 0
    atime_ns: int = 0
    size: int = 0
    dev: int = 0
    ino: int = 0
    nlink: int = 1
    rdev: int = 0
    target: bytes = b""
    content: list[bytes] | None = None
    subtree: bytes | None = None
    xattrs: dict[bytes, bytes] | None = None

    def to_obj(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "mode": self.mode,
            "uid": self.uid,
            "gid": self.gid,
            "user": self.user,
            "group": self.group,
            "mtime": self.mtime_ns,
            "ctime": self.ctime_ns,
            "atime": self.atime_ns,
            "size": self.size,
            "dev": self.dev,
            "ino": self.ino,
            "nlink": self.nlink,
        }
        if self.rdev:
            obj["rdev"] = self.rdev
        if self.type == "symlink":
            obj["target"] = self.target
        if self.content is not None:
            obj["content"] = self.content
        if self.subtree is not None:
            obj["subtree"] = self.subtree
        if self.xattrs:
            obj["xattrs"] = self.xattrs
        return obj

    @classmethod
    def from_obj(cls, raw: Any) -> Node:
        # the hot path of incremental backups (every parent tree is parsed): one dict lookup per
        # field, then one pass of exact type checks
        if type(raw) is not dict:
            raise FormatError("tree entry is not a map")
        get = raw.get
        try:
            node = cls(
                raw["name"],
                raw["type"],
                raw["mode"],
                raw["uid"],
                raw["gid"],
                raw["user"],
                raw["group"],
                raw["mtime"],
                raw["ctime"],
                raw["atime"],
                raw["size"],
                raw["dev"],
                raw["ino"],
                raw["nlink"],
                get("rdev", 0),
                get("target", b""),
                get("content"),
                get("subtree"),
                get("xattrs"),
            )
        except KeyError as e:
            raise FormatError(f"tree entry lacks field {e.args[0]!r}") from None
        if (
            type(node.name) is not bytes
            or node.type not in NODE_TYPES
            or type(node.user) is not str
            or type(node.group) is not str
            or type(node.target) is not bytes
            or not all(type(x) is int for x in _ints(node))
        ):
            raise FormatError("tree entry has a field of the wrong type")
        content, sub, xa = node.content, node.subtree, node.xattrs
        if content is not None and (
            type(content) is not list or not all(type(c) is bytes and len(c) == 32 for c in content)
        ):
            raise FormatError("tree entry has a malformed content id")
        if sub is not None and (type(sub) is not bytes or len(sub) != 32):
            raise FormatError("tree entry has a malformed subtree id")
        if xa is not None and (
            type(xa) is not dict
            or not all(type(k) is bytes and type(v) is bytes for k, v in xa.items())
        ):
            raise FormatError("tree entry has malformed xattrs")
        if (
            len(node.name) > NAME_MAX
            or len(node.target) > TARGET_MAX
            or not _owner_ok(node.user)
            or not _owner_ok(node.group)
            or (xa is not None and not _xattrs_ok(xa))
        ):
            raise FormatError(_too_long(node))
        if node.type == "file" and content is None:
            raise FormatError("file entry has no content list")
        if node.type == "dir" and sub is None:
            raise FormatError("directory entry has no subtree")
        if not (
            0 <= node.mode <= MODE_MAX
            and 0 <= node.uid <= U32_MAX
            and 0 <= node.gid <= U32_MAX
            and I64_MIN <= node.mtime_ns <= I64_MAX
            and I64_MIN <= node.ctime_ns <= I64_MAX
            and I64_MIN <= node.atime_ns <= I64_MAX
            and 0 <= node.size <= I64_MAX
            and 0 <= node.dev <= U64_MAX
            and 0 <= node.ino <= U64_MAX
            and 0 <= node.nlink <= U64_MAX
            and 0 <= node.rdev <= U64_MAX
            and stat.S_IFMT(node.mode) in _MODE_TYPES
        ):
            raise FormatError(_out_of_bounds(node))
        return node


_BOUNDS = (
    ("uid", 0, U32_MAX),
    ("gid", 0, U32_MAX),
    ("mtime_ns", I64_MIN, I64_MAX),
    ("ctime_ns", I64_MIN, I64_MAX),
    ("atime_ns", I64_MIN, I64_MAX),
    ("size", 0, I64_MAX),
    ("dev", 0, U64_MAX),
    ("ino", 0, U64_MAX),
    ("nlink", 0, U64_MAX),
    ("rdev", 0, U64_MAX),
)


def _out_of_bounds(node: Node) -> str:
    """Which field of ``node`` is outside its bounds, as an error message."""
    what = f"tree entry {node.name!r}"
    if not 0 <= node.mode <= MODE_MAX:
        return f"{what} has mode {node.mode}, outside 0..0o{MODE_MAX:o}"
    if stat.S_IFMT(node.mode) not in _MODE_TYPES:
        return f"{what} has mode 0o{node.mode:o}, of no known file type"
    for key, lo, hi in _BOUNDS:
        value = getattr(node, key)
        if not lo <= value <= hi:
            return f"{what} has {key.removesuffix('_ns')} {value}, outside {lo}..{hi}"
    raise AssertionError("no field out of bounds")  # pragma: no cover


def _owner_ok(name: str) -> bool:
    # a str of n characters encodes to n ... 4n bytes of UTF-8: only those in between are encoded
    # (never a huge one: encoding it would cost as much again)
    n = len(name)
    return n * 4 <= OWNER_MAX or (
        n <= OWNER_MAX and len(name.encode("utf-8", "surrogateescape")) <= OWNER_MAX
    )


def _xattrs_ok(xa: dict[bytes, bytes]) -> bool:
    return len(xa) <= XATTR_COUNT_MAX and all(
        len(k) <= XATTR_NAME_MAX and len(v) <= XATTR_VALUE_MAX for k, v in xa.items()
    )


def _too_long(node: Node) -> str:
    """Which variable-length field of ``node`` exceeds its bound, as an error message."""
    what = f"tree entry {node.name[:64]!r}{'...' if len(node.name) > 64 else ''}"
    if len(node.name) > NAME_MAX:
        return f"{what} has a name of {len(node.name)} bytes, more than {NAME_MAX}"
    if len(node.target) > TARGET_MAX:
        return f"{what} has a target of {len(node.target)} bytes, more than {TARGET_MAX}"
    for key in ("user", "group"):
        if not _owner_ok(getattr(node, key)):
            return f"{what} has a {key} name longer than {OWNER_MAX} bytes"
    xa = node.xattrs or {}
    if len(xa) > XATTR_COUNT_MAX:
        return f"{what} has {len(xa)} xattrs, more than {XATTR_COUNT_MAX}"
    for k, v in xa.items():
        if len(k) > XATTR_NAME_MAX:
            return f"{what} has an xattr name of {len(k)} bytes, more than {XATTR_NAME_MAX}"
        if len(v) > XATTR_VALUE_MAX:
            return f"{what} has an xattr value of {len(v)} bytes, more than {XATTR_VALUE_MAX}"
    raise AssertionError("no field too long")  # pragma: no cover


def _ints(n: Node) -> tuple[int, ...]:
    return (
        n.mode,
        n.uid,
        n.gid,
        n.mtime_ns,
        n.ctime_ns,
        n.atime_ns,
        n.size,
        n.dev,
        n.ino,
        n.nlink,
        n.rdev,
    )


def tree_to_bytes(nodes: list[Node]) -> bytes:
    nodes = sorted(nodes, key=lambda n: n.name)
    return pack({"v": FORMAT_VERSION, "nodes": [n.to_obj() for n in nodes]})


def tree_from_bytes(data: bytes | memoryview) -> list[Node]:
    """A tree's nodes; :class:`FormatError` if the tree or any of its entries is invalid."""
    return [Node.from_obj(x) for x in _raw_nodes(data)]


def salvage_tree(data: bytes | memoryview) -> tuple[list[Node], list[tuple[bytes, FormatError]]]:
    """The valid entries of a tree that :func:`tree_from_bytes` refuses, and for each invalid
    entry its name (``b""`` if the name itself is unreadable) and the error: so that damage to
    one entry costs only that entry. Raises :class:`FormatError` when the tree as a whole is
    invalid (not msgpack, not a map, unknown version, no list of entries)."""
    nodes: list[Node] = []
    bad: list[tuple[bytes, FormatError]] = []
    for raw in _raw_nodes(data):
        try:
            nodes.append(Node.from_obj(raw))
        except FormatError as e:
            name = raw.get("name") if type(raw) is dict else None
            bad.append((name if type(name) is bytes else b"", e))
    return nodes, bad


def _raw_nodes(data: bytes | memoryview) -> list[Any]:
    what = "tree"
    # no field may be longer than 64 KiB (below); one beyond 16 MiB is refused before it is
    # even allocated (costing the whole tree: no honest field comes near)
    obj = need_map(unpack(data, what, max_field=16 << 20), what)
    check_version(obj, what)
    nodes: list[Any] = field(obj, "nodes", list, what)
    return nodes
