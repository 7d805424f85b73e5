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


MAX_WINDOW = 1 << 27
"""The largest zstd window a reader accepts (128 MiB, zstd's own default limit); a blob's window
is further bounded by its declared length (:func:`window_for`)."""
_PIECE = 4 << 20
"""Streaming decompression produces at most this much per step, so a declared length never
becomes one allocation before the data is really there."""
_TRUST_DECLARED = 64 << 20
"""A frame declaring more than this is decompressed once as a stream (and counted) before its
output is allocated, so a frame that lies about a large size costs nothing (writers' data blobs
are at most 16 MiB: only large index objects and trees pay the second pass)."""


def window_for(max_len: int) -> int:
    """The window limit for a frame of at most ``max_len`` bytes: a zstd writer never uses a
    window larger than the next power of two of its input (at least 1 KiB); twice that, at least
    1 MiB, at most :data:`MAX_WINDOW`."""
    return min(MAX_WINDOW, max(1 << 20, 2 << max(max_len - 1, 1).bit_length()))


def _decompressor(window: int) -> zstandard.ZstdDecompressor:
    cache: dict[int, zstandard.ZstdDecompressor] | None = getattr(_local, "d", None)
    if cache is None:
        cache = _local.d = {}
    d = cache.get(window)
    if d is None:
        d = cache[window] = zstandard.ZstdDecompressor(max_window_size=window)
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


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_DID_SIZE = (0, 1, 2, 4)
_FCS_SIZE = (0, 2, 4, 8)


def frame_end(data: bytes | memoryview) -> int:
    """Where the zstd frame at the start of ``data`` ends, found from its block headers
    (RFC 8878 §3.1.1) without decompressing anything; ValueError if ``data`` does not begin with
    a complete zstd frame (a skippable frame, an unknown magic, a reserved bit or block type, a
    frame cut short). One step per block: a block header is 3 bytes, so at most ``len(data)/3``
    steps."""
    n = len(data)
    if n < 6 or bytes(data[:4]) != ZSTD_MAGIC:
        raise ValueError("not a zstd frame")
    fhd = data[4]
    if fhd & 0x08:
        raise ValueError("not a zstd frame (reserved bit set)")
    single = fhd & 0x20
    fcs = _FCS_SIZE[fhd >> 6] or (1 if single else 0)
    pos = 5 + (0 if single else 1) + _DID_SIZE[fhd & 3] + fcs
    frm = int.from_bytes
    while True:
        if pos + 3 > n:
            raise ValueError("truncated")
        head = frm(data[pos : pos + 3], "little")
        kind = (head >> 1) & 3
        pos += 3 + (1 if kind == 1 else head >> 3)
        if kind == 3:
            raise ValueError("a block of reserved type")
        if head & 1:
            break
    if fhd & 0x04:
        pos += 4  # content checksum
    if pos > n:
        raise ValueError("truncated")
    return pos


def decompress(
    data: bytes | memoryview,
    codec: int,
    max_len: int,
    *,
    what: str = "blob",
    bound: str = "declared",
) -> bytes | memoryview:
    """The plaintext of a stored payload, never longer than ``max_len`` bytes (FormatError,
    naming ``what`` and the ``bound``: "declared" for a blob's raw length, "allowed" for a limit).

    A zstd payload must be exactly one frame: its block headers are walked first
    (:func:`frame_end`) and a payload with any byte after its frame, or cut short, is refused
    before anything is decompressed. A frame whose declared content size exceeds ``max_len`` is
    refused at once; one that declares its size (every writer's frame) is decompressed into
    exactly that many bytes. A frame that declares no size is first decompressed as a stream,
    :data:`_PIECE` bytes at a time and kept nowhere, and refused as soon as it yields more than
    ``max_len`` bytes; only a frame within the bound is then decompressed into a buffer of its
    exact length (so is a frame declaring more than :data:`_TRUST_DECLARED`). So no call ever
    holds more than ``max_len`` bytes of output (plus one piece), whatever the frame claims, and
    output is allocated only for what the frame really yields. Codec 0 returns ``data`` as it is
    (the caller checks its length).
    """
    if codec == Codec.NONE:
        return data
    if codec != Codec.ZSTD:
        raise FormatError(f"{what} has unknown compression codec {codec}")
    if max_len < 0:
        raise FormatError(f"{what} has an invalid declared length {max_len}")
    try:
        end = frame_end(data)
    except ValueError as e:
        raise FormatError(f"{what} does not decompress: {e}") from None
    if end != len(data):
        raise FormatError(
            f"{what} has {len(data) - end} bytes after its zstd frame (a payload is one frame)"
        )
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise FormatError(f"{what} does not decompress: not a zstd frame") from None
    if declared > max_len:
        raise FormatError(
            f"{what} would decompress to {declared} bytes, more than the {max_len} {bound}"
        )
    dctx = _decompressor(window_for(max_len))
    try:
        if declared < 0:
            declared = _measure(dctx, data, max_len, what, bound)
        elif (
            declared > _TRUST_DECLARED  # a large claim is counted before it is allocated
            and _measure(dctx, data, declared, what, "its frame declares") != declared
        ):
            raise FormatError(
                f"{what} decompresses to fewer bytes than the {declared} its frame declares"
            )
        if declared == 0:
            _measure(dctx, data, 0, what, bound)  # a frame claiming 0 bytes must hold none
            return b""
        # exactly ``declared`` bytes are allocated; a frame yielding more or less is an error
        out: bytes = dctx.decompress(data, max_output_size=declared)
    except zstandard.ZstdError as e:
        raise FormatError(f"{what} does not decompress: {e}") from None
    if len(out) != declared:
        raise FormatError(
            f"{what} decompresses to {len(out)} bytes, its frame declares {declared} (truncated?)"
        )
    return out


def _measure(
    dctx: zstandard.ZstdDecompressor, data: bytes | memoryview, max_len: int, what: str, bound: str
) -> int:
    """How many bytes the frame yields, counted in pieces that are dropped at once; FormatError
    as soon as it passes ``max_len``."""
    total = 0
    with dctx.stream_reader(data, read_across_frames=False) as reader:
        while True:
            piece = reader.read(min(max_len - total + 1, _PIECE))
            if not piece:
                return total
            total += len(piece)
            if total > max_len:
                raise FormatError(f"{what} decompresses to more than the {max_len} bytes {bound}")


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
