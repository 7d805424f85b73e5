"""Restore's hole-preserving writer: whatever the layout of zeros, the file reads back exactly."""

from __future__ import annotations

import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from safehold.ops.restore import HOLE_BLOCK, _write_sparse

K = HOLE_BLOCK


def _restore_like(blobs: list[bytes]) -> bytes:
    """What restore does: all-zero blobs are skipped, the rest written sparsely, then the file is
    extended to its size when the last bytes were not written."""
    with tempfile.TemporaryFile() as f:
        fd = f.fileno()
        pos = end = 0
        for b in blobs:
            if b.count(0) != len(b):
                end = max(end, _write_sparse(fd, memoryview(b), pos))
            pos += len(b)
        if end != pos:
            os.ftruncate(fd, pos)
        f.seek(0)
        return f.read()


def test_blob_ending_in_aligned_zero_blocks_keeps_its_length() -> None:
    # the regression: a blob whose last bytes are whole zero blocks made a short file
    data = os.urandom(K) + bytes(2 * K)
    assert _restore_like([data]) == data
    blobs = [os.urandom(1000), data]
    assert _restore_like(blobs) == b"".join(blobs)


def test_layouts() -> None:
    cases = [
        [bytes(3 * K)],
        [os.urandom(10), bytes(5 * K)],
        [bytes(K), os.urandom(K), bytes(K)],
        [os.urandom(K + 7), bytes(K - 7), bytes(K)],
        [bytes(100), os.urandom(3)],
        [b""],
    ]
    for blobs in cases:
        assert _restore_like(blobs) == b"".join(blobs)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(
            st.tuples(st.booleans(), st.sampled_from([1, 7, K - 1, K, K + 1, 2 * K, 3 * K])),
            min_size=1,
            max_size=4,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_any_layout_reads_back(spec: list[list[tuple[bool, int]]]) -> None:
    blobs = [b"".join(bytes(n) if zero else b"\x01" * n for zero, n in runs) for runs in spec]
    assert _restore_like(blobs) == b"".join(blobs)
