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
        what = "tree entry"
        obj = need_map(raw, what)
        name = field(obj, "name", bytes, what)
        typ = field(obj, "type", str, what)
        if typ not in NODE_TYPES:
            raise FormatError(f"tree entry has unknown type {typ!r}")
        node = cls(
            name=name,
            type=typ,
            mode=field(obj, "mode", int, what),
            uid=field(obj, "uid", int, what),
            gid=field(obj, "gid", int, what),
            user=field(obj, "user", str, what),
            group=field(obj, "group", str, what),
            mtime_ns=field(obj, "mtime", int, what),
            ctime_ns=field(obj, "ctime", int, what),
            atime_ns=field(obj, "atime", int, what),
            size=field(obj, "size", int, what),
            dev=field(obj, "dev", int, what),
            ino=field(obj, "ino", int, what),
            nlink=field(obj, "nlink", int, what),
            rdev=obj.get("rdev", 0) if isinstance(obj.get("rdev", 0), int) else 0,
            target=obj.get("target", b"") if isinstance(obj.get("target", b""), bytes) else b"",
        )
        if "content" in obj:
            content = field(obj, "content", list, what)
            if not all(isinstance(c, bytes) and len(c) == 32 for c in content):
                raise FormatError("tree entry has a malformed content id")
            node.content = content
        if "subtree" in obj:
            sub = field(obj, "subtree", bytes, what)
            if len(sub) != 32:
                raise FormatError("tree entry has a malformed subtree id")
            node.subtree = sub
        if "xattrs" in obj:
            xa = field(obj, "xattrs", dict, what)
            if not all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in xa.items()):
                raise FormatError("tree entry has malformed xattrs")
            node.xattrs = xa
        if typ == "file" and node.content is None:
            raise FormatError("file entry has no content list")
        if typ == "dir" and node.subtree is None:
            raise FormatError("directory entry has no subtree")
        return node


def tree_to_bytes(nodes: list[Node]) -> bytes:
    nodes = sorted(nodes, key=lambda n: n.name)
    return pack({"v": FORMAT_VERSION, "nodes": [n.to_obj() for n in nodes]})


def tree_from_bytes(data: bytes | memoryview) -> list[Node]:
    what = "tree"
    obj = need_map(unpack(data, what), what)
    check_version(obj, what)
    return [Node.from_obj(x) for x in field(obj, "nodes", list, what)]
