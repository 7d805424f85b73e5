"""Index objects (``index/<id>``): which blobs each pack holds and where, and its sealed key."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from safehold.errors import FormatError
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
from safehold.format.pack import SEALED_KEY_LEN, PackEntry


@dataclass(frozen=True, slots=True)
class IndexedPack:
    pack_id: bytes
    size: int
    sealed_key: bytes
    blobs: list[PackEntry]


@dataclass(slots=True)
class IndexFile:
    packs: list[IndexedPack] = dc_field(default_factory=list)
    supersedes: list[bytes] = dc_field(default_factory=list)
    damaged: list[tuple[bytes, bytes]] = dc_field(default_factory=list)
    """(pack id, blob id): copies found damaged. They are not read first and never deduplicated
    against, so the next backup stores such a blob again (docs/format.md §9.4)."""

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "packs": [
                {
                    "id": p.pack_id,
                    "size": p.size,
                    "key": p.sealed_key,
                    "blobs": [b.to_list() for b in p.blobs],
                }
                for p in self.packs
            ],
            "supersedes": list(self.supersedes),
        }
        if self.damaged:
            obj["damaged"] = [[p, b] for p, b in self.damaged]
        return pack(obj)

    @classmethod
    def from_bytes(cls, data: bytes) -> IndexFile:
        what = "index"
        obj = need_map(unpack(data, what), what)
        check_version(obj, what)
        packs = []
        for p in field(obj, "packs", list, what):
            p = need_map(p, what)
            key = field(p, "key", bytes, what)
            if len(key) != SEALED_KEY_LEN:
                raise FormatError("index has a malformed pack key")
            packs.append(
                IndexedPack(
                    pack_id=check_id(p.get("id"), "index pack id"),
                    size=field(p, "size", int, what),
                    sealed_key=key,
                    blobs=[PackEntry.from_list(b, what) for b in field(p, "blobs", list, what)],
                )
            )
        sup: list[Any] = opt(obj, "supersedes", list, what, [])
        damaged: list[tuple[bytes, bytes]] = []
        for d in opt(obj, "damaged", list, what, []):
            if not isinstance(d, list) or len(d) != 2:
                raise FormatError("index has a malformed damage record")
            damaged.append((check_id(d[0], "damaged pack id"), check_id(d[1], "damaged blob id")))
        return cls(packs, [check_id(s, "superseded index id") for s in sup], damaged)
