"""Pack objects (``data/<xx>/<id>``): many encrypted blobs plus an encrypted header listing them.

Layout (docs/format.md, "Packs")::

    "SHP1" | sealed pack key (80) | blob 0 | blob 1 | ... | header | u32le len(header) | "SHPE"

Each blob is ``nonce (12) || AES-256-GCM ciphertext || tag (16)`` under the pack key, the nonce
being the blob's number in the pack; the header uses the all-ones nonce.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from safehold.errors import FormatError
from safehold.format.common import (
    FORMAT_VERSION,
    check_id,
    check_version,
    field,
    need_map,
    pack,
    unpack,
)

PACK_MAGIC = b"SHP1"
PACK_END_MAGIC = b"SHPE"
SEALED_KEY_LEN = 80
PACK_PREFIX_LEN = len(PACK_MAGIC) + SEALED_KEY_LEN
TRAILER = struct.Struct("<I4s")
HEADER_NONCE = b"\xff" * 12
BLOB_OVERHEAD = 12 + 16


@dataclass(frozen=True, slots=True)
class PackEntry:
    """A blob's place in a pack: type, content id, offset and stored length in the pack, the
    length of its plaintext, and the codec of its stored form."""

    type: int
    id: bytes
    offset: int
    length: int
    raw_length: int
    codec: int

    def to_list(self) -> list[Any]:
        return [self.type, self.id, self.offset, self.length, self.raw_length, self.codec]

    @classmethod
    def from_list(cls, item: Any, what: str) -> PackEntry:
        if not isinstance(item, list) or len(item) != 6:
            raise FormatError(f"{what} has a malformed blob entry")
        t, bid, off, ln, raw, codec = item
        if not all(isinstance(x, int) and x >= 0 for x in (t, off, ln, raw, codec)):
            raise FormatError(f"{what} has a malformed blob entry")
        if t not in (0, 1) or ln < BLOB_OVERHEAD:
            raise FormatError(f"{what} has a malformed blob entry")
        return cls(t, check_id(bid, f"{what} blob id"), off, ln, raw, codec)


def header_to_bytes(entries: list[PackEntry]) -> bytes:
    return pack({"v": FORMAT_VERSION, "blobs": [e.to_list() for e in entries]})


def header_from_bytes(data: bytes) -> list[PackEntry]:
    what = "pack header"
    obj = need_map(unpack(data, what), what)
    check_version(obj, what)
    return [PackEntry.from_list(x, what) for x in field(obj, "blobs", list, what)]


def check_entries(entries: list[PackEntry], header_offset: int) -> None:
    """Blobs must lie between the pack prefix and the header, in order, without overlap."""
    pos = PACK_PREFIX_LEN
    for e in entries:
        if e.offset < pos:
            raise FormatError("pack header lists overlapping blobs")
        pos = e.offset + e.length
    if pos > header_offset:
        raise FormatError("pack header lists a blob beyond the blob area")


def parse_trailer(tail: bytes, pack_size: int) -> tuple[int, int]:
    """From the last 8 bytes of a pack: (offset, length) of the encrypted header."""
    if len(tail) != TRAILER.size:
        raise FormatError("pack is truncated")
    length, magic = TRAILER.unpack(tail)
    if magic != PACK_END_MAGIC:
        raise FormatError("pack has no valid trailer")
    offset = pack_size - TRAILER.size - length
    if offset < PACK_PREFIX_LEN or length < 16:
        raise FormatError("pack trailer gives an impossible header length")
    return offset, length
