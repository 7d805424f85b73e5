"""repair index and repair snapshots on deliberately damaged repositories."""

from __future__ import annotations

import os
from pathlib import Path

from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, check
from safehold.ops.repair import repair_index, repair_snapshots
from safehold.ops.restore import RestoreOptions, iter_files, restore
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "lost.bin").write_bytes(os.urandom(300_000))
    (src / "ok.txt").write_text("survives " * 100)
    return src


def test_repair_index_rebuilds_from_packs(repo: Repository, tmp_path: Path) -> None:
    src = _tree(tmp_path)
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    for info in list(repo.backend.list("index/")):
        repo.backend.delete(info.name)  # every index object gone
    broken = Repository.open(repo.backend, PASSWORD.encode())
    assert not check(broken).ok
    dry = repair_index(broken, dry_run=True)
    assert dry.packs > 0 and list(repo.backend.list("index/")) == []
    res = repair_index(broken)
    assert res.packs == dry.packs and not res.damaged_packs
    fixed = Repository.open(repo.backend, PASSWORD.encode())
    assert check(fixed, CheckOptions(read_data=True)).ok
    restore(fixed, fixed.find_snapshot(snap.id), RestoreOptions(target=str(tmp_path / "r")))
    assert (tmp_path / "r" / str(src).lstrip("/") / "ok.txt").read_text() == "survives " * 100


def test_repair_snapshots_drops_lost_files_and_names_them(repo: Repository, tmp_path: Path) -> None:
    src = _tree(tmp_path)
    lost_file = src / "d" / "lost.bin"
    data = lost_file.read_bytes()
    lost_file.unlink()
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot  # ok.txt in its own pack
    lost_file.write_bytes(data)
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None and first is not None
    lost = next(n for p, n in iter_files(repo, snap.tree) if p.endswith("lost.bin"))
    assert lost.content
    loc = repo.index.lookup(lost.content[0])
    assert loc is not None
    pid = loc.pack_id.hex()
    repo.backend.delete(f"data/{pid[:2]}/{pid}")  # the data pack is gone
    repair_index(repo)  # the index no longer lists it
    assert not check(repo).ok
    dry = repair_snapshots(repo, dry_run=True)
    assert any("lost.bin" in d for d in dry.dropped) and len(repo.snapshots()) == 2
    res = repair_snapshots(repo)
    assert list(res.rewritten) == [snap.id]
    assert any("lost.bin" in d and "data lost" in d for d in res.dropped)
    assert not any("ok.txt" in d for d in res.dropped)
    fresh = Repository.open(repo.backend, PASSWORD.encode())
    old_one, original, new = fresh.snapshots()  # the original is kept beside its repaired copy
    assert old_one.id == first.id and original.id == snap.id and new.id == res.rewritten[snap.id]
    assert "repaired" in new.tags and new.paths == snap.paths
    assert new.time_ns == snap.time_ns + 1 and new.summary["repaired_from"] == snap.id
    assert "repaired" not in original.tags
    damaged = check(fresh, CheckOptions(read_data=True))  # only the original lacks data,
    assert damaged.ok  # and that damage is known: a note naming the repaired copy
    assert any(
        n.startswith(f"snapshot {snap.id[:8]}") and "repaired as" in n for n in damaged.notes
    )
    restore(fresh, new, RestoreOptions(target=str(tmp_path / "r")))
    out = tmp_path / "r" / str(src).lstrip("/")
    assert (out / "ok.txt").exists() and not (out / "d" / "lost.bin").exists()
    # the next backup (its parent: the repaired copy) stores lost.bin again: the original heals
    backup(fresh, BackupOptions(paths=[str(src)]))
    healed = Repository.open(repo.backend, PASSWORD.encode())
    assert check(healed, CheckOptions(read_data=True)).ok
    restore(healed, healed.find_snapshot(snap.id), RestoreOptions(target=str(tmp_path / "o")))
    out = tmp_path / "o" / str(src).lstrip("/")
    assert (out / "d" / "lost.bin").read_bytes() == data
