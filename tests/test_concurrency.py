"""Three clients back up at once while prune runs. A pausable backend holds each backup just
before it stores its snapshot until prune has condemned the data those backups deduplicated
against, so the dangerous interleaving happens on every run. Afterwards every snapshot checks
clean and restores."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from safehold.backends.base import Backend, ObjectInfo
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, check
from safehold.ops.forget import ForgetOptions, forget, plan_forget
from safehold.ops.prune import PruneOptions, finish_plans, prune
from safehold.ops.restore import RestoreOptions, restore
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD
from tests.support.treecmp import compare_trees


class PausableBackend:
    """Passes every call through, but holds stores of snapshot objects until released."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.waiting = threading.Semaphore(0)

    @property
    def location(self) -> str:
        return self.inner.location

    def create(self) -> None:
        self.inner.create()

    def list(self, prefix: str) -> list[ObjectInfo]:  # type: ignore[override]
        return list(self.inner.list(prefix))

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.load(name, offset, length)

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        if name.startswith("snapshots/"):
            self.waiting.release()
            assert self.release.wait(60), "never released"
        self.inner.store(name, data, overwrite=overwrite)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def stat(self, name: str) -> ObjectInfo:
        return self.inner.stat(name)

    def close(self) -> None:
        self.inner.close()


def test_three_backups_beside_prune(repo: Repository, tmp_path: Path) -> None:
    shared = os.urandom(700_000)  # data every client has, first stored by an old snapshot
    old_src = tmp_path / "old"
    old_src.mkdir()
    (old_src / "shared.bin").write_bytes(shared)
    old = backup(repo, BackupOptions(paths=[str(old_src)])).snapshot
    assert old is not None
    forget(repo, plan_forget(repo, ForgetOptions(snapshots=[old.id])))  # now unreferenced

    pausable = PausableBackend(repo.backend)
    sources, results, errors = [], {}, []
    for i in range(3):
        src = tmp_path / f"client{i}"
        src.mkdir()
        (src / "shared.bin").write_bytes(shared)
        (src / "own.bin").write_bytes(os.urandom(200_000))
        sources.append(src)

    def client(i: int) -> None:
        try:
            r = Repository.open(pausable, PASSWORD.encode())  # type: ignore[arg-type]
            lock = r.lock()
            try:
                results[i] = backup(r, BackupOptions(paths=[str(sources[i])]), lock=lock)
            finally:
                lock.release()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for _ in range(3):  # every backup has deduplicated shared.bin and waits to commit
        assert pausable.waiting.acquire(timeout=60)
    # prune now condemns the pack holding shared.bin: no snapshot references it yet
    _, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=0))
    assert res.plan_id is not None and res.plans_waiting == 1 and res.deleted_packs == 0
    pausable.release.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert all(results[i].summary["data_added"] < 300_000 for i in range(3))  # deduplicated
    # the backups are done: the plan is due, and its re-check must keep the shared data
    done = finish_plans(repo, grace_s=0)  # takes a prune lock of its own
    assert len(done.plans_finished) == 1 and done.rescued_packs >= 1
    fresh = Repository.open(repo.backend, PASSWORD.encode())
    assert check(fresh, CheckOptions(read_data=True)).ok
    for i in range(3):
        snap = results[i].snapshot
        assert snap is not None
        target = tmp_path / f"restore{i}"
        restore(fresh, fresh.find_snapshot(snap.id), RestoreOptions(target=str(target)))
        assert compare_trees(sources[i], target / str(sources[i]).lstrip("/")) == []
