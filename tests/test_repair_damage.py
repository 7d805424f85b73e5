"""Repair never destroys what still restores, and heals (issue 8).

Real local repositories; damage is one byte flipped in a file on disk. The rule checked every
time: every file that restored before repair still restores after it (hash compare), the
original snapshots still exist, and the next backup of the same source brings check back to
clean with every file restorable."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from safehold.errors import SafeholdError
from safehold.format.pack import TRAILER
from safehold.format.snapshot import Snapshot
from safehold.ids import BlobType, pack_name
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, check
from safehold.ops.repair import repair_index, repair_snapshots
from safehold.ops.restore import RestoreOptions, iter_files, restore
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD, Cli
from tests.support.treecmp import compare_trees


def _source(tmp_path: Path) -> Path:
    """About 40 files of random data (several data packs of 1 MiB) and some text."""
    src = tmp_path / "src"
    for d in range(4):
        sub = src / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(10):
            (sub / f"f{f}.bin").write_bytes(os.urandom(20_000 + 9_000 * f))
        (sub / "notes.txt").write_text(f"directory {d}\n" * 500)
    return src


def _fresh(repo: Repository) -> Repository:
    return Repository.open(repo.backend, PASSWORD.encode())  # no cache


def _files(src: Path) -> dict[str, str]:
    out = {}
    for p in sorted(src.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(src))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _restored(repo: Repository, snap: Snapshot, target: Path, src: Path) -> set[str]:
    """The files of ``src`` that restore from ``snap`` identical to the source."""
    try:
        restore(repo, snap, RestoreOptions(target=str(target)))
    except SafeholdError:
        pass  # what was written is compared below
    out = target / str(src).lstrip("/")
    want = _files(src)
    got = _files(out) if out.is_dir() else {}
    return {p for p, h in want.items() if got.get(p) == h}


def _flip(path: Path, offset: int) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _biggest_pack(repo: Repository, kind: BlobType = BlobType.DATA) -> tuple[str, Path]:
    packs = [p for p in repo.reload_index().packs() if p.blobs and p.blobs[0].type == kind]
    best = max(packs, key=lambda p: len(p.blobs))
    pid = best.pack_id.hex()
    return pid, Path(repo.backend.location) / pack_name(pid)


def _offset(repo: Repository, pid: str, path: Path, where: str) -> int:
    size = path.stat().st_size
    pack = repo.index.pack(bytes.fromhex(pid))
    assert pack is not None
    length = int.from_bytes(path.read_bytes()[size - 8 : size - 4], "little")
    if where == "trailer":
        return size - TRAILER.size  # the low byte of the header length
    if where == "trailer-magic":
        return size - 1
    if where == "header":
        return size - TRAILER.size - length // 2
    if where == "sealed-key":
        return 4 + 40
    if where == "magic":
        return 1
    assert where == "blob"
    e = pack.blobs[len(pack.blobs) // 2]
    return e.offset + e.length // 2


def _heal_and_check(repo: Repository, src: Path, tmp_path: Path, originals: list[str]) -> None:
    """The next backup of the same source restores identical; check is clean; the originals are
    still there and restore whole again."""
    fresh = _fresh(repo)
    snap = backup(fresh, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    after = _fresh(repo)
    res = check(after)
    assert res.ok, res.errors
    restore(after, after.find_snapshot(snap.id), RestoreOptions(target=str(tmp_path / "new")))
    assert compare_trees(src, tmp_path / "new" / str(src).lstrip("/")) == []
    ids = {s.id for s in after.snapshots()}
    assert set(originals) <= ids
    for sid in originals:
        full = _restored(after, after.find_snapshot(sid), tmp_path / f"healed-{sid[:8]}", src)
        assert full == set(_files(src)), sorted(set(_files(src)) - full)


@pytest.mark.parametrize(
    "where", ["trailer", "trailer-magic", "header", "sealed-key", "magic", "blob"]
)
def test_one_flip_in_a_pack_loses_nothing_that_restored(
    repo: Repository, tmp_path: Path, where: str
) -> None:
    src = _source(tmp_path)
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None
    pid, path = _biggest_pack(repo)
    _flip(path, _offset(repo, pid, path, where))
    before = _restored(_fresh(repo), first, tmp_path / "before", src)
    assert before, "the damage hides everything"
    if where != "blob":
        assert before == set(_files(src))  # the index still has every entry

    fixed = repair_index(_fresh(repo), read_data=True)
    assert pid not in fixed.damaged_packs
    if where in ("trailer", "trailer-magic", "header", "sealed-key"):
        assert pid in fixed.recovered_packs, fixed
    rs = repair_snapshots(_fresh(repo))
    fresh = _fresh(repo)
    assert first.id in {s.id for s in fresh.snapshots()}  # the original is never deleted
    after = _restored(fresh, fresh.find_snapshot(first.id), tmp_path / "after", src)
    assert before <= after, sorted(before - after)
    if where == "blob":
        assert len(fixed.damaged_blobs) == 1
        assert list(rs.rewritten) == [first.id] and len(rs.dropped) == 1
        new = fresh.find_snapshot(rs.rewritten[first.id])
        assert "repaired" in new.tags and new.summary["repaired_from"] == first.id
        assert _restored(fresh, new, tmp_path / "repaired", src) == before
        # a second run repairs nothing again: no pile of duplicates
        again = repair_snapshots(_fresh(repo))
        assert again.rewritten == {} and len(_fresh(repo).snapshots()) == 2
    else:
        assert rs.rewritten == {} and rs.dropped == []
    _heal_and_check(repo, src, tmp_path, [first.id])


def test_a_flipped_tree_pack_header_keeps_every_directory(repo: Repository, tmp_path: Path) -> None:
    src = _source(tmp_path)
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None
    pid, path = _biggest_pack(repo, BlobType.TREE)
    _flip(path, _offset(repo, pid, path, "header"))
    fixed = repair_index(_fresh(repo))
    assert pid in fixed.recovered_packs and not fixed.damaged_packs
    assert repair_snapshots(_fresh(repo)).rewritten == {}
    fresh = _fresh(repo)
    assert _restored(fresh, first, tmp_path / "after", src) == set(_files(src))
    _heal_and_check(repo, src, tmp_path, [first.id])


@pytest.mark.parametrize("where", ["header", "trailer"])
def test_blobs_of_a_pack_with_a_damaged_header_are_found_by_scanning(
    repo: Repository, tmp_path: Path, where: str
) -> None:
    """No index entry to go by (every index object is gone): the pack is scanned blob by blob,
    and every blob found verifies by decryption and its content id."""
    src = _source(tmp_path)
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None
    pid, path = _biggest_pack(repo)
    want = {e.id: e for e in repo.index.pack(bytes.fromhex(pid)).blobs}  # type: ignore[union-attr]
    _flip(path, _offset(repo, pid, path, where))
    for info in list(repo.backend.list("index/")):
        repo.backend.delete(info.name)
    fixed = repair_index(_fresh(repo))
    assert pid in fixed.recovered_packs and "scan" in fixed.recovered_packs[pid]
    # its verified blobs were copied into a healthy pack, which the index now lists
    assert pid in fixed.rewritten_packs
    fresh = _fresh(repo)
    for blob_id in want:
        loc = fresh.index.lookup(blob_id)
        assert loc is not None and loc.pack_id.hex() != pid
        fresh.read_blob(blob_id)
    assert repair_snapshots(_fresh(repo)).rewritten == {}
    assert _restored(_fresh(repo), first, tmp_path / "after", src) == set(_files(src))
    _heal_and_check(repo, src, tmp_path, [first.id])


def test_a_stray_copy_under_a_wrong_name_is_not_indexed(repo: Repository, tmp_path: Path) -> None:
    src = _source(tmp_path)
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None
    pid, path = _biggest_pack(repo)
    fake = "ab" * 32
    stray = Path(repo.backend.location) / pack_name(fake)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(path.read_bytes())
    fixed = repair_index(_fresh(repo))
    assert fixed.strays == {pack_name(fake): pid}
    fresh = _fresh(repo)
    assert fresh.index.pack(bytes.fromhex(fake)) is None
    assert fresh.index.pack(bytes.fromhex(pid)) is not None
    assert stray.exists()  # reported, not deleted
    res = check(fresh, CheckOptions(read_data=True))
    assert res.ok, res.errors


def test_a_stray_copy_that_is_the_only_copy_is_stored_under_its_name(
    repo: Repository, tmp_path: Path
) -> None:
    """The pack was moved to a wrong name: its content is intact, so repair stores it again
    under its own name (the stray stays), and nothing is lost."""
    src = _source(tmp_path)
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None
    pid, path = _biggest_pack(repo)
    fake = "cd" * 32
    stray = Path(repo.backend.location) / pack_name(fake)
    stray.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, stray)
    fixed = repair_index(_fresh(repo))
    assert fixed.strays == {pack_name(fake): pid} and fixed.copied == [pid]
    assert path.exists() and stray.exists()
    fresh = _fresh(repo)
    assert fresh.index.pack(bytes.fromhex(fake)) is None
    assert _restored(fresh, first, tmp_path / "after", src) == set(_files(src))
    assert check(fresh, CheckOptions(read_data=True)).ok


def test_repair_keeps_known_damage_and_a_backup_heals_it(repo: Repository, tmp_path: Path) -> None:
    """A blob found bad is recorded in the rebuilt index: it is no longer deduplicated against,
    so the next backup stores it again and the original snapshot restores whole."""
    src = _source(tmp_path)
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None
    pid, path = _biggest_pack(repo)
    pack = repo.index.pack(bytes.fromhex(pid))
    assert pack is not None
    bad = pack.blobs[len(pack.blobs) // 2]
    _flip(path, _offset(repo, pid, path, "blob"))
    fixed = repair_index(_fresh(repo), read_data=True)
    assert fixed.damaged_blobs == [f"{pid}:{bad.id.hex()}"]
    fresh = _fresh(repo)
    assert bad.id not in fresh.index
    assert (bytes.fromhex(pid), bad.id) in fresh.index.damaged()
    # without read_data, a rebuild carries the record forward
    repair_index(_fresh(repo))
    fresh = _fresh(repo)
    assert bad.id not in fresh.index
    assert (bytes.fromhex(pid), bad.id) in fresh.index.damaged()
    assert list(repair_snapshots(_fresh(repo)).rewritten) == [first.id]
    _heal_and_check(repo, src, tmp_path, [first.id])


def test_repair_snapshots_keeps_originals_and_forgets_them_only_when_asked(
    repo: Repository, tmp_path: Path
) -> None:
    src = _source(tmp_path)
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None
    lost = next(n for p, n in iter_files(repo, first.tree) if p.endswith("d1/f3.bin"))
    assert lost.content
    loc = repo.index.lookup(lost.content[0])
    assert loc is not None
    repo.backend.delete(pack_name(loc.pack_id.hex()))
    repair_index(_fresh(repo))
    res = repair_snapshots(_fresh(repo))
    new_id = res.rewritten[first.id]
    assert {s.id for s in _fresh(repo).snapshots()} == {first.id, new_id}
    assert _fresh(repo).find_snapshot("latest").id == new_id  # the next backup's parent
    # again: nothing new (the repaired one exists), and with forget_originals the original goes
    assert repair_snapshots(_fresh(repo)).rewritten == {}
    gone = repair_snapshots(_fresh(repo), forget_originals=True)
    assert gone.rewritten == {} and gone.forgotten == [first.id]
    assert {s.id for s in _fresh(repo).snapshots()} == {new_id}


def test_cli_repair_keeps_originals_and_says_what_it_did(cli: Cli, tmp_path: Path) -> None:
    src = _source(tmp_path)
    cli.ok("init", "--chunk-avg", "64K", "--pack-size", "1M")
    cli.ok("backup", str(src))
    first = json.loads(cli.ok("--json", "snapshots").out)
    first_id = (first[0] if isinstance(first, list) else first["snapshots"][0])["id"]
    packs = sorted((cli.repo / "data").rglob("*"), key=lambda p: p.stat().st_size)
    path = [p for p in packs if p.is_file()][-1]
    _flip(path, path.stat().st_size - TRAILER.size - 40)  # inside the encrypted header
    r = cli("repair", "index", "--read-data")
    assert r.code == 1 and "1 damaged packs kept" in r.out, str(r)
    assert "rewrote 0 snapshots" in cli.ok("repair", "snapshots").out
    cli.ok("restore", first_id, "--target", str(tmp_path / "r"))
    assert compare_trees(src, tmp_path / "r" / str(src).lstrip("/")) == []
    # the good blobs now live in a healthy pack: prune removes the damaged one, check is clean
    cli.ok("prune")
    assert not path.exists()
    cli.ok("check", "--read-data")
    # a file's data lost: a repaired copy beside the original, then removed only when asked
    victim = sorted((cli.repo / "data").rglob("*"), key=lambda p: p.stat().st_size)
    victim[-1].unlink()
    cli("repair", "index")
    out = cli.ok("repair", "snapshots").out
    assert "repaired as" in out and "the originals are kept" in out
    assert "rewrote 0 snapshots" in cli.ok("repair", "snapshots").out
    out = cli.ok("repair", "snapshots", "--forget-originals").out
    assert "forgot 1 original snapshots" in out
    listed = cli.ok("snapshots").out
    assert first_id[:8] not in listed


def test_read_data_drops_a_damage_record_for_a_copy_that_verifies(
    repo: Repository, tmp_path: Path
) -> None:
    """A record can be wrong (a read failed for a moment, a byte was put back): reading every
    blob settles it, and a copy that verifies is usable again."""
    src = _source(tmp_path)
    backup(repo, BackupOptions(paths=[str(src)]))
    pid, _ = _biggest_pack(repo)
    blob = repo.index.pack(bytes.fromhex(pid)).blobs[0].id  # type: ignore[union-attr]
    repo.note_damaged(bytes.fromhex(pid), [blob], "test")
    assert repo.save_damage() is not None
    assert blob not in _fresh(repo).index
    kept = repair_index(_fresh(repo))  # not read: the record stays
    assert kept.damage_records == 1 and blob not in _fresh(repo).index
    fixed = repair_index(_fresh(repo), read_data=True)
    assert fixed.damage_records == 0 and fixed.damaged_blobs == []
    assert blob in _fresh(repo).index


def test_a_trailer_claiming_a_huge_header_is_recovered_not_believed(
    repo: Repository, tmp_path: Path
) -> None:
    """A trailer that claims a 4 GiB header (storable with no key) costs nothing: the pack is read
    as what it is, and its blobs are found by scanning."""
    src = _source(tmp_path)
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None
    pid, path = _biggest_pack(repo)
    data = bytearray(path.read_bytes())
    data[-8:-4] = (0xFFFFFF00).to_bytes(4, "little")
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))
    for info in list(repo.backend.list("index/")):
        repo.backend.delete(info.name)
    fixed = repair_index(_fresh(repo))
    assert "scanning" in fixed.recovered_packs[pid]
    assert _restored(_fresh(repo), first, tmp_path / "after", src) == set(_files(src))


def test_packs_under_each_others_names_are_rescued_not_lost(cli: Cli, tmp_path: Path) -> None:
    """Two intact packs stored under each other's names: each content is the only copy of its
    pack, and its own name is taken. Repair copied neither (indexing 0 packs), and repair
    snapshots + prune then deleted both. Now their blobs are copied into new packs."""
    src = _source(tmp_path)
    cli.ok("init", "--chunk-avg", "64K", "--pack-size", "1M")
    cli.ok("backup", str(src))
    packs = sorted(
        (p for p in (cli.repo / "data").rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size
    )
    a, b = packs[0], packs[1]
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    r = cli("repair", "index")
    assert r.code in (0, 1), r
    cli.ok("repair", "snapshots", "--forget-originals")
    cli.ok("prune")
    cli.ok("restore", "latest", "--target", str(tmp_path / "r"))
    assert compare_trees(src, tmp_path / "r" / str(src).lstrip("/")) == []
    cli.ok("check", "--read-data")


def test_an_intact_stray_copy_mends_a_damaged_pack(cli: Cli, tmp_path: Path) -> None:
    """A flipped blob in pack P and an intact copy of P under a wrong name: repair recorded the
    blob as lost and called the copy garbage (prune would delete it). Now the copy's blobs are
    copied into a new pack, and everything restores."""
    src = _source(tmp_path)
    cli.ok("init", "--chunk-avg", "64K", "--pack-size", "1M")
    cli.ok("backup", str(src))
    pack = max(
        (p for p in (cli.repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    stray = cli.repo / "data" / "00" / ("00" + pack.name[2:])
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(pack.read_bytes())
    _flip(pack, 500)
    r = cli("repair", "index")
    assert r.code in (0, 1), r
    cli.ok("check", "--read-data")
    cli.ok("prune")
    cli.ok("restore", "latest", "--target", str(tmp_path / "r"))
    assert compare_trees(src, tmp_path / "r" / str(src).lstrip("/")) == []
    cli.ok("check", "--read-data")


def test_repair_snapshots_walks_a_tree_deeper_than_the_recursion_limit(repo: Repository) -> None:
    """repair snapshots recursed once per level: a 1,500-level tree (backup and restore handle
    any depth) failed with RecursionError. It now keeps its own stack."""
    from tests.test_restore_damage import _chain

    snap = _chain(repo, 1500)
    bottom = repo.read_tree(snap.tree)
    while bottom[0].type == "dir":
        bottom = repo.read_tree(bottom[0].subtree)  # type: ignore[arg-type]
    loc = repo.index.lookup((bottom[0].content or [])[0])
    assert loc is not None
    (Path(repo.backend.location) / pack_name(loc.pack_id.hex())).unlink()  # the file is lost
    res = repair_snapshots(_fresh(repo))
    assert list(res.rewritten) == [snap.id]
    assert res.dropped == [f"{snap.id[:8]}: {'/d' * 1500}/f (data lost)"], res.dropped[:1]
