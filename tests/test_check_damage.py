"""check tells damage from normal operation: a pack condemned by a waiting prune plan but used by
a newer snapshot is not damage; index entries that disagree with a pack's own header are; and
objects that cannot be read are named."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from safehold.errors import IntegrityError
from safehold.format.index import IndexedPack, IndexFile
from safehold.format.pack import PackEntry
from safehold.format.snapshot import Snapshot
from safehold.ids import index_name, pack_name, plan_name, storage_id
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, check
from safehold.ops.forget import ForgetOptions, forget, plan_forget
from safehold.ops.prune import PruneOptions, finish_plans, prune, referenced_blobs
from safehold.ops.repair import repair_snapshots
from safehold.ops.restore import RestoreOptions, iter_files, restore
from safehold.repository.objects import OBJECT_MAGIC, Kind, meta_object
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD


def _fresh(repo: Repository) -> Repository:
    """The repository opened again, without a cache: what another client sees."""
    return Repository.open(repo.backend, PASSWORD.encode())


def _content(repo: Repository, snap: Snapshot, suffix: str) -> list[bytes]:
    node = next(n for p, n in iter_files(repo, snap.tree) if p.endswith(suffix))
    assert node.content
    return node.content


def _condemned_but_used(repo: Repository, tmp_path: Path) -> tuple[Path, Snapshot, set[str]]:
    """A backup that deduplicated against packs a waiting prune plan condemned: the snapshot's
    blobs are found only in packs listed by superseded index objects. Returns the source, the
    snapshot and the condemned packs it uses."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(os.urandom(500_000))
    old = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert old is not None
    forget(repo, plan_forget(repo, ForgetOptions(snapshots=[old.id])))  # x.bin now unused
    # another client starts a backup: its lock is taken and the index loaded before the prune
    other = _fresh(repo)
    other_lock = other.lock()
    _ = other.index
    other.reload_index = lambda: other.index  # type: ignore[method-assign]  # loaded already
    _, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=3600))
    assert res.plan_id is not None and res.plans_waiting == 1 and res.deleted_packs == 0
    result = backup(other, BackupOptions(paths=[str(src)]), lock=other_lock)
    other_lock.release()
    snap = result.snapshot
    assert snap is not None and result.summary["data_added"] < 10_000  # it deduplicated
    index = repo.reload_index()
    assert index.state.superseded and index.state.plans == {res.plan_id}
    assert not any(index.is_live(b) for b in _content(repo, snap, "x.bin"))
    used: set[str] = set()  # the condemned packs holding what the snapshot uses (trees too)
    for blob in referenced_blobs(repo, [snap]):
        if not index.is_live(blob):
            loc = index.lookup(blob)
            assert loc is not None
            used.add(loc.pack_id.hex())
    return src, snap, used


def test_a_condemned_pack_used_by_a_newer_backup_is_not_damage(
    repo: Repository, tmp_path: Path
) -> None:
    src, snap, used = _condemned_but_used(repo, tmp_path)
    fresh = _fresh(repo)
    res = check(fresh)
    assert res.ok, res.errors
    assert any("condemned by prune but still used" in n for n in res.notes), res.notes
    full = check(fresh, CheckOptions(read_data=True))
    assert full.ok, full.errors
    live = {p.pack_id.hex() for p in fresh.reload_index().packs()}
    assert full.packs_read == len(live | used)  # the condemned packs in use were read too
    dry = repair_snapshots(fresh, dry_run=True)
    assert dry.dropped == [] and dry.rewritten == {}
    # the grace ends: the plan finishes, keeping the packs the new snapshot uses
    done = finish_plans(repo, grace_s=0)  # takes a prune lock of its own
    assert len(done.plans_finished) == 1 and done.rescued_packs >= 1
    after = _fresh(repo)
    assert check(after, CheckOptions(read_data=True)).ok
    restore(after, after.find_snapshot(snap.id), RestoreOptions(target=str(tmp_path / "r")))
    out = tmp_path / "r" / str(src).lstrip("/") / "x.bin"
    assert out.read_bytes() == (src / "x.bin").read_bytes()


def test_read_data_reads_condemned_packs_still_in_use(repo: Repository, tmp_path: Path) -> None:
    _, snap, used = _condemned_but_used(repo, tmp_path)
    (blob, *_) = _content(repo, snap, "x.bin")
    loc = repo.reload_index().lookup(blob)
    assert loc is not None and loc.pack_id.hex() in used
    pid = loc.pack_id.hex()
    path = tmp_path / "lib-repo" / pack_name(pid)
    data = bytearray(path.read_bytes())
    data[loc.entry.offset + loc.entry.length // 2] ^= 0x55  # inside a blob of x.bin
    path.write_bytes(bytes(data))
    fresh = _fresh(repo)
    assert check(fresh).ok  # the structure is sound
    res = check(fresh, CheckOptions(read_data=True))
    assert not res.ok
    assert any(f.endswith("/x.bin") for f in res.damaged_files), res.errors
    assert not any("is lost" in e for e in res.errors), res.errors


# --- index entries against the packs' own headers ---------------------------------------------


def _two_small_files(repo: Repository, tmp_path: Path) -> tuple[Path, Snapshot]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(8_000))  # one blob each, both in one data pack
    (src / "b.bin").write_bytes(os.urandom(9_000))
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    return src, snap


def _listing(repo: Repository, pack_id: bytes) -> tuple[str, IndexFile, IndexedPack]:
    """The index object that lists a pack, and that pack's entry in it."""
    for iid in repo.list_ids("index/"):
        f = repo.read_index_file(iid, use_cache=False)
        for p in f.packs:
            if p.pack_id == pack_id:
                return iid, f, p
    raise AssertionError("the pack is not indexed")


def test_read_data_compares_index_entries_with_pack_headers(
    repo: Repository, tmp_path: Path
) -> None:
    _, snap = _two_small_files(repo, tmp_path)
    (a,) = _content(repo, snap, "a.bin")
    (b,) = _content(repo, snap, "b.bin")
    loc_a, loc_b = repo.index.lookup(a), repo.index.lookup(b)
    assert loc_a is not None and loc_b is not None and loc_a.pack_id == loc_b.pack_id
    _, _, pack = _listing(repo, loc_a.pack_id)
    # a forged index object pointing a's id at the wrong offset of the real pack
    wrong = [
        dataclasses.replace(e, offset=loc_b.entry.offset) if e.id == a else e for e in pack.blobs
    ]
    forged_offset = repo.store_index(IndexFile([dataclasses.replace(pack, blobs=wrong)]))
    # and one claiming that the pack holds a blob it does not hold
    ghost = PackEntry(1, os.urandom(32), loc_b.entry.offset, loc_b.entry.length, 9_000, 0)
    extra = dataclasses.replace(pack, blobs=[*pack.blobs, ghost])
    forged_extra = repo.store_index(IndexFile([extra]))
    fresh = _fresh(repo)
    assert check(fresh).ok  # structure only: every blob is indexed in a present pack
    res = check(fresh, CheckOptions(read_data=True))
    pid = loc_a.pack_id.hex()[:16]
    rest = list(res.errors)
    for iid, blob in ((forged_offset, a), (forged_extra, ghost.id)):
        want = (
            f"index {iid[:16]}: entry for blob {blob.hex()[:16]} in pack {pid} does not match "
            "the pack's header (forged or corrupt index)"
        )
        hits = [e for e in rest if e.startswith(want)]
        assert len(hits) == 1, (want, res.errors)
        rest.remove(hits[0])
    # a.bin is damaged only if reads of a go by the forged entry (whichever index object the
    # master index meets first); b.bin and the pack itself are sound
    assert all(e.endswith("/a.bin is damaged") for e in rest), res.errors
    forged_first = fresh.index.lookup(a) == dataclasses.replace(
        loc_a, entry=dataclasses.replace(loc_a.entry, offset=loc_b.entry.offset)
    )
    assert len(rest) == (1 if forged_first else 0), res.errors


def test_an_entry_pointing_at_another_blobs_bytes_fails(repo: Repository, tmp_path: Path) -> None:
    """The index says blob a is where blob b is stored: decrypting succeeds (same pack key,
    right offset, length and codec), only the content-id comparison catches it."""
    src, snap = _two_small_files(repo, tmp_path)
    (a,) = _content(repo, snap, "a.bin")
    (b,) = _content(repo, snap, "b.bin")
    loc_a, loc_b = repo.index.lookup(a), repo.index.lookup(b)
    assert loc_a is not None and loc_b is not None and loc_a.pack_id == loc_b.pack_id
    iid, f, pack = _listing(repo, loc_a.pack_id)
    swapped = [dataclasses.replace(loc_b.entry, id=a) if e.id == a else e for e in pack.blobs]
    packs = [dataclasses.replace(p, blobs=swapped) if p is pack else p for p in f.packs]
    repo.store_index(IndexFile(packs))
    repo.backend.delete(index_name(iid))  # the forged index object is the only one listing a
    fresh = _fresh(repo)
    with pytest.raises(IntegrityError, match="does not match its id"):
        fresh.read_blob(a)
    res = restore(fresh, fresh.find_snapshot(snap.id), RestoreOptions(target=str(tmp_path / "r")))
    assert any("a.bin" in e and "does not match its id" in e for e in res.errors), res.errors
    out = tmp_path / "r" / str(src).lstrip("/")
    assert (out / "b.bin").read_bytes() == (src / "b.bin").read_bytes()
    # structure only: the forged entry's length disagrees with a.bin's size (real damage)
    assert [e for e in check(fresh).errors if "a.bin: its size says" in e]
    full = check(fresh, CheckOptions(read_data=True))
    assert any(
        f"entry for blob {a.hex()[:16]}" in e and "does not match the pack's header" in e
        for e in full.errors
    ), full.errors
    assert [f for f in full.damaged_files if f.endswith("a.bin")], full.errors
    assert not [f for f in full.damaged_files if f.endswith("b.bin")], full.errors


# --- objects that cannot be read ------------------------------------------------------------


def _plant(repo: Repository, prefix: str, data: bytes) -> str:
    oid = storage_id(data)
    repo.backend.store(f"{prefix}/{oid}", data)
    return oid


def test_unreadable_plans_and_index_objects_are_named(repo: Repository, tmp_path: Path) -> None:
    _two_small_files(repo, tmp_path)
    key = repo.secrets.meta_key

    def forged(kind: Kind) -> bytes:  # a well-formed envelope that fails authentication
        return OBJECT_MAGIC + bytes([2, kind, 0, 0]) + os.urandom(32 + 64)

    bad_plans = [
        _plant(repo, "plans", forged(Kind.PLAN)),
        _plant(repo, "plans", meta_object(b"\x93not a plan", Kind.PLAN, meta_key=key)),
        _plant(repo, "plans", os.urandom(100)),
    ]
    bad_indexes = [
        _plant(repo, "index", forged(Kind.INDEX)),
        _plant(repo, "index", meta_object(b"\x93not an index", Kind.INDEX, meta_key=key)),
    ]
    res = check(_fresh(repo))
    for pid in bad_plans:
        assert any(e.startswith(f"plan {pid[:16]}: ") for e in res.errors), (pid, res.errors)
    for iid in bad_indexes:
        assert any(e.startswith(f"index {iid[:16]}: ") for e in res.errors), (iid, res.errors)
    assert any("failed authentication" in e for e in res.errors if e.startswith("plan"))
    assert len(res.errors) == len(bad_plans) + len(bad_indexes), res.errors
    assert plan_name(bad_plans[0]) in {i.name for i in repo.backend.list("plans/")}
