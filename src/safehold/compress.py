"""Compression: zstd with an ``auto`` mode that skips data that does not compress. No I/O."""

from __future__ import annotations

import enum
import fnmatch
import threading
from dataclasses import dataclass

import zstandard

from safehold.errors import FormatError, UsageError


class Codec(enum.IntEnum):
    """How a blob's plaintext is stored (recorded per blob in the pack header and index)."""

    NONE = 0
    ZSTD = 1


@dataclass(frozen=True, slots=True)
class Compression:
    """A compression setting: ``auto`` (zstd unless a sample shows the data won't shrink),
    ``zstd[,LEVEL]`` (always) or ``none``."""

    mode: str = "auto"
    level: int = 3

    @classmethod
    def parse(cls, text: str) -> Compression:
        name, _, level = text.strip().lower().partition(",")
        if name not in ("auto", "zstd", "none") or (level and not level.lstrip("-").isdigit()):
            raise UsageError(f"invalid compression {text!r} (expected auto, zstd[,LEVEL] or none)")
        lvl = int(level) if level else 3
        if not -7 <= lvl <= 22:
            raise UsageError(f"invalid zstd level {lvl} (expected -7 to 22)")
        return cls(name, lvl)

    def __str__(self) -> str:
        return self.mode if self.mode == "none" or self.level == 3 else f"{self.mode},{self.level}"


SAMPLE = 16 * 1024
"""``auto`` compresses a sample this large at a fast level before compressing the whole chunk."""
SAMPLE_RATIO = 0.97
"""... and stores the chunk raw when the sample does not shrink below this ratio."""

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "c", None)
    if cache is None:
        cache = _local.c = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def compress(data: bytes | memoryview, setting: Compression) -> tuple[bytes | memoryview, Codec]:
    """Compress ``data``; returns the bytes to store and the codec used.

    ``auto`` compresses a sample first and keeps data that would not shrink as it is, so
    incompressible data (photos, archives, encrypted files) costs one small trial, not a full pass.
    Whatever the mode, the result is never larger than the input plus nothing: if compression does
    not help, the raw data is kept.
    """
    if setting.mode == "none" or len(data) < 64:
        return data, Codec.NONE
    if setting.mode == "auto" and len(data) > 4 * SAMPLE:
        mid = len(data) // 2
        sample = memoryview(data)[mid : mid + SAMPLE]
        if len(_compressor(1).compress(sample)) > SAMPLE_RATIO * len(sample):
            return data, Codec.NONE
    out = _compressor(setting.level).compress(data)
    if len(out) >= len(data):
        return data, Codec.NONE
    return out, Codec.ZSTD


def decompress(data: bytes | memoryview, codec: int, raw_len: int) -> bytes | memoryview:
    if codec == Codec.NONE:
        return data
    if codec == Codec.ZSTD:
        try:
            out: bytes = _decompressor().decompress(data, max_output_size=raw_len)
        except zstandard.ZstdError as e:
            raise FormatError(f"blob does not decompress: {e}") from None
        return out
    raise FormatError(f"unknown compression codec {codec}")


@dataclass(frozen=True, slots=True)
class CompressionRules:
    """The default setting plus per-path overrides (``--compression-for '*.jpg=none'``)."""

    default: Compression = Compression()
    overrides: tuple[tuple[str, Compression], ...] = ()

    @classmethod
    def parse(cls, default: str, overrides: list[str]) -> CompressionRules:
        rules = []
        for item in overrides:
            glob, sep, setting = item.rpartition("=")
            if not sep or not glob:
                raise UsageError(f"invalid --compression-for {item!r} (expected GLOB=SETTING)")
            rules.append((glob, Compression.parse(setting)))
        return cls(Compression.parse(default), tuple(rules))

    def for_path(self, path: str) -> Compression:
        """The setting for a file: the last matching override (by full path or base name)."""
        base = path.rsplit("/", 1)[-1]
        for glob, setting in reversed(self.overrides):
            if fnmatch.fnmatchcase(base, glob) or fnmatch.fnmatchcase(path, glob):
                return setting
        return self.default
