"""Damage is recorded and heals (issue 8): a blob found bad is read from another copy, is never
deduplicated against again, and the next backup that meets its content stores it again, which
mends every snapshot using it; one damaged snapshot object or tree blob costs only itself; on a
versioned bucket, earlier versions of an object are tried before it is called damaged."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from safehold.backends.local import LocalBackend
from safehold.compress import Compression
from safehold.crypto import KdfParams
from safehold.errors import IntegrityError
from safehold.format.snapshot import Snapshot
from safehold.ids import BlobType, pack_name
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, check
from safehold.ops.prune import PruneOptions, prune
from safehold.repository.repo import InitOptions, Repository
from tests.conftest import PASSWORD, Cli

pytest_plugins = ["tests.backends.s3server"]


def _file_blobs(repo: Repository, snap: Snapshot, name: str) -> list[bytes]:
    """The content blob ids of the file called ``name`` (searched breadth first)."""
    todo = [snap.tree]
    while todo:
        for n in repo.read_tree(todo.pop()):
            if n.type == "dir" and n.subtree is not None:
                todo.append(n.subtree)
            elif n.name == name.encode() or n.name == name:
                return list(n.content or [])
    raise AssertionError(f"no file {name} in the snapshot")


def _read_file(repo: Repository, blobs: list[bytes]) -> bytes:
    return b"".join(bytes(repo.read_blob(b)) for b in blobs)


def _flip_blob(repo: Repository, blob_id: bytes) -> bytes:
    """Flip a byte inside the stored form of a blob, in its pack on disk; its pack id."""
    loc = repo.index.lookup(blob_id)
    assert loc is not None
    path = Path(repo.backend.location) / pack_name(loc.pack_id.hex())
    raw = bytearray(path.read_bytes())
    raw[loc.entry.offset + loc.entry.length // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    return loc.pack_id


def _reopen(repo: Repository, cache: Path | None = None) -> Repository:
    return Repository.open(
        LocalBackend(Path(repo.backend.location)), PASSWORD.encode(), cache_dir=cache
    )


def test_a_bad_blob_is_stored_again_and_the_old_snapshot_restores_again(
    repo: Repository, tmp_path: Path
) -> None:
    """Before: a new backup deduplicated against the corrupt copy, so the new snapshot could not
    restore the file either. Now the damage found by a read is recorded (in the repository, with
    a full key), the next backup stores the blob again, and the old snapshot reads the new copy."""
    src = tmp_path / "a"
    src.mkdir()
    content = os.urandom(300_000)
    (src / "f.bin").write_bytes(content)
    old = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert old is not None
    blobs = _file_blobs(repo, old, "f.bin")
    bad_pack = _flip_blob(repo, blobs[0])

    reader = _reopen(repo)
    with pytest.raises(IntegrityError):
        _read_file(reader, blobs)
    assert blobs[0] not in reader.index and not reader.index.usable(blobs[0])
    assert reader.save_damage() is not None  # a full key records it in the repository
    assert reader.save_damage() is None  # once

    # every client learns it: a fresh open without any cache
    writer = _reopen(repo)
    assert writer.index.is_damaged(bad_pack, blobs[0])
    assert blobs[0] not in writer.index  # a writer must not reuse the bad copy
    assert blobs[1] in writer.index  # the good blobs of the same pack still deduplicate
    copy = tmp_path / "b"
    shutil.copytree(src, copy)
    new = backup(writer, BackupOptions(paths=[str(copy)])).snapshot
    assert new is not None

    healed = _reopen(repo)
    assert hashlib.sha256(_read_file(healed, blobs)).digest() == hashlib.sha256(content).digest()
    assert _file_blobs(healed, new, "f.bin") == blobs

    # prune drops the damaged copy (the other blobs of its pack are repacked), and check --read-data
    # is clean again
    prune(healed, PruneOptions(max_unused=0.0, grace_s=0))
    after = _reopen(repo)
    assert not (Path(repo.backend.location) / pack_name(bad_pack.hex())).exists()
    res = check(after, CheckOptions(read_data=True))
    assert not res.errors, res.errors
    assert _read_file(after, blobs) == content


def test_the_local_cache_keeps_the_record_when_the_repository_is_not_written(
    repo: Repository, tmp_path: Path
) -> None:
    """The record goes into the local cache at once (sealed), so this machine's next backup
    stores the blob again even if nothing could be written to the repository."""
    src = tmp_path / "a"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(100_000))
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    blobs = _file_blobs(repo, snap, "f.bin")
    _flip_blob(repo, blobs[0])
    cache = tmp_path / "c"
    reader = _reopen(repo, cache)
    with pytest.raises(IntegrityError):
        reader.read_blob(blobs[0])
    # no save_damage(): as a read-only key or unwritable storage would leave it
    again = _reopen(repo, cache)
    assert blobs[0] not in again.index
    assert blobs[0] in _reopen(repo).index  # another machine has not learnt it
    for f in (cache).rglob("*"):
        if f.is_file():
            assert blobs[0] not in f.read_bytes()  # the record is sealed, not plain ids


@pytest.mark.parametrize("removal", ["forget", "repair"])
def test_a_damaged_snapshot_object_costs_only_itself(
    removal: str, cli: Cli, tmp_path: Path
) -> None:
    """Before: one flipped byte in any snapshot object made snapshots, restore, ls, backup,
    forget, prune all exit 4. Now it is named and skipped; forget ID removes it; prune refuses
    (it cannot know what the snapshot used) until then."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("hello\n")
    cli.ok("init")
    cli.ok("backup", str(src))
    (src / "g.txt").write_text("more\n")
    cli.ok("backup", str(src))
    snaps = sorted((cli.repo / "snapshots").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    bad = snaps[0]
    raw = bytearray(bad.read_bytes())
    raw[len(raw) // 2] ^= 1
    bad.write_bytes(bytes(raw))
    shutil.rmtree(tmp_path / "home" / "cache", ignore_errors=True)

    r = cli("snapshots")
    assert r.code == 1, r
    assert bad.name in r.err and "cannot be read" in r.err, r
    assert snaps[1].name[:8] in r.out
    target = tmp_path / "out"
    r = cli("restore", "latest", "--target", str(target))
    assert r.code == 1, r
    assert (target / str(src).lstrip("/") / "g.txt").read_text() == "more\n"
    r = cli("ls", "latest")
    assert r.code == 1 and "g.txt" in r.out, r
    (src / "h.txt").write_text("third\n")
    r = cli("backup", str(src))
    assert r.code == 1 and bad.name in r.err, r
    r = cli("prune")
    assert r.code == 4 and bad.name in r.err, r
    assert len(r.err.strip().splitlines()) >= 1
    if removal == "forget":
        cli.ok("forget", bad.name[:12])
    else:
        r = cli("repair", "snapshots")  # names it, keeps it
        assert r.code == 1 and bad.name in r.err and bad.exists(), r
        r = cli.ok("repair", "snapshots", "--forget-originals")
        assert "removed 1 snapshot objects that cannot be read" in r.out, r
    assert not bad.exists()
    cli.ok("prune")
    cli.ok("check", "--read-data")


def test_one_damaged_tree_blob_does_not_fail_its_pack_neighbours(
    repo: Repository, tmp_path: Path
) -> None:
    """Tree packs were cached whole: a pack failing its id made every tree in it unreadable,
    even with the damaged tree repaired. Now the other trees are read one by one."""
    src = tmp_path / "s"
    for i in range(6):
        (src / f"d{i}").mkdir(parents=True)
        (src / f"d{i}" / "f").write_text(f"file {i}\n")
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    trees = []
    todo = [snap.tree]
    while todo:
        t = todo.pop()
        trees.append(t)
        todo += [n.subtree for n in repo.read_tree(t) if n.subtree is not None]
    loc = {t: repo.index.lookup(t) for t in trees}
    victim = trees[-1]
    _flip_blob(repo, victim)
    fresh = _reopen(repo, tmp_path / "cache2")
    same_pack = [t for t in trees if t != victim and loc[t].pack_id == loc[victim].pack_id]  # type: ignore[union-attr]
    assert same_pack
    for t in same_pack:
        fresh.read_tree(t)
    with pytest.raises(IntegrityError):
        fresh.read_tree(victim)
    for t in same_pack:  # and again, now that the cache has seen the pack
        fresh._tree_cache.clear()
        fresh.read_tree(t)


def test_an_earlier_version_on_a_versioned_bucket_is_tried(
    s3_server: object, tmp_path: Path
) -> None:
    """A pack or snapshot object overwritten with damaged bytes on a versioned bucket: the
    earlier version is read instead of declaring the data damaged."""
    from safehold.backends.s3 import S3Backend

    server = s3_server
    bucket = server.new_bucket(versioned=True)  # type: ignore[attr-defined]
    backend = S3Backend(bucket, "repo", endpoint_url=server.url)  # type: ignore[attr-defined]
    repo = Repository.init(
        backend,
        PASSWORD.encode(),
        InitOptions(chunk_avg=64 << 10, pack_size=1 << 20, kdf=KdfParams(1, 1024, 1)),
    )
    src = tmp_path / "s"
    src.mkdir()
    content = os.urandom(200_000)
    (src / "f.bin").write_bytes(content)
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    blobs = _file_blobs(repo, snap, "f.bin")
    loc = repo.index.lookup(blobs[0])
    assert loc is not None
    client = server.admin  # type: ignore[attr-defined]
    for key in (f"repo/{pack_name(loc.pack_id.hex())}", f"repo/snapshots/{snap.id}"):
        raw = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        raw[len(raw) // 2] ^= 0x01
        client.put_object(Bucket=bucket, Key=key, Body=bytes(raw))
    fresh = Repository.open(
        S3Backend(bucket, "repo", endpoint_url=server.url),  # type: ignore[attr-defined]
        PASSWORD.encode(),
    )
    assert [s.id for s in fresh.snapshots()] == [snap.id] and not fresh.bad_snapshots
    assert _read_file(fresh, blobs) == content
    assert not fresh.index.damaged()
    # and an unversioned bucket says damage plainly
    plain = server.new_bucket()  # type: ignore[attr-defined]
    repo2 = Repository.init(
        S3Backend(plain, "r", endpoint_url=server.url),  # type: ignore[attr-defined]
        PASSWORD.encode(),
        InitOptions(kdf=KdfParams(1, 1024, 1)),
    )
    snap2 = backup(repo2, BackupOptions(paths=[str(src)])).snapshot
    assert snap2 is not None
    key = f"r/snapshots/{snap2.id}"
    client.put_object(Bucket=plain, Key=key, Body=b"garbage")
    fresh2 = Repository.open(S3Backend(plain, "r", endpoint_url=server.url), PASSWORD.encode())  # type: ignore[attr-defined]
    assert fresh2.snapshots() == [] and f"snapshots/{snap2.id}" in fresh2.bad_snapshots


@pytest.mark.parametrize("held_elsewhere", [False, True])
def test_a_condemned_pack_whose_header_is_unreadable_goes_only_if_nothing_needs_it(
    held_elsewhere: bool, repo: Repository, tmp_path: Path
) -> None:
    """A pack whose header cannot be read tells prune nothing of what it holds: it may be deleted
    only when every blob a present snapshot uses is held by a pack that stays (as after 'repair
    index' copied its good blobs elsewhere); otherwise it is kept, whatever a plan says."""
    from safehold.format.index import IndexFile
    from safehold.format.pack import TRAILER
    from safehold.format.plan import PlanFile
    from safehold.ids import plan_name, storage_id
    from safehold.ops.prune import finish_plans
    from safehold.repository.objects import Kind, meta_object

    src = tmp_path / "a"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(150_000))
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    blobs = _file_blobs(repo, snap, "f.bin")
    loc = repo.index.lookup(blobs[0])
    assert loc is not None
    packs = repo.index.packs()
    old_index = sorted(repo.list_ids("index/"))
    stay = [p for p in packs if p.pack_id != loc.pack_id]
    if held_elsewhere:  # its blobs copied into a new pack first, as repair index does
        session = repo.write_session()
        victim = repo.index.pack(loc.pack_id)
        assert victim is not None
        for e, data in repo.read_pack_blobs(loc.pack_id, list(victim.blobs)):
            session.add_blob(BlobType(e.type), data, Compression("auto"), e.id, dedup=False)
        session.flush()
        stay += [p for p in repo.index.packs() if p.pack_id not in {q.pack_id for q in packs}]
    # a prune that condemned the pack: its index lists the others only, and supersedes the old
    new_id = repo.store_index(IndexFile(stay, [bytes.fromhex(i) for i in old_index]))
    plan = PlanFile(
        time_ns=0,
        condemned=[loc.pack_id],
        superseded=[bytes.fromhex(i) for i in old_index],
        indexes=[bytes.fromhex(i) for i in sorted({*old_index, new_id})],
    )
    data = meta_object(plan.to_bytes(), Kind.PLAN, meta_key=repo.secrets.meta_key)
    repo.backend.store(plan_name(storage_id(data)), data)
    path = Path(repo.backend.location) / pack_name(loc.pack_id.hex())
    raw = bytearray(path.read_bytes())
    raw[-TRAILER.size] ^= 0xFF  # the header length: the header cannot be found
    path.write_bytes(bytes(raw))

    res = finish_plans(_reopen(repo))
    assert path.exists() != held_elsewhere, res
    after = _reopen(repo)
    if held_elsewhere:
        assert _read_file(after, blobs)  # from the copy
    else:
        assert res.kept_unreadable == [loc.pack_id.hex()]


def test_prune_keeps_a_damaged_only_copy_as_it_is_and_keeps_its_record(
    repo: Repository, tmp_path: Path
) -> None:
    """A pack holding the only (damaged) copy of a used blob is never repacked (the copy may yet
    be mended), and the damage record survives prune's new index, so backups still store the
    blob again."""
    from safehold.ops.forget import ForgetOptions, forget, plan_forget

    src = tmp_path / "a"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(120_000))
    (src / "b.bin").write_bytes(os.urandom(120_000))  # shares the pack, later unused
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None
    blobs = _file_blobs(repo, first, "a.bin")
    (src / "b.bin").unlink()
    second = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert second is not None
    forget(repo, plan_forget(repo, ForgetOptions(snapshots=[first.id])))
    bad_pack = _flip_blob(repo, blobs[0])
    reader = _reopen(repo)
    with pytest.raises(IntegrityError):
        reader.read_blob(blobs[0])
    reader.save_damage()

    pruner = _reopen(repo)
    plan, _ = prune(pruner, PruneOptions(max_unused=0.0, grace_s=0))
    assert plan is not None and bad_pack.hex() not in plan.condemn
    assert (Path(repo.backend.location) / pack_name(bad_pack.hex())).exists()
    after = _reopen(repo)
    assert after.index.is_damaged(bad_pack, blobs[0]) and blobs[0] not in after.index


def test_a_wrong_damage_record_never_steers_prune_into_deleting_the_good_copy(
    repo: Repository, tmp_path: Path
) -> None:
    """Two copies of a blob: the good one wrongly recorded as damaged (a byte since put back, or
    a forged record), the other really damaged but not yet found. Prune reads the copy it would
    keep before it lets the recorded one go, and keeps the recorded one when that read fails."""
    src = tmp_path / "a"
    src.mkdir()
    content = os.urandom(150_000)
    (src / "f.bin").write_bytes(content)
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    blobs = _file_blobs(repo, snap, "f.bin")
    first = repo.index.lookup(blobs[0])
    assert first is not None
    session = repo.write_session()  # a second copy, alone in a pack of its own
    session.add_blob(
        BlobType.DATA, bytes(repo.read_blob(blobs[0])), Compression("auto"), blobs[0], dedup=False
    )
    session.flush()
    copy = next(
        loc for loc in _reopen(repo).index.locations(blobs[0]) if loc.pack_id != first.pack_id
    )
    repo.note_damaged(copy.pack_id, [blobs[0]], "a wrong record")
    assert repo.save_damage() is not None
    _flip_blob(_reopen(repo), blobs[0])  # the copy the record steers to: really damaged
    assert repo.index.lookup(blobs[0]) is not None

    pruner = _reopen(repo)
    plan, _ = prune(pruner, PruneOptions(max_unused=0.0, grace_s=0))
    assert plan is None or copy.pack_id.hex() not in plan.condemn
    assert (Path(repo.backend.location) / pack_name(copy.pack_id.hex())).exists()
    after = _reopen(repo)
    assert _read_file(after, blobs) == content


def test_repair_snapshots_never_drops_a_file_on_a_wrong_damage_record(
    repo: Repository, tmp_path: Path
) -> None:
    """A damage record for a copy that verifies (a byte put back, a forged record) made repair
    drop the file, and --forget-originals + prune then lost it. Repair reads such a copy first."""
    from safehold.ops.repair import repair_snapshots

    src = tmp_path / "a"
    src.mkdir()
    (src / "f.bin").write_bytes(os.urandom(150_000))
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    blobs = _file_blobs(repo, snap, "f.bin")
    loc = repo.index.lookup(blobs[0])
    assert loc is not None
    repo.note_damaged(loc.pack_id, [blobs[0]], "a wrong record")
    repo.save_damage()
    res = repair_snapshots(_reopen(repo), forget_originals=True)
    assert res.rewritten == {} and res.dropped == []
    assert [s.id for s in _reopen(repo).snapshots()] == [snap.id]
