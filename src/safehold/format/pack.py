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
MAX_BLOB_LEN = 1 << 30
"""A blob's plaintext (``raw_length``) is at most 1 GiB, its stored form at most 1 GiB + 28
bytes: data blobs are chunks (at most 16 MiB), tree blobs one directory each."""
MAX_HEADER_LEN = (1 << 30) + (1 << 20)
"""The encrypted header of a pack is at most 1 GiB + 1 MiB (writers' packs are at most 1 GiB
plus slack, header included), and at most the pack's size minus 92: checked from the trailer
before the header is read."""
ENTRY_MAX_BYTES = 72
"""An entry takes at most 65 bytes of msgpack (72 is allowed); so a header of L bytes lists at most
(L - 16) / 40 blobs (an entry takes at least 40 bytes) and a pack with a blob area of A bytes at
most A / 28 blobs (each stores at least 28 bytes)."""


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
        if t not in (0, 1) or ln < BLOB_OVERHEAD or codec > 255:
            raise FormatError(f"{what} has a malformed blob entry")
        if raw > MAX_BLOB_LEN or ln > MAX_BLOB_LEN + BLOB_OVERHEAD:
            raise FormatError(f"{what} lists a blob larger than 1 GiB")
        return cls(t, check_id(bid, f"{what} blob id"), off, ln, raw, codec)


def header_to_bytes(entries: list[PackEntry]) -> bytes:
    return pack({"v": FORMAT_VERSION, "blobs": [e.to_list() for e in entries]})


def header_from_bytes(data: bytes) -> list[PackEntry]:
    what = "pack header"
    obj = need_map(unpack(data, what), what)
    check_version(obj, what)
    return [PackEntry.from_list(x, what) for x in field(obj, "blobs", list, what)]


def check_entries(entries: list[PackEntry], header_offset: int) -> None:
    """Blobs must lie between the pack prefix and the header, in order, without overlap (which
    also bounds their number by the blob area / 28)."""
    if len(entries) > max(header_offset - PACK_PREFIX_LEN, 0) // BLOB_OVERHEAD:
        raise FormatError("pack header lists more blobs than its blob area can hold")
    pos = PACK_PREFIX_LEN
    for e in entries:
        if e.offset < pos:
            raise FormatError("pack header lists overlapping blobs")
        pos = e.offset + e.length
    if pos > header_offset:
        raise FormatError("pack header lists a blob beyond the blob area")


def parse_trailer(tail: bytes, pack_size: int, max_header: int = MAX_HEADER_LEN) -> tuple[int, int]:
    """From the last 8 bytes of a pack: (offset, length) of the encrypted header. The length
    must leave room for the pack's prefix and be at most ``max_header`` (FormatError), so a
    forged trailer never makes a reader load more than that."""
    if len(tail) != TRAILER.size:
        raise FormatError("pack is truncated")
    length, magic = TRAILER.unpack(tail)
    if magic != PACK_END_MAGIC:
        raise FormatError("pack has no valid trailer")
    offset = pack_size - TRAILER.size - length
    if offset < PACK_PREFIX_LEN or length < 16:
        raise FormatError(
            f"pack trailer gives an impossible header length ({length} bytes in a pack of "
            f"{pack_size})"
        )
    if length > max_header:
        raise FormatError(f"pack trailer gives a header of {length} bytes, over {max_header}")
    if length > 16 + 15 + ENTRY_MAX_BYTES * ((offset - PACK_PREFIX_LEN) // BLOB_OVERHEAD):
        raise FormatError(
            f"pack trailer gives a header of {length} bytes, more than its "
            f"{offset - PACK_PREFIX_LEN} bytes of blobs can need"
        )
    return offset, length
