"""Chunking, compression and unit parsing: pure transforms."""

from __future__ import annotations

import io
import os
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safehold.chunker import Chunker, ChunkerParams
from safehold.compress import Codec, Compression, CompressionRules, compress, decompress
from safehold.errors import UsageError
from safehold.units import Duration, parse_duration, parse_size


def _cuts(data: bytes, seed: int, avg: int = 16 << 10) -> list[int]:
    c = Chunker(ChunkerParams.for_avg(avg), seed)
    return [len(x) for x in c.chunks(io.BytesIO(data))]


def test_chunker_is_deterministic_and_keyed() -> None:
    data = random.Random(1).randbytes(1 << 20)
    a = _cuts(data, 11)
    assert a == _cuts(data, 11)
    assert sum(a) == len(data)
    assert a != _cuts(data, 12), "a different seed must move the cut points"
    p = ChunkerParams.for_avg(16 << 10)
    assert all(p.min <= n <= p.max for n in a[:-1])


def test_chunker_resynchronizes_after_an_insert() -> None:
    data = random.Random(2).randbytes(1 << 20)
    shifted = data[:1000] + b"inserted bytes" + data[1000:]
    a, b = _cuts(data, 5), _cuts(shifted, 5)
    # after the first chunk or two, the chunk sizes line up again
    assert set(a[3:]) & set(b[3:])
    assert a[-5:] == b[-5:]


def test_chunker_stream_equals_buffer() -> None:
    data = random.Random(3).randbytes(300_000)
    c = Chunker(ChunkerParams.for_avg(16 << 10), 9)
    assert [bytes(x) for x in c.chunks(io.BytesIO(data))] == [
        bytes(x) for x in c.chunks_of_buffer(data)
    ]


def test_compress_auto_skips_random_data() -> None:
    rnd = os.urandom(1 << 20)
    out, codec = compress(rnd, Compression("auto"))
    assert codec == Codec.NONE and out is rnd
    text = b"hello world, " * 50_000
    out, codec = compress(text, Compression("auto"))
    assert codec == Codec.ZSTD and len(out) < len(text) // 10
    assert decompress(out, codec, len(text)) == text
    assert compress(text, Compression("none"))[1] == Codec.NONE


@given(st.binary(max_size=5000))
def test_compress_roundtrip(data: bytes) -> None:
    for setting in (Compression("auto"), Compression("zstd", 19), Compression("none")):
        out, codec = compress(data, setting)
        assert len(out) <= len(data)
        assert bytes(decompress(out, codec, len(data))) == data


def test_compression_parse_and_rules() -> None:
    assert Compression.parse("zstd,7") == Compression("zstd", 7)
    assert Compression.parse("none").mode == "none"
    for bad in ("gzip", "zstd,x", "zstd,99", ""):
        with pytest.raises(UsageError):
            Compression.parse(bad)
    rules = CompressionRules.parse("auto", ["*.jpg=none", "/data/*.log=zstd,9"])
    assert rules.for_path("/home/a/pic.jpg").mode == "none"
    assert rules.for_path("/data/x.log") == Compression("zstd", 9)
    assert rules.for_path("/home/a/notes.txt").mode == "auto"
    with pytest.raises(UsageError):
        CompressionRules.parse("auto", ["nonsense"])


@pytest.mark.parametrize(
    ("text", "value"),
    [("512K", 512 << 10), ("10M", 10 << 20), ("1.5G", 3 << 29), ("100", 100), ("2MiB", 2 << 20)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "ten", "5X", "-1K"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(UsageError):
        parse_size(bad)


def test_parse_duration() -> None:
    assert parse_duration("1y2m3d4h") == Duration(1, 2, 3, 4)
    assert parse_duration("36h") == Duration(hours=36)
    for bad in ("", "1w", "d3", "1y 2m"):
        with pytest.raises(UsageError):
            parse_duration(bad)


class _Trickle(io.RawIOBase):
    """A stream that returns at most ``step`` bytes per read, like a pipe or a network."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b: memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.step, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("size", [0, 1, 5000, 300_000, 3_000_001])
@pytest.mark.parametrize("step", [7919, 1 << 20])
def test_stream_chunking_equals_whole_buffer_fastcdc(size: int, step: int) -> None:
    """The reused-buffer stream chunker cuts exactly where FastCDC cuts the whole data."""
    from pyfastcdc import FastCDC

    data = random.Random(size).randbytes(size)
    p = ChunkerParams.for_avg(16 << 10)
    c = Chunker(p, 77)
    want = [
        bytes(x.data) for x in FastCDC(p.avg, min_size=p.min, max_size=p.max, seed=77).cut_buf(data)
    ]
    assert [bytes(x) for x in c.chunks(_Trickle(data, step))] == want
    assert [bytes(x) for x in c.chunks(io.BytesIO(data))] == want  # the buffer is reused


def test_seed_bit_63_is_accepted_and_changes_nothing() -> None:
    data = random.Random(9).randbytes(2_000_000)
    low = _cuts(data, 12345)
    assert _cuts(data, 12345 | (1 << 63)) == low
