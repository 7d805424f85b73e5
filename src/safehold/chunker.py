"""Content-defined chunking: FastCDC (2020) keyed with a per-repository seed. No I/O of its own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from pyfastcdc import FastCDC

DEFAULT_AVG = 1 << 20


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


@dataclass(frozen=True, slots=True)
class ChunkerParams:
    """FastCDC parameters, fixed for a repository at init (stored in its config)."""

    avg: int = DEFAULT_AVG
    min: int = DEFAULT_AVG // 4
    max: int = DEFAULT_AVG * 4
    normalization: int = 1

    @classmethod
    def for_avg(cls, avg: int) -> ChunkerParams:
        if not 1 << 12 <= avg <= 1 << 22:
            raise ValueError("the average chunk size must be between 4 KiB and 4 MiB")
        return cls(avg, max(avg // 4, 1024), avg * 4)


class Chunker:
    """Cuts a stream into chunks; one instance per thread (FastCDC objects are not shared)."""

    def __init__(self, params: ChunkerParams, seed: int) -> None:
        self.params = params
        self._cdc: Any = FastCDC(
            params.avg,
            min_size=params.min,
            max_size=params.max,
            normalized_chunking=params.normalization,  # type: ignore[arg-type]
            # bits 48-63 of the seed never reach FastCDC's masks (docs/format.md §13), and the
            # compiled pyfastcdc refuses seeds >= 2**63: dropping bit 63 changes no cut point
            seed=seed & ((1 << 63) - 1),
        )
        self._buf = bytearray(max(2 * params.max, 1 << 20))

    def chunks(self, stream: Readable) -> Iterator[memoryview]:
        """The chunks of ``stream``; each view is valid only until the next one is produced.

        Reads into one buffer that this chunker reuses for every stream (no fresh memory per
        file). A chunk is cut only when at least ``max`` bytes follow its start in the buffer, or
        the stream has ended, so the cut points are exactly FastCDC's over the whole stream.
        """
        buf = self._buf
        view = memoryview(buf)
        filled = 0
        eof = False
        max_size = self.params.max
        while True:
            while not eof and filled < len(buf):
                n = stream.readinto(view[filled:])
                if not n:
                    eof = True
                else:
                    filled += n
            if filled == 0:
                return
            pos = 0
            for chunk in self._cdc.cut_buf(view[:filled]):
                if not eof and chunk.offset + max_size > filled:
                    break  # not enough data after this chunk's start to be sure of its end
                yield chunk.data
                pos = chunk.offset + chunk.length
            if eof and pos >= filled:
                return
            buf[: filled - pos] = view[pos:filled]
            filled -= pos

    def chunks_of_buffer(self, buf: bytes | memoryview) -> Iterator[memoryview]:
        for chunk in self._cdc.cut_buf(buf):
            yield chunk.data
