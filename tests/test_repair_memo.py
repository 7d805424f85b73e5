"""repair snapshots rewrites every snapshot that shares a damaged subtree, in one run, and counts
a blob as lost only when no pack in storage holds it."""

from __future__ import annotations

import os
from pathlib import Path

from safehold.format.index import IndexedPack, IndexFile
from safehold.format.snapshot import Snapshot
from safehold.ids import pack_name
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, check
from safehold.ops.repair import repair_index, repair_snapshots
from safehold.ops.restore import RestoreOptions, iter_files, restore
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD


def _shared_subtree(repo: Repository, tmp_path: Path) -> tuple[Path, Snapshot, Snapshot, Snapshot]:
    """Three snapshots: the first without d/lost.bin; the other two share the subtree d (the
    root differs: ok.txt changed). Then the data pack of lost.bin is deleted."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "ok.txt").write_text("survives " * 100)
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot  # ok.txt in its own pack
    (src / "d" / "lost.bin").write_bytes(os.urandom(300_000))
    second = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    (src / "ok.txt").write_text("survives " * 100 + "and changes")
    (src / "ok.txt").touch()
    third = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None and second is not None and third is not None
    d2 = next(n for p, n in iter_files(repo, second.tree) if p.endswith("/d"))
    d3 = next(n for p, n in iter_files(repo, third.tree) if p.endswith("/d"))
    assert d2.subtree == d3.subtree and second.tree != third.tree
    lost = next(n for p, n in iter_files(repo, third.tree) if p.endswith("lost.bin"))
    assert lost.content
    loc = repo.index.lookup(lost.content[0])
    assert loc is not None
    repo.backend.delete(pack_name(loc.pack_id.hex()))  # the data pack is gone
    return src, first, second, third


def test_one_run_rewrites_every_snapshot_sharing_a_damaged_subtree(
    repo: Repository, tmp_path: Path
) -> None:
    src, first, second, third = _shared_subtree(repo, tmp_path)
    repair_index(repo)  # the index no longer lists the deleted pack
    assert not check(repo).ok
    dry = repair_snapshots(repo, dry_run=True)
    assert set(dry.rewritten) == {second.id, third.id}
    for s in (second, third):
        assert any(
            d.startswith(s.id[:8]) and d.endswith("lost.bin (data lost)") for d in dry.dropped
        )
    res = repair_snapshots(repo)
    assert set(res.rewritten) == {second.id, third.id}
    assert len(res.dropped) == 2 and not any("ok.txt" in d for d in res.dropped)
    fresh = Repository.open(repo.backend, PASSWORD.encode())
    after = check(fresh, CheckOptions(read_data=True))  # the originals still lack lost.bin
    assert after.ok, after.errors  # known damage: notes naming the repaired copies
    named = {n[9:17] for n in after.notes if "repaired as" in n}  # each lost blob once
    assert named and named <= {second.id[:8], third.id[:8]}, after.notes
    snaps = fresh.snapshots()
    # the originals are kept; each repaired copy sorts right after its original
    assert [s.id for s in snaps] == [
        first.id,
        second.id,
        res.rewritten[second.id],
        third.id,
        res.rewritten[third.id],
    ]
    assert [s.summary.get("repaired_from") for s in snaps] == [
        None,
        None,
        second.id,
        None,
        third.id,
    ]
    assert all("repaired" in s.tags for s in snaps[2::2])
    restore(fresh, snaps[4], RestoreOptions(target=str(tmp_path / "r")))
    out = tmp_path / "r" / str(src).lstrip("/")
    assert (out / "ok.txt").read_text() == (src / "ok.txt").read_text()
    assert (out / "d").is_dir() and not (out / "d" / "lost.bin").exists()
    # nothing left to repair: the same damage is not repaired twice
    assert repair_snapshots(fresh).rewritten == {}
    assert len(fresh.snapshots()) == 5
    # removing the originals is a separate, explicit step
    gone = repair_snapshots(fresh, forget_originals=True)
    assert gone.rewritten == {} and set(gone.forgotten) == {second.id, third.id}
    final = Repository.open(repo.backend, PASSWORD.encode())
    assert len(final.snapshots()) == 3
    assert check(final, CheckOptions(read_data=True)).ok


def test_a_blob_whose_pack_is_missing_is_lost_though_still_indexed(
    repo: Repository, tmp_path: Path
) -> None:
    """Without repair index first: the index still lists the deleted pack."""
    _, _, second, third = _shared_subtree(repo, tmp_path)
    res = repair_snapshots(repo, forget_originals=True)
    assert set(res.rewritten) == {second.id, third.id} == set(res.forgotten)
    assert all(d.endswith("lost.bin (data lost)") for d in res.dropped) and len(res.dropped) == 2
    repair_index(repo)  # drops the missing pack from the index
    fresh = Repository.open(repo.backend, PASSWORD.encode())
    after = check(fresh, CheckOptions(read_data=True))
    assert after.ok, after.errors


def test_a_tree_the_index_prefers_from_a_missing_pack_is_not_dropped(
    repo: Repository, tmp_path: Path
) -> None:
    """A subtree's tree blob is in a pack in storage, but the master index prefers a listing in
    a pack that is gone: the directory is not lost, and repair snapshots keeps it."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_text("kept " * 100)
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    d = next(n for p, n in iter_files(repo, snap.tree) if p.endswith("/d"))
    assert d.subtree is not None
    loc = repo.index.lookup(d.subtree)
    real = repo.index.pack(loc.pack_id) if loc is not None else None
    assert loc is not None and real is not None
    others = repo.list_ids("index/")
    ghost = IndexedPack(os.urandom(32), real.size, real.sealed_key, [loc.entry])
    while True:  # until the forged index object is met first (the lowest id wins)
        iid = repo.store_index(IndexFile([ghost]))
        if iid < min(others):
            break
        repo.backend.delete(f"index/{iid}")
    fresh = Repository.open(repo.backend, PASSWORD.encode())
    got = fresh.index.lookup(d.subtree)
    assert got is not None and got.pack_id == ghost.pack_id
    dry = repair_snapshots(fresh, dry_run=True)
    assert dry.dropped == [] and dry.rewritten == {}
