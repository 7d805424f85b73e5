"""Content-defined chunking: FastCDC (2020) keyed with a per-repository seed. No I/O of its own."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from pyfastcdc import FastCDC

DEFAULT_AVG = 1 << 20


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
            seed=seed,
        )

    def chunks(self, stream: BinaryIO) -> Iterator[memoryview]:
        """The chunks of ``stream``; each view is valid only until the next one is produced."""
        for chunk in self._cdc.cut_stream(stream):
            yield chunk.data

    def chunks_of_buffer(self, buf: bytes | memoryview) -> Iterator[memoryview]:
        for chunk in self._cdc.cut_buf(buf):
            yield chunk.data
