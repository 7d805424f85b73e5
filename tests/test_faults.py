"""Backups through a fault-injecting wrapper around a real (local) backend: seeded transient
faults of every kind are retried and the backup completes; permanent faults fail it with an
error (exit 2 in the CLI) and leave a repository that checks clean, which the next run completes
without any repair."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from safehold.backends.local import LocalBackend
from safehold.backends.wrappers import FaultInjectingBackend, RetryingBackend
from safehold.crypto import KdfParams
from safehold.errors import EXIT_ERROR, PermanentError
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, check
from safehold.ops.restore import RestoreOptions, restore
from safehold.repository.repo import InitOptions, Repository
from tests.conftest import PASSWORD
from tests.support.treecmp import compare_trees
from tests.support.treegen import make_tree

SEED = int(os.environ.get("SAFEHOLD_FAULT_SEED", str(random.SystemRandom().randrange(1 << 30))))


def _repo(tmp_path: Path, backend: object) -> Repository:
    Repository.init(
        LocalBackend(tmp_path / "repo"),
        PASSWORD.encode(),
        InitOptions(chunk_avg=64 << 10, pack_size=1 << 20, kdf=KdfParams(1, 1024, 1)),
    )
    return Repository.open(backend, PASSWORD.encode())  # type: ignore[arg-type]


def test_backup_survives_five_percent_transient_faults(tmp_path: Path) -> None:
    print(f"fault seed {SEED} (replay: SAFEHOLD_FAULT_SEED={SEED})")
    src = tmp_path / "src"
    make_tree(src, 3 << 20, seed=SEED % 997)
    faulty = FaultInjectingBackend(
        LocalBackend(tmp_path / "repo"),
        seed=SEED,
        rate=0.05,
        ops=frozenset({"list", "load", "store", "stat"}),
    )
    repo = _repo(tmp_path, RetryingBackend(faulty, attempts=12, sleep=lambda s: None))
    # besides the 5 % at random, a few certain ones: a lost answer to a pack store, a short read
    faulty.fail_next("store", count=2, kind="timeout", match="data/")
    faulty.fail_next("load", count=2, kind="short_read", match="data/")
    result = backup(repo, BackupOptions(paths=[str(src)]))
    assert result.snapshot is not None and not result.warnings
    # reading everything back goes through the faults too
    assert check(repo, CheckOptions(read_data=True)).ok
    target = str(tmp_path / "r")
    restore(repo, repo.find_snapshot(result.snapshot.id), RestoreOptions(target=target))
    assert compare_trees(src, tmp_path / "r" / str(src).lstrip("/")) == []
    assert faulty.injected >= 3, dict(faulty.stats)
    clean = Repository.open(LocalBackend(tmp_path / "repo"), PASSWORD.encode())
    assert check(clean, CheckOptions(read_data=True)).ok


def test_permanent_faults_fail_cleanly_and_the_next_run_completes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 3 << 20, seed=3)
    faulty = FaultInjectingBackend(LocalBackend(tmp_path / "repo"), seed=SEED, rate=0.0)
    _repo(tmp_path, faulty)
    # a permanent fault: every pack store fails for good (say, permission denied)
    permanent = FaultInjectingBackend(faulty, seed=SEED, rate=0.0, permanent=True)
    permanent.fail_next("store", count=1000, kind="error", match="data/")
    repo = Repository.open(permanent, PASSWORD.encode())  # type: ignore[arg-type]
    with pytest.raises(PermanentError) as info:
        backup(repo, BackupOptions(paths=[str(src)]))
    assert info.value.exit_code == EXIT_ERROR and "\n" not in str(info.value)
    clean = Repository.open(LocalBackend(tmp_path / "repo"), PASSWORD.encode())
    assert check(clean, CheckOptions(read_data=True)).ok and clean.snapshots() == []
    # the next run, with the fault gone, completes with no repair by hand
    result = backup(clean, BackupOptions(paths=[str(src)]))
    assert result.snapshot is not None
    assert check(clean, CheckOptions(read_data=True)).ok


def test_failed_listing_is_not_an_empty_one(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    base = LocalBackend(tmp_path / "repo")
    repo = _repo(tmp_path, base)
    backup(repo, BackupOptions(paths=[str(src)]))
    faulty = FaultInjectingBackend(base, seed=SEED, rate=0.0, permanent=True)
    faulty.fail_next("list", count=100, kind="timeout", match="")
    broken = Repository.open(base, PASSWORD.encode())
    broken.backend = faulty  # type: ignore[assignment]
    with pytest.raises(PermanentError):
        broken.snapshots()  # not [] — an error, so nothing decides "there is nothing"
    with pytest.raises(PermanentError):
        backup(broken, BackupOptions(paths=[str(src)]))
