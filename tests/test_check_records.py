"""Issue 8, check: it names every kind of damage (key files, the config, snapshot objects, a tree
DAG that expands beyond its snapshot's summary), records the blobs it finds bad so that the next
backup stores them again, and tells a prune that finishes while it runs from damage."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from safehold.backends.base import Backend, ObjectInfo
from safehold.compress import Compression
from safehold.crypto import KdfParams
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node, tree_to_bytes
from safehold.ids import BlobType, key_name, pack_name, plan_name, snapshot_name, storage_id
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, check
from safehold.ops.forget import ForgetOptions, forget, plan_forget
from safehold.ops.prune import PruneOptions, prune
from safehold.ops.restore import RestoreOptions, iter_files, restore
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD


def _fresh(backend: Backend) -> Repository:
    """The repository opened again, without a cache: what another client sees."""
    return Repository.open(backend, PASSWORD.encode())


def _src(tmp_path: Path, name: str = "src") -> Path:
    src = tmp_path / name
    (src / "d").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(600_000))  # at least 3 chunks (max 256 KiB)
    (src / "d" / "b.txt").write_text("bravo " * 2000)
    return src


def _content(repo: Repository, snap: Snapshot, suffix: str) -> list[bytes]:
    node = next(n for p, n in iter_files(repo, snap.tree) if p.endswith(suffix))
    assert node.content
    return node.content


def _flip(repo: Repository, blob: bytes) -> bytes:
    """Flips a byte inside the stored copy of ``blob``; returns its pack id."""
    loc = repo.reload_index().lookup(blob)
    assert loc is not None
    path = Path(repo.backend.location) / pack_name(loc.pack_id.hex())
    data = bytearray(path.read_bytes())
    data[loc.entry.offset + loc.entry.length // 2] ^= 0x40
    path.write_bytes(bytes(data))
    return loc.pack_id


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_read_data_records_bad_blobs_and_the_next_backup_heals(
    repo: Repository, tmp_path: Path
) -> None:
    src = _src(tmp_path)
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    bad = _content(repo, snap, "a.bin")[1]
    pack = _flip(repo, bad)
    res = check(_fresh(repo.backend), CheckOptions(read_data=True))
    assert not res.ok
    assert [f for f in res.damaged_files if f.endswith("/a.bin")], res.errors
    # every client learns it: the record is in the repository
    other = _fresh(repo.backend)
    assert other.reload_index().is_damaged(pack, bad)
    # the next backup of the unchanged source stores the blob again, healing both snapshots
    again = backup(other, BackupOptions(paths=[str(src)])).snapshot
    assert again is not None
    for s in (snap, again):
        target = tmp_path / f"r-{s.id[:8]}"
        restore(_fresh(repo.backend), s, RestoreOptions(target=str(target)))
        assert _digest(target / str(src).lstrip("/")) == _digest(src)
    # the damaged copy stays until prune drops it: a note, not data loss
    after = check(_fresh(repo.backend), CheckOptions(read_data=True))
    assert after.ok, after.errors
    want = f"pack {pack.hex()[:16]}: blob {bad.hex()[:16]}: damaged copy, another copy is good"
    assert any(n.startswith(want) for n in after.notes), after.notes


def test_a_subset_records_what_it_reads_bad(repo: Repository, tmp_path: Path) -> None:
    src = _src(tmp_path)
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    bad = _content(repo, snap, "a.bin")[0]
    pack = _flip(repo, bad)
    state = tmp_path / "state.json"
    found = False
    for _ in range(10):
        res = check(_fresh(repo.backend), CheckOptions(subset="1M", state_file=state))
        found = found or bool(res.damaged_files)
        if res.cycle_complete:
            break
    assert found
    assert _fresh(repo.backend).reload_index().is_damaged(pack, bad)


def test_a_missing_pack_is_named_and_recorded(repo: Repository, tmp_path: Path) -> None:
    src = _src(tmp_path)
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert snap is not None
    blobs = _content(repo, snap, "a.bin")
    loc = repo.reload_index().lookup(blobs[0])
    assert loc is not None
    (Path(repo.backend.location) / pack_name(loc.pack_id.hex())).unlink()
    res = check(_fresh(repo.backend))
    pid = loc.pack_id.hex()[:16]
    assert f"pack {pid} is indexed but missing from storage" in res.errors, res.errors
    assert any(
        e.endswith("/a.bin: data blob " + blobs[0].hex()[:16] + " is lost") for e in res.errors
    )
    other = _fresh(repo.backend).reload_index()
    assert other.is_damaged(loc.pack_id, blobs[0])


class _Hooked:
    """A backend that runs ``hook`` once, at the first call of ``op`` on a name under ``prefix``:
    after the call's answer was read (a listing from before the hook), or ``before`` it."""

    def __init__(
        self,
        inner: Backend,
        op: str,
        prefix: str,
        hook: Callable[[], None],
        *,
        before: bool = False,
    ) -> None:
        self.inner = inner
        self.op, self.prefix, self.hook, self.before = op, prefix, hook, before
        self.fired = False

    @property
    def location(self) -> str:
        return self.inner.location

    def _after(self, op: str, name: str) -> None:
        if not self.fired and op == self.op and name.startswith(self.prefix):
            self.fired = True
            self.hook()

    def create(self) -> None:
        self.inner.create()

    def list(self, prefix: str) -> list[ObjectInfo]:
        if self.before:
            self._after("list", prefix)
        got = list(self.inner.list(prefix))
        self._after("list", prefix)
        return got

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self._after("load", name)  # the load comes after the hook: the object may be gone
        return self.inner.load(name, offset, length)

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        self.inner.store(name, data, overwrite=overwrite)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def stat(self, name: str) -> ObjectInfo:
        return self.inner.stat(name)

    def close(self) -> None:
        self.inner.close()


def _with_unused_pack(repo: Repository, tmp_path: Path) -> tuple[Path, Snapshot]:
    """Two snapshots; the older is forgotten, so a prune deletes its packs."""
    old_src = tmp_path / "old"
    old_src.mkdir()
    (old_src / "gone.bin").write_bytes(os.urandom(300_000))
    old = backup(repo, BackupOptions(paths=[str(old_src)])).snapshot
    src = _src(tmp_path)
    snap = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert old is not None and snap is not None
    forget(repo, plan_forget(repo, ForgetOptions(snapshots=[old.id])))
    return src, snap


def _prune_now(backend: Backend) -> Callable[[], None]:
    def run() -> None:
        _, res = prune(_fresh(backend), PruneOptions(max_unused=0.0, grace_s=0))
        assert res.deleted_packs >= 1 and res.plans_finished, res

    return run


def test_a_prune_finishing_while_check_reads_packs_is_not_damage(
    repo: Repository, tmp_path: Path
) -> None:
    _with_unused_pack(repo, tmp_path)
    inner = repo.backend
    hooked = _Hooked(inner, "load", "data/", _prune_now(inner))
    res = check(_fresh(hooked), CheckOptions(read_data=True, workers=1))  # type: ignore[arg-type]
    assert hooked.fired
    assert res.ok, res.errors
    assert any("deleted by a prune while check ran" in n for n in res.notes), res.notes
    assert not _fresh(inner).reload_index().damaged()  # and nothing was recorded as damaged


def test_a_prune_finishing_while_check_loads_the_index_is_not_damage(
    repo: Repository, tmp_path: Path
) -> None:
    """The index objects are listed, then a prune replaces them all: every one check reads is
    gone. Before, every tree was 'lost'; now check lists storage and the index again."""
    _with_unused_pack(repo, tmp_path)
    inner = repo.backend
    hooked = _Hooked(inner, "list", "index/", _prune_now(inner))
    fresh = _fresh(hooked)  # type: ignore[arg-type]
    hooked.fired = False  # opening listed nothing under index/; only check's listing counts
    res = check(fresh, CheckOptions(read_data=True))
    assert hooked.fired
    assert res.ok, res.errors
    assert res.snapshots == 1 and res.trees >= 2


def test_a_prune_finishing_between_index_and_listing_is_not_damage(
    repo: Repository, tmp_path: Path
) -> None:
    """The index is read with the old packs live; a prune deletes them before storage is listed:
    not damage, since they are gone from the second listing because a plan condemned them."""
    _with_unused_pack(repo, tmp_path)
    inner = repo.backend
    hooked = _Hooked(inner, "list", "data/", _prune_now(inner), before=True)
    res = check(_fresh(hooked))  # type: ignore[arg-type]
    assert hooked.fired
    assert res.ok, res.errors


def test_a_condemned_pack_that_is_gone_is_not_missing(repo: Repository, tmp_path: Path) -> None:
    """A waiting plan condemned the forgotten snapshot's packs: once they are gone (as when the
    plan's deletion is half done) check is clean; a plan that cannot be read condemns nothing."""
    _with_unused_pack(repo, tmp_path)
    _, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=3600))
    assert res.plan_id is not None and res.plans_waiting == 1 and res.deleted_packs == 0
    plan = _fresh(repo.backend).read_plan(res.plan_id)
    assert plan.condemned
    for pid in plan.condemned:
        (Path(repo.backend.location) / pack_name(pid.hex())).unlink()
    done = check(_fresh(repo.backend), CheckOptions(read_data=True))
    assert done.ok, done.errors
    # the plan damaged: its index objects are live again, and their packs missing
    path = Path(repo.backend.location) / plan_name(res.plan_id)
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    bad = check(_fresh(repo.backend))
    for pid in plan.condemned:
        assert f"pack {pid.hex()[:16]} is indexed but missing from storage" in bad.errors


# --- key files, the config, snapshot objects ------------------------------------------------


def test_damaged_key_files_are_named(repo: Repository, tmp_path: Path) -> None:
    _src(tmp_path)
    assert check(_fresh(repo.backend)).ok
    second = repo.add_key(b"another password", KdfParams(1, 1024, 1))
    third = repo.add_key(b"a third password", KdfParams(1, 1024, 1))
    path = Path(repo.backend.location) / key_name(second)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    junk = b"not a key file at all"
    repo.backend.store(key_name(storage_id(junk)), junk)  # matches its name, does not parse
    res = check(_fresh(repo.backend))
    assert any(e.startswith(f"key {second[:16]}: ") for e in res.errors), res.errors
    assert any(e.startswith(f"key {storage_id(junk)[:16]}: ") for e in res.errors), res.errors
    assert not any(third[:16] in e or repo.key_id[:16] in e for e in res.errors), res.errors
    assert len(res.errors) == 2


def test_a_damaged_config_is_named(repo: Repository, tmp_path: Path) -> None:
    src = _src(tmp_path)
    backup(repo, BackupOptions(paths=[str(src)]))
    assert check(_fresh(repo.backend)).ok
    cfg = Path(repo.backend.location) / "config"
    raw = bytearray(cfg.read_bytes())
    raw[-1] ^= 1
    cfg.write_bytes(bytes(raw))
    fresh = _fresh(repo.backend)  # opens with the copy of the config kept in the key file
    assert fresh.config_damaged
    res = check(fresh, CheckOptions(read_data=True))
    assert res.errors == ["config failed authentication (corrupt or tampered)"]


def test_a_damaged_snapshot_is_named_and_the_others_checked(
    repo: Repository, tmp_path: Path
) -> None:
    src = _src(tmp_path)
    first = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    (src / "new.txt").write_text("new")
    second = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert first is not None and second is not None
    path = Path(repo.backend.location) / snapshot_name(first.id)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    # and damage that only the other snapshot's check can find
    (Path(repo.backend.location) / pack_name(_pack_of(repo, second, "new.txt"))).unlink()
    res = check(_fresh(repo.backend))
    assert res.snapshots == 1
    assert any(e.startswith(f"snapshot {first.id[:8]}") for e in res.errors), res.errors
    assert any("/new.txt: data blob" in e and "is lost" in e for e in res.errors), res.errors


def _pack_of(repo: Repository, snap: Snapshot, suffix: str) -> str:
    loc = repo.reload_index().lookup(_content(repo, snap, suffix)[0])
    assert loc is not None
    return loc.pack_id.hex()


# --- tree DAGs --------------------------------------------------------------------------------


def _dag_snapshot(
    repo: Repository, levels: int, *, with_file: bool, summary: dict[str, int]
) -> str:
    """A snapshot whose root expands to 2**levels copies of one leaf tree: each level names the
    one below twice. Stored like any other trees (a key holder can)."""
    session = repo.write_session()
    zstd = Compression("zstd", 3)
    leaf = [Node(name=b"f", type="file", mode=0o100644, content=[])] if with_file else []
    tid = session.add_blob(BlobType.TREE, tree_to_bytes(leaf), zstd)[0]
    for _ in range(levels):
        nodes = [Node(name=n, type="dir", mode=0o40755, subtree=tid) for n in (b"a", b"b")]
        tid = session.add_blob(BlobType.TREE, tree_to_bytes(nodes), zstd)[0]
    session.flush()
    snap = Snapshot(
        time_ns=time.time_ns(),
        host="h",
        user="u",
        paths=["/dag"],
        tree=tid,
        summary={"files_new": 0, "files_changed": 0, "files_unmodified": 0, **summary},
    )
    return repo.save_snapshot(snap)


def test_a_tree_dag_beyond_its_summary_is_damage(repo: Repository, tmp_path: Path) -> None:
    src = _src(tmp_path)
    honest = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert honest is not None
    base = check(_fresh(repo.backend)).trees
    files = _dag_snapshot(repo, 30, with_file=True, summary={"files_new": 1, "dirs": 30})
    dirs = _dag_snapshot(repo, 30, with_file=False, summary={"dirs": 60, "other_entries": 0})
    t0 = time.monotonic()
    res = check(_fresh(repo.backend))
    assert time.monotonic() - t0 < 30
    assert res.trees == base + 2 * 31  # each tree read once
    for sid in (files, dirs):
        hits = [e for e in res.errors if e.startswith(f"snapshot {sid[:8]}: ")]
        # named against its summary (and, as a DAG, against its distinct entries, §10)
        assert hits and any("summary" in h for h in hits), res.errors
    assert f"{1 << 30} files" in " ".join(res.errors)
    assert not any(honest.id[:8] in e for e in res.errors)
    assert len(res.errors) == 4  # two per forged snapshot, nothing else


def test_honest_snapshots_fit_their_summary(repo: Repository, tmp_path: Path) -> None:
    """Excluded and unreadable files, a second run through the directory cache, a hardlink and
    a shared subtree (two identical folders): never more than the summary counts."""
    src = _src(tmp_path)
    (src / "skip.log").write_text("excluded")
    (src / "copy1").mkdir()
    (src / "copy1" / "same.txt").write_text("same")
    (src / "copy2").mkdir()
    (src / "copy2" / "same.txt").write_text("same")
    os.link(src / "a.bin", src / "hard.bin")
    (src / "secret").write_text("x")
    os.chmod(src / "secret", 0)
    try:
        for _ in range(2):
            backup(repo, BackupOptions(paths=[str(src)], excludes=["*.log"]))
    finally:
        os.chmod(src / "secret", 0o600)
    res = check(_fresh(repo.backend))
    assert res.ok, res.errors
