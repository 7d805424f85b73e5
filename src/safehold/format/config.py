"""The repository config object (``config``): a clear header, then a meta-encrypted body."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from safehold.errors import FormatError, UnsupportedVersion
from safehold.format.common import (
    FORMAT_VERSION,
    check_version,
    field,
    need_map,
    pack,
    unpack,
)

CONFIG_MAGIC = b"SAFEHOLD"
"""``config`` starts with these 8 bytes and a little-endian u16 format version, unencrypted."""
CONFIG_HEADER = struct.Struct("<8sH")

# Bounds a reader checks every config against (docs/format.md §6). The chunker's are those of
# FastCDC 2020 itself (init is stricter: avg 4 KiB ... 4 MiB, min = max(avg/4, 1 KiB), max = 4 avg).
CHUNK_MIN_RANGE = (64, 1 << 20)
CHUNK_AVG_RANGE = (256, 4 << 20)
CHUNK_MAX_RANGE = (1 << 10, 16 << 20)
CHUNK_NC_RANGE = (0, 3)
PACK_SIZE_RANGE = (1 << 20, 1 << 30)


@dataclass(frozen=True, slots=True)
class Config:
    repo_id: bytes  # 16 random bytes
    chunk_avg: int
    chunk_min: int
    chunk_max: int
    chunk_normalization: int
    compression: str
    pack_size: int
    public_key: bytes
    created_ns: int

    def to_bytes(self) -> bytes:
        return pack(
            {
                "v": FORMAT_VERSION,
                "repo_id": self.repo_id,
                "chunker": {
                    "algo": "fastcdc2020",
                    "avg": self.chunk_avg,
                    "min": self.chunk_min,
                    "max": self.chunk_max,
                    "nc": self.chunk_normalization,
                },
                "compression": self.compression,
                "pack_size": self.pack_size,
                "public_key": self.public_key,
                "created": self.created_ns,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Config:
        what = "repository config"
        obj = need_map(unpack(data, what), what)
        check_version(obj, what)
        ch = need_map(field(obj, "chunker", dict, what), what)
        if field(ch, "algo", str, what) != "fastcdc2020":
            raise FormatError("repository config names an unknown chunker")
        config = cls(
            repo_id=field(obj, "repo_id", bytes, what),
            chunk_avg=field(ch, "avg", int, what),
            chunk_min=field(ch, "min", int, what),
            chunk_max=field(ch, "max", int, what),
            chunk_normalization=field(ch, "nc", int, what),
            compression=field(obj, "compression", str, what),
            pack_size=field(obj, "pack_size", int, what),
            public_key=field(obj, "public_key", bytes, what),
            created_ns=field(obj, "created", int, what),
        )
        problem = config.problem()
        if problem is not None:
            raise FormatError(f"repository config is invalid: {problem}")
        return config

    def problem(self) -> str | None:
        """What is out of the documented bounds (docs/format.md §6), or None."""
        if len(self.repo_id) != 16:
            return "repo_id is not 16 bytes"
        if len(self.public_key) != 32:
            return "public_key is not 32 bytes"
        for label, value, (lo, hi) in (
            ("chunker min", self.chunk_min, CHUNK_MIN_RANGE),
            ("chunker avg", self.chunk_avg, CHUNK_AVG_RANGE),
            ("chunker max", self.chunk_max, CHUNK_MAX_RANGE),
            ("chunker nc", self.chunk_normalization, CHUNK_NC_RANGE),
            ("pack_size", self.pack_size, PACK_SIZE_RANGE),
        ):
            if not lo <= value <= hi:
                return f"{label} {value} is outside {lo} ... {hi}"
        if not self.chunk_min <= self.chunk_avg <= self.chunk_max:
            return (
                f"chunker sizes are not ordered (min {self.chunk_min}, avg {self.chunk_avg}, "
                f"max {self.chunk_max})"
            )
        if not _valid_compression(self.compression):
            return f"unknown compression {self.compression[:40]!r}"
        if self.created_ns < 0:
            return "created is negative"
        return None


def _valid_compression(text: str) -> bool:
    """``auto``, ``zstd`` or ``none``, optionally ``,LEVEL`` with LEVEL -7 ... 22 (as
    :meth:`safehold.compress.Compression.parse` reads it)."""
    name, sep, level = text.partition(",")
    if name not in ("auto", "zstd", "none"):
        return False
    if not sep:
        return True
    digits = level[1:] if level.startswith("-") else level
    return digits.isascii() and digits.isdigit() and len(digits) <= 2 and -7 <= int(level) <= 22


def config_header() -> bytes:
    return CONFIG_HEADER.pack(CONFIG_MAGIC, FORMAT_VERSION)


def split_config(data: bytes) -> bytes:
    """Check the clear header of a stored config; returns the encrypted body."""
    if len(data) < CONFIG_HEADER.size:
        raise FormatError("repository config is truncated")
    magic, version = CONFIG_HEADER.unpack_from(data)
    if magic != CONFIG_MAGIC:
        raise FormatError("this is not a safehold repository (config has a wrong magic)")
    if version > FORMAT_VERSION:
        raise UnsupportedVersion(
            f"the repository has format version {version}, this safehold reads up to "
            f"{FORMAT_VERSION}: upgrade safehold"
        )
    if version < 1:
        raise FormatError(f"repository format version {version} is invalid")
    return data[CONFIG_HEADER.size :]
