"""A backup whose lock lease cannot be proven valid commits nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from safehold.errors import Locked
from safehold.ops.backup import BackupOptions, backup
from safehold.repository.locks import LEASE_SECONDS
from safehold.repository.repo import Repository


def test_lost_lease_commits_no_snapshot_and_indexes_nothing(
    repo: Repository, tmp_path: Path
) -> None:
    """Without a lease nothing is indexed either: a prune that saw the lock expire may be
    deleting the packs (unused until now), and an index entry of a deleted pack would let a
    later backup deduplicate against nothing (the schedule explorer found it: seed 369). The
    packs stored are left for prune; the next run stores the data again."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(300_000))
    lock = repo.lock()
    try:
        lock.refreshed_wall -= LEASE_SECONDS  # as if refreshes had been failing
        lock.refreshed_elapsed -= LEASE_SECONDS
        with pytest.raises(Locked, match="lost the repository lock"):
            backup(repo, BackupOptions(paths=[str(src)]), lock=lock)
        assert repo.snapshots() == []
        assert repo.reload_index().blob_count() == 0
        assert list(repo.backend.list("index/")) == []
        lock.refreshed_wall, lock.refreshed_elapsed = lock.clock.time(), lock.clock.elapsed()
        result = backup(repo, BackupOptions(paths=[str(src)]), lock=lock)
        assert result.snapshot is not None
        assert result.summary["data_added"] >= 300_000  # stored again
    finally:
        lock.release()


def test_retry_lock_waits_then_gives_up(repo: Repository) -> None:
    from safehold.errors import Locked as LockedError

    held = repo.lock(exclusive=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(LockedError):
            repo.lock(retry_s=1.2)
        assert time.monotonic() - t0 >= 1.2
    finally:
        held.release()
    # once it is released, a waiting client gets it
    import threading

    held = repo.lock(exclusive=True)
    threading.Timer(0.6, held.release).start()
    got = repo.lock(retry_s=10)
    got.release()
