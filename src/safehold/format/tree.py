"""Tree blobs: one per directory, its entries sorted by name (bytes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from safehold.errors import FormatError
from safehold.format.common import FORMAT_VERSION, check_version, field, need_map, pack, unpack

NODE_TYPES = ("file", "dir", "symlink", "fifo", "chardev", "blockdev", "socket")


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
        if node.type == "file" and content is None:
            raise FormatError("file entry has no content list")
        if node.type == "dir" and sub is None:
            raise FormatError("directory entry has no subtree")
        return node


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
    what = "tree"
    obj = need_map(unpack(data, what), what)
    check_version(obj, what)
    return [Node.from_obj(x) for x in field(obj, "nodes", list, what)]
