"""Snapshot objects (``snapshots/<id>``): the root tree and what, when, where and by whom."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from safehold.format.common import (
    FORMAT_VERSION,
    check_id,
    check_version,
    field,
    need_map,
    opt,
    pack,
    unpack,
)


@dataclass(slots=True)
class Snapshot:
    time_ns: int
    host: str
    user: str
    paths: list[str]
    tree: bytes
    tags: list[str] = dc_field(default_factory=list)
    parent: bytes | None = None
    uid: int = 0
    gid: int = 0
    program: str = ""
    summary: dict[str, Any] = dc_field(default_factory=dict)
    original: bytes | None = None  # a copy's source snapshot id (``safehold copy``); else None
    id: str = ""  # the storage id, set when loaded or saved; not serialized

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "time": self.time_ns,
            "host": self.host,
            "user": self.user,
            "uid": self.uid,
            "gid": self.gid,
            "paths": self.paths,
            "tags": self.tags,
            "parent": self.parent,
            "tree": self.tree,
            "program": self.program,
            "summary": self.summary,
        }
        if self.original is not None:
            obj["original"] = self.original  # written only by copies: other snapshots unchanged
        return pack(obj)

    @classmethod
    def from_bytes(cls, data: bytes, snapshot_id: str = "") -> Snapshot:
        what = "snapshot"
        obj = need_map(unpack(data, what), what)
        check_version(obj, what)
        parent = obj.get("parent")
        original = obj.get("original")
        paths = field(obj, "paths", list, what)
        tags = opt(obj, "tags", list, what, [])
        if not all(isinstance(x, str) for x in paths + tags):
            from safehold.errors import FormatError

            raise FormatError("snapshot paths and tags must be strings")
        return cls(
            time_ns=field(obj, "time", int, what),
            host=field(obj, "host", str, what),
            user=field(obj, "user", str, what),
            paths=paths,
            tree=check_id(obj.get("tree"), "snapshot tree"),
            tags=tags,
            parent=None if parent is None else check_id(parent, "snapshot parent"),
            uid=opt(obj, "uid", int, what, 0),
            gid=opt(obj, "gid", int, what, 0),
            program=opt(obj, "program", str, what, ""),
            summary=opt(obj, "summary", dict, what, {}),
            original=None if original is None else check_id(original, "snapshot original"),
            id=snapshot_id,
        )
