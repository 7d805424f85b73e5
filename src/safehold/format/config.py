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
        return cls(
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
