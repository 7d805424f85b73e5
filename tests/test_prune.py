"""Prune through the library: frees what no snapshot uses, repacks, and never deletes what a
backup running beside it comes to need."""

from __future__ import annotations

import os
from pathlib import Path

from safehold.crypto import KdfParams
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, check
from safehold.ops.forget import ForgetOptions, forget, plan_forget
from safehold.ops.prune import PruneOptions, finish_plans, prune
from safehold.ops.restore import RestoreOptions, restore
from safehold.repository.repo import InitOptions, Repository
from tests.conftest import PASSWORD
from tests.support.treecmp import compare_trees


def _pack_bytes(repo: Repository) -> int:
    return sum(i.size for i in repo.backend.list("data/"))


def _forget(repo: Repository, snap_id: str) -> None:
    forget(repo, plan_forget(repo, ForgetOptions(snapshots=[snap_id])))


def test_prune_frees_forgotten_data_and_keeps_the_rest(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "kept.bin").write_bytes(os.urandom(600_000))
    (src / "gone.bin").write_bytes(os.urandom(900_000))
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    (src / "gone.bin").unlink()
    (src / "new.bin").write_bytes(os.urandom(300_000))
    second = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None and second is not None
    _forget(repo, first.id)
    before = _pack_bytes(repo)
    plan, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=0))
    assert len(res.plans_finished) == 1 and res.deleted_packs > 0 and not res.not_deleted
    after = _pack_bytes(repo)
    assert before - after >= 800_000
    used = plan.stats["used_bytes"]
    assert after <= used + (64 << 10)  # max-unused 0: only referenced blobs remain (+ headers)
    assert check(repo, CheckOptions(read_data=True)).ok
    restore(repo, second, RestoreOptions(target=str(tmp_path / "r")))
    assert compare_trees(src, tmp_path / "r" / str(src).lstrip("/")) == []
    assert list(repo.backend.list("plans/")) == []
    # nothing more to do: a second prune changes nothing
    _, res2 = prune(repo, PruneOptions(max_unused=0.0, grace_s=0))
    assert res2.deleted_packs == 0 and _pack_bytes(repo) == after


def test_repack_partly_used_packs_within_max_unused(tmp_path: Path) -> None:
    repo = Repository.init(
        _local(tmp_path / "repo"),
        PASSWORD.encode(),
        InitOptions(chunk_avg=16 << 10, pack_size=1 << 20, kdf=KdfParams(1, 1024, 1)),
    )
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):  # many small files share packs: forgetting half leaves packs half used
        (src / f"f{i}").write_bytes(os.urandom(100_000))
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    for i in range(0, 20, 2):
        (src / f"f{i}").unlink()
    second = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None and second is not None
    _forget(repo, first.id)
    dry, _ = prune(repo, PruneOptions(max_unused=0.05, dry_run=True, grace_s=0))
    assert dry.repack and list(repo.backend.list("plans/")) == []
    plan, res = prune(repo, PruneOptions(max_unused=0.05, grace_s=0))
    assert res.repacked_blobs > 0
    used = plan.stats["used_bytes"]
    assert _pack_bytes(repo) <= 1.05 * used + (128 << 10)
    assert check(repo, CheckOptions(read_data=True)).ok
    restore(repo, second, RestoreOptions(target=str(tmp_path / "r")))
    assert compare_trees(src, tmp_path / "r" / str(src).lstrip("/")) == []


def _local(path: Path) -> object:
    from safehold.backends.local import LocalBackend

    return LocalBackend(path)


def test_backup_running_across_prune_keeps_what_it_deduplicated(
    repo: Repository, tmp_path: Path
) -> None:
    """The dangerous interleaving, every run: a backup loads the index, prune condemns a pack
    whose blob that backup then reuses, and the backup commits after prune planned."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(os.urandom(500_000))
    old = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert old is not None
    _forget(repo, old.id)  # x.bin's data is now unreferenced
    # a second client starts a backup: lock taken, index loaded (x.bin's blob is live for it)
    other = Repository.open(repo.backend, PASSWORD.encode())
    other_lock = other.lock()
    _ = other.index
    other.reload_index = lambda: other.index  # type: ignore[method-assign]  # loaded already
    # prune plans: condemns the pack with x.bin's data; it must not delete while the lock lives
    _, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=0))
    assert res.plans_waiting == 1 and res.deleted_packs == 0
    # the other backup finishes, deduplicating x.bin against the condemned pack
    result = backup(other, BackupOptions(paths=[str(src)]), lock=other_lock)
    assert result.snapshot is not None and result.summary["data_added"] < 10_000
    other_lock.release()
    # the plan is now due: the new snapshot's blob is found only in a condemned pack: kept
    done = finish_plans(repo, grace_s=0)  # takes a prune lock of its own
    assert len(done.plans_finished) == 1 and done.rescued_packs >= 1
    fresh = Repository.open(repo.backend, PASSWORD.encode())
    assert check(fresh, CheckOptions(read_data=True)).ok
    restore(
        fresh, fresh.find_snapshot(result.snapshot.id), RestoreOptions(target=str(tmp_path / "r"))
    )
    assert (tmp_path / "r" / str(src).lstrip("/") / "x.bin").read_bytes() == (
        src / "x.bin"
    ).read_bytes()


def test_storage_that_refuses_deletes(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(300_000))
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    (src / "a").write_bytes(os.urandom(300_000))
    backup(repo, BackupOptions(paths=[str(src)]))
    assert first is not None
    _forget(repo, first.id)
    refusing = Repository.open(_PermanentDeletes(repo.backend), PASSWORD.encode())
    _, res = prune(refusing, PruneOptions(max_unused=0.0, grace_s=0))
    assert res.not_deleted and res.deleted_packs == 0
    assert check(Repository.open(repo.backend, PASSWORD.encode())).ok
    # the plan stays, so a later prune on storage that allows deletes finishes the job
    assert list(repo.backend.list("plans/"))
    _, res2 = prune(repo, PruneOptions(max_unused=0.0, grace_s=0))
    assert res2.deleted_packs > 0 and list(repo.backend.list("plans/")) == []
    assert check(repo, CheckOptions(read_data=True)).ok


class _PermanentDeletes:
    """Storage that refuses to delete packs and index objects (like an append-only server)."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def delete(self, name: str) -> None:
        from safehold.errors import PermanentError

        if name.startswith(("data/", "index/")):
            raise PermanentError(f"deleting {name} is not allowed")
        self._inner.delete(name)  # type: ignore[attr-defined]


def test_directory_cache_is_dropped_after_a_prune(repo: Repository, tmp_path: Path) -> None:
    """A tree the directory cache remembers may stay indexed after a prune while data it refers
    to was deleted; so a prune invalidates the cache, and nothing is reused blindly."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a").write_bytes(os.urandom(200_000))
    (src / "gone").write_bytes(os.urandom(100_000))  # only the first snapshot has it
    first = backup(repo, BackupOptions(paths=[str(src)]))
    (src / "gone").unlink()
    again = backup(repo, BackupOptions(paths=[str(src)]))
    assert again.summary["dirs_unchanged"] >= 1
    assert first.snapshot is not None
    _forget(repo, first.snapshot.id)
    _, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=0))
    assert res.deleted_packs > 0  # the index changed: the cache is stale
    after = backup(repo, BackupOptions(paths=[str(src)]))
    assert after.summary["dirs_unchanged"] == 0
    assert check(repo, CheckOptions(read_data=True)).ok
