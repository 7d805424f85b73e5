"""Issue 7's items, each as a test that failed before its fix: forget beside a running backup, a
suspend past the lease, a forged plan, a stray file, and a run with nothing to do."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from safehold.errors import Locked
from safehold.format.plan import PlanFile
from safehold.ids import plan_name, storage_id
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, check
from safehold.ops.forget import ForgetOptions, forget, plan_forget
from safehold.ops.prune import PruneOptions, prune
from safehold.repository.locks import LEASE_SECONDS
from safehold.repository.objects import Kind, meta_object
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD
from tests.test_concurrency import PausableBackend


def _src(tmp_path: Path, name: str, size: int = 200_000) -> Path:
    src = tmp_path / name
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(size))
    return src


def test_forget_runs_beside_a_backup(repo: Repository, tmp_path: Path) -> None:
    """forget held an exclusive lock: a backup started while it ran failed ("repository is
    locked"). Now it takes a shared forget lock, and both succeed."""
    a = _src(tmp_path, "a")
    old = backup(repo, BackupOptions(paths=[str(a)])).snapshot
    assert old is not None
    pausable = PausableBackend(repo.backend)
    other = Repository.open(pausable, PASSWORD.encode())  # type: ignore[arg-type]
    b = _src(tmp_path, "b")
    result: dict[str, object] = {}
    t = threading.Thread(
        target=lambda: result.update(r=backup(other, BackupOptions(paths=[str(b)])))
    )
    t.start()
    assert pausable.waiting.acquire(timeout=60)  # the backup holds its lock, about to commit
    forget(repo, plan_forget(repo, ForgetOptions(snapshots=[old.id])))  # not refused
    pausable.release.set()
    t.join(60)
    assert "r" in result
    assert [s.id for s in repo.snapshots()] == [result["r"].snapshot.id]  # type: ignore[attr-defined]
    # but two maintenance operations exclude each other
    held = repo.lock(op="forget")
    try:
        with pytest.raises(Locked):
            prune(repo, PruneOptions())
        with pytest.raises(Locked):
            repo.lock(op="forget")
    finally:
        held.release()


def test_suspend_past_the_lease_commits_nothing(repo: Repository, tmp_path: Path) -> None:
    """The lease was aged with time.monotonic(), which stops during suspend, and a late refresh
    forgot the lapse. Now a refresh after a gap longer than the lease loses the lock for good."""
    src = _src(tmp_path, "s")
    lock = repo.lock()
    try:
        # as after a suspend: the wall clock and the boot clock moved on, nothing refreshed
        lock.refreshed_wall -= LEASE_SECONDS + 60
        lock.refreshed_elapsed -= LEASE_SECONDS + 60
        lock.refresh()  # the timer fires on resume and writes the lock again...
        assert lock.age() < 5
        with pytest.raises(Locked, match="lost the repository lock"):  # ...but it is lost
            backup(repo, BackupOptions(paths=[str(src)]), lock=lock)
        assert repo.snapshots() == []
    finally:
        lock.release()
    assert backup(repo, BackupOptions(paths=[str(src)])).snapshot is not None


def test_snapshot_stored_after_the_lease_lapsed_is_withdrawn(
    repo: Repository, tmp_path: Path
) -> None:
    src = _src(tmp_path, "s")
    lock = repo.lock()
    real_save = repo.save_snapshot

    def slow_save(snap):  # type: ignore[no-untyped-def]
        sid = real_save(snap)
        lock.refreshed_wall -= LEASE_SECONDS  # the store took longer than the lease
        return sid

    repo.save_snapshot = slow_save  # type: ignore[method-assign]
    try:
        with pytest.raises(Locked, match="withdrawn"):
            backup(repo, BackupOptions(paths=[str(src)]), lock=lock)
    finally:
        lock.release()
    assert repo.snapshots() == []


def test_forged_plan_deletes_nothing_in_use(repo: Repository, tmp_path: Path) -> None:
    """A plan condemning every pack and every index object, due at once (as a key holder could
    plant on storage without serve's restrictions): deletion re-derives and keeps everything
    that snapshots use, so every snapshot still checks and restores."""
    src = _src(tmp_path, "s", 500_000)
    backup(repo, BackupOptions(paths=[str(src)]))
    (src / "g.bin").write_bytes(os.urandom(300_000))
    backup(repo, BackupOptions(paths=[str(src)]))
    packs = [bytes.fromhex(i.name.rsplit("/", 1)[1]) for i in repo.backend.list("data/")]
    indexes = [bytes.fromhex(i) for i in repo.list_ids("index/")]
    forged = PlanFile(time_ns=0, condemned=packs, superseded=indexes)
    data = meta_object(forged.to_bytes(), Kind.PLAN, meta_key=repo.secrets.meta_key)
    repo.backend.store(plan_name(storage_id(data)), data)
    _, res = prune(repo, PruneOptions(max_unused=1.0))
    assert res.deleted_packs == 0
    fresh = Repository.open(repo.backend, PASSWORD.encode())
    assert check(fresh, CheckOptions(read_data=True)).ok
    assert len(fresh.snapshots()) == 2


def test_garbage_plan_is_named_and_ignored(repo: Repository, tmp_path: Path) -> None:
    backup(repo, BackupOptions(paths=[str(_src(tmp_path, "s"))]))
    repo.backend.store(plan_name("ab" * 32), b"garbage, not a plan")
    _, res = prune(repo, PruneOptions())
    assert any("plans/" + "ab" * 32 in u for u in res.unreadable)
    assert res.deleted_packs == 0
    res2 = check(Repository.open(repo.backend, PASSWORD.encode()), CheckOptions(read_data=True))
    assert all("ab" * 8 in e for e in res2.errors), res2.errors  # at most the plan is named


def test_stray_file_in_data_is_reported_not_a_crash(repo: Repository, tmp_path: Path) -> None:
    src = _src(tmp_path, "s")
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None
    stray = Path(repo.backend.location) / "data" / "ab" / "README"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_text("not a pack")
    (src / "f.bin").write_bytes(os.urandom(100_000))
    backup(repo, BackupOptions(paths=[str(src)]))
    forget(repo, plan_forget(repo, ForgetOptions(snapshots=[first.id])))
    _, res = prune(repo, PruneOptions(max_unused=0.0))
    assert res.stray == ["data/ab/README"] and res.deleted_packs > 0
    assert stray.exists()


def test_nothing_to_do_stores_no_plan(repo: Repository, tmp_path: Path) -> None:
    backup(repo, BackupOptions(paths=[str(_src(tmp_path, "s"))]))
    before = sorted(i.name for i in repo.backend.list(""))
    _, res = prune(repo, PruneOptions())
    assert res.plan_id is None
    after = sorted(i.name for i in repo.backend.list(""))
    assert before == after


def test_no_commit_without_a_refresh_period_to_spare(repo: Repository, tmp_path: Path) -> None:
    """A lease still valid but with less than a refresh period left: the snapshot is not even
    stored (the check before committing, not the withdrawal after it, refuses)."""
    from safehold.repository.locks import COMMIT_MARGIN

    src = _src(tmp_path, "s")
    lock = repo.lock()
    stored: list[str] = []
    real_save = repo.save_snapshot
    repo.save_snapshot = lambda snap: stored.append("x") or real_save(snap)  # type: ignore[method-assign,func-returns-value]
    try:
        lock.refreshed_wall -= COMMIT_MARGIN + 10
        lock.refreshed_elapsed -= COMMIT_MARGIN + 10
        with pytest.raises(Locked, match="nothing was committed"):
            backup(repo, BackupOptions(paths=[str(src)]), lock=lock)
    finally:
        lock.release()
    assert stored == []


def test_plan_waits_for_the_locks_it_saw_even_with_a_clock_ahead(
    repo: Repository, tmp_path: Path
) -> None:
    """A client whose clock runs ahead writes a lock time later than the plan's: the plan still
    waits for it, because the lock was listed when the plan was made."""
    from safehold.clock import Clock

    class Ahead(Clock):
        def time(self) -> float:
            return super().time() + 20  # ahead, within the skew the protocol allows

    old = backup(repo, BackupOptions(paths=[str(_src(tmp_path, "s"))])).snapshot
    assert old is not None
    forget(repo, plan_forget(repo, ForgetOptions(snapshots=[old.id])))
    other = Repository.open(repo.backend, PASSWORD.encode())
    other.clock = Ahead()
    lock = other.lock()
    try:
        _, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=0))
        assert res.plan_id is not None and res.plans_waiting == 1 and res.deleted_packs == 0
    finally:
        lock.release()
    _, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=0))
    assert len(res.plans_finished) == 1 and res.deleted_packs > 0


def test_a_used_blob_in_any_present_condemned_pack_revives_it(
    repo: Repository, tmp_path: Path
) -> None:
    """A blob a new snapshot uses is held by two condemned packs, and the one the index would
    read is gone: prune revives the other (from its own header) instead of refusing with
    "blobs ... in no pack"."""
    from safehold.compress import Compression
    from safehold.ids import BlobType, pack_name

    src = _src(tmp_path, "s", 300_000)
    old = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert old is not None
    index = repo.reload_index()
    blobs = [b for p in index.packs() for b in p.blobs if b.type == BlobType.DATA]
    session = repo.write_session()  # a second copy of the file's blobs, in a pack of its own
    for e in blobs:
        loc = index.lookup(e.id)
        assert loc is not None
        for _, data in repo.read_pack_blobs(loc.pack_id, [loc.entry]):
            session.add_blob(BlobType.DATA, data, Compression("none"), e.id, dedup=False)
    session.flush()
    forget(repo, plan_forget(repo, ForgetOptions(snapshots=[old.id])))
    # another client's backup loaded the index before the prune condemned both copies
    other = Repository.open(repo.backend, PASSWORD.encode())
    other_lock = other.lock()
    _ = other.index
    other.reload_index = lambda: other.index  # type: ignore[method-assign]
    _, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=3600))
    assert res.plans_waiting == 1 and res.condemned_packs >= 3
    new = backup(other, BackupOptions(paths=[str(src)]), lock=other_lock).snapshot
    other_lock.release()
    assert new is not None
    # the copy the index reads from is lost (as if an earlier deletion had taken it)
    first = repo.reload_index().lookup(blobs[0].id)
    assert first is not None
    repo.backend.delete(pack_name(first.pack_id.hex()))
    _, res = prune(repo, PruneOptions(max_unused=1.0, grace_s=3600))  # refused before
    fresh = Repository.open(repo.backend, PASSWORD.encode())
    assert fresh.reload_index().is_live(blobs[0].id)  # revived: listed by the new index
    got = b"".join(bytes(fresh.read_blob(e.id)) for e in blobs)
    assert got == (src / "f.bin").read_bytes()


def _two_snapshots(repo: Repository, tmp_path: Path) -> Path:
    src = _src(tmp_path, "s", 400_000)
    backup(repo, BackupOptions(paths=[str(src)]))
    (src / "g.bin").write_bytes(os.urandom(300_000))
    backup(repo, BackupOptions(paths=[str(src)]))
    return src


def _all_restore(repo: Repository, src: Path) -> None:
    fresh = Repository.open(repo.backend, PASSWORD.encode())
    assert check(fresh, CheckOptions(read_data=True)).ok
    _read_latest(fresh, src)


def _read_latest(fresh: Repository, src: Path) -> None:
    latest = fresh.find_snapshot("latest")
    from tests.test_check_damage import iter_files

    got = {p.rsplit("/", 1)[1]: n for p, n in iter_files(fresh, latest.tree)}
    for name in ("f.bin", "g.bin"):
        data = b"".join(bytes(fresh.read_blob(c)) for c in got[name].content or [])
        assert data == (src / name).read_bytes()


def test_attack_an_index_claiming_to_supersede_everything(repo: Repository, tmp_path: Path) -> None:
    """What a client behind serve --append-only may store: an index object that claims to
    replace every other and lists nothing. The owner's prunes delete nothing in use."""
    from safehold.format.index import IndexFile

    src = _two_snapshots(repo, tmp_path)
    claims = [bytes.fromhex(i) for i in repo.list_ids("index/")]
    repo.store_index(IndexFile([], claims))
    for _ in range(2):
        _, res = prune(repo, PruneOptions(max_unused=0.0))
        assert res.deleted_packs == 0
    _all_restore(repo, src)


def test_attack_an_index_pointing_every_blob_at_the_wrong_pack(
    repo: Repository, tmp_path: Path
) -> None:
    """An index object (storable by an append-only client) that says one real pack holds every
    blob. Prune fails closed and deletes nothing; check --read-data names the forged index;
    repair index rebuilds the index from the packs' own headers; then all is well. (Reading
    past a forged entry to another copy is the damage issue's.)"""
    from safehold.errors import SafeholdError
    from safehold.format.index import IndexedPack, IndexFile
    from safehold.ops.repair import repair_index

    src = _two_snapshots(repo, tmp_path)
    index = repo.reload_index()
    packs = index.packs()
    every = [b for p in packs for b in p.blobs]
    victim = max(packs, key=lambda p: p.size)
    forged = IndexFile([IndexedPack(victim.pack_id, victim.size, victim.sealed_key, every)])
    forged_id = repo.store_index(forged)
    stored = sorted(i.name for i in repo.backend.list("data/"))
    for _ in range(2):
        try:
            prune(repo, PruneOptions(max_unused=0.0))
        except SafeholdError:
            pass  # refusing is fine; deleting is not
        assert sorted(i.name for i in repo.backend.list("data/")) == stored
    res = check(Repository.open(repo.backend, PASSWORD.encode()), CheckOptions(read_data=True))
    assert any(forged_id[:16] in e for e in res.errors), res.errors
    # the pack's own header settles the disagreement: nothing forged is copied into prune's
    # index objects, and the data reads correctly before any repair
    named = {e.split(":")[0] for e in res.errors if e.startswith("index ")}
    assert named == {f"index {forged_id[:16]}"}, res.errors
    _read_latest(Repository.open(repo.backend, PASSWORD.encode()), src)
    repair_index(repo)
    prune(repo, PruneOptions(max_unused=0.0))
    _all_restore(repo, src)


def test_attack_a_lock_whose_lease_never_ends(repo: Repository, tmp_path: Path) -> None:
    """A lock object (storable by an append-only client) that claims a lease to the year 3000
    would hold every prune plan forever. No honest lease ends more than a lease (and the clock
    skew) from now, so such a lock counts as garbage; an honest lock still holds."""
    import json
    import socket
    import time

    from safehold.ids import lock_name

    old = backup(repo, BackupOptions(paths=[str(_src(tmp_path, "s"))])).snapshot
    assert old is not None
    forget(repo, plan_forget(repo, ForgetOptions(snapshots=[old.id])))
    now = time.time()
    lock = {"v": 1, "host": "elsewhere-" + socket.gethostname(), "pid": 1, "user": "x"}
    lock |= {"time": now, "refreshed": now, "expires": 32503680000.0, "exclusive": False}
    repo.backend.store(lock_name("cd" * 32), json.dumps(lock).encode(), overwrite=True)
    _, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=0))
    assert res.deleted_packs > 0 and res.plans_waiting == 0
    # an honest lease, from the same kind of client, still holds a plan
    (_src(tmp_path, "t") / "more.bin").write_bytes(os.urandom(1000))
    snap = backup(repo, BackupOptions(paths=[str(tmp_path / "t")])).snapshot
    assert snap is not None
    forget(repo, plan_forget(repo, ForgetOptions(snapshots=[snap.id])))
    lock |= {"expires": now + LEASE_SECONDS}
    repo.backend.store(lock_name("cd" * 32), json.dumps(lock).encode(), overwrite=True)
    _, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=0))
    assert res.deleted_packs == 0 and res.plans_waiting == 1


@pytest.mark.parametrize("kind", ["snapshot", "index", "plan", "lock", "pack"])
def test_a_flipped_byte_never_makes_prune_delete_what_it_hid(
    kind: str, repo: Repository, tmp_path: Path
) -> None:
    """Snapshot A alone uses pack P. A flipped byte in A's snapshot object or in the index object
    listing P would, if prune skipped the damaged object, make P look unused or unindexed; in a
    plan it could make a condemnation look real; in a lock or in P itself it must not matter.
    Prune either refuses (naming what is wrong) or goes on, and P is never deleted."""
    import json

    from safehold.errors import SafeholdError
    from safehold.ids import lock_name

    a = backup(repo, BackupOptions(paths=[str(_src(tmp_path, "a"))])).snapshot
    backup(repo, BackupOptions(paths=[str(_src(tmp_path, "b"))]))
    assert a is not None
    index = repo.reload_index()
    tree = repo.read_tree(a.tree)
    while tree[0].type == "dir":  # down to the file
        tree = repo.read_tree(tree[0].subtree)  # type: ignore[arg-type]
    content = tree[0].content or []
    loc = index.lookup(content[0])
    assert loc is not None
    pack = "data/" + loc.pack_id.hex()[:2] + "/" + loc.pack_id.hex()
    root = Path(repo.backend.location)
    if kind == "snapshot":
        target = root / "snapshots" / a.id
    elif kind == "index":
        target = next(
            root / "index" / i
            for i in repo.list_ids("index/")
            if any(p.pack_id == loc.pack_id for p in repo.read_index_file(i).packs)
        )
    elif kind == "plan":  # a real plan condemning P, then damaged
        forged = PlanFile(time_ns=0, condemned=[loc.pack_id])
        data = meta_object(forged.to_bytes(), Kind.PLAN, meta_key=repo.secrets.meta_key)
        repo.backend.store(plan_name(storage_id(data)), data)
        target = root / "plans" / storage_id(data)
    elif kind == "lock":
        repo.backend.store(lock_name("ef" * 32), json.dumps({"v": 1}).encode(), overwrite=True)
        target = root / "locks" / ("ef" * 32)
    else:
        target = root / pack
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    target.write_bytes(bytes(raw))
    fresh = Repository.open(repo.backend, PASSWORD.encode())
    try:
        prune(fresh, PruneOptions(max_unused=0.0))
    except SafeholdError as e:
        assert kind in ("snapshot", "index"), e  # refusing is right only where it would hide
        assert "\n" not in str(e)
    assert (root / pack).exists()
