"""copy_snapshots and mirror as library calls, between real local repositories."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from safehold.backends.base import Backend, ObjectInfo
from safehold.backends.local import LocalBackend
from safehold.backends.wrappers import CountingBackend
from safehold.crypto import KdfParams
from safehold.errors import Interrupted, SnapshotNotFound, UsageError
from safehold.events import Event
from safehold.format.snapshot import Snapshot
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.copy import BY_ID, RE_CHUNK, CopyOptions, copy_mode, copy_snapshots
from safehold.ops.mirror import MirrorOptions, mirror, mirrored_name
from safehold.ops.restore import RestoreOptions, restore
from safehold.repository.locks import list_locks
from safehold.repository.repo import InitOptions, Repository
from tests.conftest import PASSWORD
from tests.support.treecmp import compare_trees
from tests.support.treegen import make_tree, mutate_tree

PW = PASSWORD.encode()
KDF = KdfParams(1, 1024, 1)


def _init(tmp: Path, name: str, **kw: Any) -> Repository:
    opts = {"chunk_avg": 64 << 10, "pack_size": 1 << 20, "kdf": KDF} | kw
    return Repository.init(
        LocalBackend(tmp / name), PW, InitOptions(**opts), cache_dir=tmp / f"cache-{name}"
    )


def _open(tmp: Path, name: str, backend: Backend | None = None) -> Repository:
    return Repository.open(
        backend or LocalBackend(tmp / name), PW, cache_dir=tmp / f"cache-{name}-2"
    )


def _data_bytes(repo: Repository) -> int:
    return sum(i.size for i in repo.backend.list("data/"))


def _backup(repo: Repository, path: Path, **kw: Any) -> Snapshot:
    res = backup(repo, BackupOptions(paths=[str(path)], **kw))
    assert res.snapshot is not None
    return res.snapshot


def _restores(repo: Repository, snap: Snapshot, source: Path, target: Path) -> None:
    res = restore(repo, snap, RestoreOptions(target=str(target)))
    assert not res.failed, res.failed
    assert compare_trees(source, target / str(source).lstrip("/")) == []


@pytest.fixture
def tree(tmp_path: Path, small_tree: Path) -> Path:
    root = tmp_path / "src"
    shutil.copytree(small_tree, root, symlinks=True)
    return root


def test_copy_by_id_dedups_and_restores(tmp_path: Path, tree: Path) -> None:
    a = _init(tmp_path, "a")
    s1 = _backup(a, tree, tags=["t1"])
    b = _init(tmp_path, "b", chunker_from=a)
    assert copy_mode(a, b) == BY_ID
    assert b.config.repo_id != a.config.repo_id and b.secrets.meta_key != a.secrets.meta_key
    seen: list[Event] = []
    res = copy_snapshots(a, b, CopyOptions(), events=seen.append)
    assert res.mode == BY_ID and [s for s, _ in res.copied] == [s1.id] and not res.failed
    assert any(e.kind == "info" and s1.id[:8] in e.message for e in seen)
    # the copy holds about what the source holds (same chunks, compressed alike)
    assert 0.9 < _data_bytes(b) / _data_bytes(a) < 1.1
    b2 = _open(tmp_path, "b")
    (copy,) = b2.snapshots()
    assert copy.original == bytes.fromhex(s1.id) and copy.tags == ["t1"]
    assert copy.tree == s1.tree  # by id: the same trees
    _restores(b2, copy, tree, tmp_path / "r1")
    assert list_locks(a.backend) == [] and list_locks(b.backend) == []

    # a second copy copies nothing
    res = copy_snapshots(a, b2, CopyOptions())
    assert res.copied == [] and res.skipped == [(s1.id, copy.id)]
    assert res.bytes_uploaded == 0 and len(b2.snapshots()) == 1

    # a changed tree: the next copy adds about what the source's backup added
    mutate_tree(tree)
    before_a, before_b = _data_bytes(a), _data_bytes(b2)
    s2 = _backup(a, tree)
    added_a = _data_bytes(a) - before_a
    res = copy_snapshots(a, b2, CopyOptions(snapshots=["latest"]))
    assert [s for s, _ in res.copied] == [s2.id]
    added_b = _data_bytes(b2) - before_b
    assert added_b < 1.2 * added_a + (64 << 10), (added_a, added_b)
    new = {s.id: s for s in b2.snapshots()}[res.copied[0][1]]
    assert new.parent == bytes.fromhex(copy.id)  # the copy of the source's parent
    _restores(_open(tmp_path, "b"), new, tree, tmp_path / "r2")


def test_copy_rechunks_when_chunkers_differ(tmp_path: Path, tree: Path) -> None:
    a = _init(tmp_path, "a")
    s1 = _backup(a, tree)
    b = _init(tmp_path, "b", chunk_avg=16 << 10)
    assert copy_mode(a, b) == RE_CHUNK
    res = copy_snapshots(a, b, CopyOptions())
    assert res.mode == RE_CHUNK and len(res.copied) == 1
    copy = _open(tmp_path, "b").snapshots()[0]
    assert copy.tree != s1.tree and copy.summary == a.load_snapshot(s1.id).summary
    _restores(_open(tmp_path, "b"), copy, tree, tmp_path / "r1")

    # the second snapshot reuses what the first copy stored for unchanged files
    mutate_tree(tree)
    s2 = _backup(a, tree)
    counting = CountingBackend(LocalBackend(tmp_path / "a"))
    a2 = _open(tmp_path, "a", counting)
    res = copy_snapshots(a2, _open(tmp_path, "b"), CopyOptions())
    assert [s for s, _ in res.copied] == [s2.id] and [s for s, _ in res.skipped] == [s1.id]
    read = counting.bytes["load"]
    assert read < _data_bytes(a) / 2, (read, _data_bytes(a))
    b2 = _open(tmp_path, "b")
    latest = b2.find_snapshot("latest")
    assert latest.original == bytes.fromhex(s2.id)
    _restores(b2, latest, tree, tmp_path / "r2")


def test_skips_copies_of_copies_and_filters(tmp_path: Path, tree: Path) -> None:
    a = _init(tmp_path, "a")
    s1 = _backup(a, tree, host="h1")
    s2 = _backup(a, tree, host="h2", tags=["x"])
    b = _init(tmp_path, "b", chunker_from=a)
    c = _init(tmp_path, "c")
    res = copy_snapshots(a, b, CopyOptions(host="h1"))
    assert [s for s, _ in res.copied] == [s1.id]
    res = copy_snapshots(b, c, CopyOptions())  # a copy of the copy names the first original
    (cc,) = _open(tmp_path, "c").snapshots()
    assert cc.original == bytes.fromhex(s1.id)
    res = copy_snapshots(a, c, CopyOptions())  # s1 is there already (as a copy of a copy)
    assert [s for s, _ in res.copied] == [s2.id] and [s for s, _ in res.skipped] == [s1.id]
    res = copy_snapshots(_open(tmp_path, "c"), a, CopyOptions())  # back home: nothing to do
    assert res.copied == [] and len(res.skipped) == 2
    assert len(a.snapshots()) == 2
    res = copy_snapshots(a, b, CopyOptions(tags=["x"], snapshots=["latest"]))
    assert [s for s, _ in res.copied] == [s2.id]
    with pytest.raises(SnapshotNotFound):
        copy_snapshots(a, b, CopyOptions(snapshots=["ffffffff"]))
    with pytest.raises(UsageError, match="same repository"):
        copy_snapshots(a, _open(tmp_path, "a"), CopyOptions())


class _StopAfterPacks(LocalBackend):
    """A real local backend that sets ``stop`` once ``after`` packs are stored."""

    def __init__(self, root: Path, stop: threading.Event, after: int) -> None:
        super().__init__(root)
        self.stop_event = stop
        self.after = after
        self.packs = 0

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        super().store(name, data, overwrite=overwrite)
        if name.startswith("data/"):
            self.packs += 1
            if self.packs >= self.after:
                self.stop_event.set()


@pytest.mark.parametrize("chunk", ["same", "other"])
def test_interrupted_copy_resumes(tmp_path: Path, chunk: str) -> None:
    src_tree = tmp_path / "big"
    make_tree(src_tree, 8 << 20, seed=3)
    a = _init(tmp_path, "a")
    _backup(a, src_tree)
    if chunk == "same":
        _init(tmp_path, "b", chunker_from=a).close()
    else:
        _init(tmp_path, "b", chunk_avg=32 << 10).close()
    stop = threading.Event()
    b = _open(tmp_path, "b", _StopAfterPacks(tmp_path / "b", stop, 2))
    with pytest.raises(Interrupted):
        copy_snapshots(a, b, CopyOptions(), stop=stop)
    assert b.snapshots() == []  # no snapshot without its data
    stored_first = _data_bytes(b)
    assert stored_first > 0
    assert list_locks(b.backend) == []
    counting = CountingBackend(LocalBackend(tmp_path / "b"))
    res = copy_snapshots(a, _open(tmp_path, "b", counting), CopyOptions())
    assert len(res.copied) == 1
    rerun = counting.stored_bytes["data"]
    total = _data_bytes(_open(tmp_path, "b"))
    # the packs of the interrupted run were indexed and reused
    assert rerun < total and rerun <= total - stored_first + (1 << 20), (rerun, total)
    b2 = _open(tmp_path, "b")
    # every pack stored, by either run, is indexed: nothing was uploaded twice
    stored = {i.name.rsplit("/", 1)[-1] for i in b2.backend.list("data/")}
    assert stored == {p.pack_id.hex() for p in b2.index.packs()}
    _restores(b2, b2.snapshots()[0], src_tree, tmp_path / "r")


def test_mirror_local(tmp_path: Path, tree: Path) -> None:
    a = _init(tmp_path, "a")
    s1 = _backup(a, tree)
    src, dst = LocalBackend(tmp_path / "a"), LocalBackend(tmp_path / "m")
    res = mirror(src, dst, MirrorOptions())
    assert res.copied > 3 and not res.failed and res.deleted == 0
    names = {i.name: i.size for i in src.list("") if mirrored_name(i.name)}
    assert {i.name: i.size for i in dst.list("") if not i.name.startswith("locks/")} == names
    m = _open(tmp_path, "m")
    _restores(m, m.find_snapshot(s1.id), tree, tmp_path / "r")
    res = mirror(src, dst, MirrorOptions())
    assert res.copied == 0 and res.skipped == len(names)
    assert list_locks(src) == [] and list_locks(dst) == []

    # damage in the source is not spread, and is named
    pack = next(n for n in names if n.startswith("data/"))
    extra = "data/00/" + "0" * 64
    dst.store(extra, b"stray")  # something the source never had
    snap2 = _backup(a, tree, tags=["two"])
    (tmp_path / "a" / pack).chmod(0o600)
    raw = bytearray((tmp_path / "a" / pack).read_bytes())
    raw[100] ^= 1
    (tmp_path / "a" / pack).write_bytes(bytes(raw))
    dst.delete(pack)
    res = mirror(src, dst, MirrorOptions(delete=True))
    assert set(res.failed) == {pack} and "does not match its name" in res.failed[pack]
    assert res.deleted == 0  # nothing is deleted while something failed
    assert dst.stat(extra).size == 5
    assert _open(tmp_path, "m").find_snapshot(snap2.id).tags == ["two"]

    # --delete removes only what the source lacks; without it nothing is deleted
    (tmp_path / "a" / pack).write_bytes(bytes(raw[:100]) + bytes([raw[100] ^ 1]) + raw[101:])
    a.backend.delete(f"snapshots/{s1.id}")
    res = mirror(src, dst, MirrorOptions())
    assert res.deleted == 0 and dst.stat(f"snapshots/{s1.id}").size > 0
    res = mirror(src, dst, MirrorOptions(delete=True))
    assert not res.failed and res.deleted == 2
    assert not any(i.name in (extra, f"snapshots/{s1.id}") for i in dst.list(""))
    assert {i.name for i in dst.list("snapshots/")} == {f"snapshots/{snap2.id}"}


def test_mirror_refuses_another_repository(tmp_path: Path) -> None:
    _init(tmp_path, "a").close()
    _init(tmp_path, "b").close()
    with pytest.raises(UsageError, match="holds another repository"):
        mirror(LocalBackend(tmp_path / "a"), LocalBackend(tmp_path / "b"))
    with pytest.raises(UsageError, match="no repository"):
        mirror(LocalBackend(tmp_path / "none"), LocalBackend(tmp_path / "c"))
    assert not mirrored_name("locks/" + "0" * 64)
    assert not mirrored_name("data/ab/.tmp-123")
    assert mirrored_name("data/00/" + "0" * 64) and not mirrored_name("data/01/" + "0" * 64)
    _ = ObjectInfo


def test_snapshot_original_field() -> None:
    from safehold.errors import FormatError
    from safehold.format.common import pack, unpack

    plain = Snapshot(1, "h", "u", ["/x"], b"t" * 32)
    assert "original" not in unpack(plain.to_bytes(), "s")  # other snapshots are unchanged
    copy = Snapshot(1, "h", "u", ["/x"], b"t" * 32, original=b"o" * 32)
    assert Snapshot.from_bytes(copy.to_bytes()).original == b"o" * 32
    obj = unpack(copy.to_bytes(), "s")
    obj["original"] = b"short"
    with pytest.raises(FormatError, match="snapshot original"):
        Snapshot.from_bytes(pack(obj))
    obj["original"] = None
    assert Snapshot.from_bytes(pack(obj)).original is None


def test_init_copies_chunker_params_only(tmp_path: Path) -> None:
    a = _init(tmp_path, "a", chunk_avg=32 << 10)
    b = _init(tmp_path, "b", chunker_from=a)
    b2 = _open(tmp_path, "b")
    assert b2.chunker_params == a.chunker_params
    assert b2.secrets.chunker_seed == a.secrets.chunker_seed
    assert b2.secrets.id_key == a.secrets.id_key
    for field in ("repo_id", "meta_key", "public_key", "private_key"):
        assert getattr(b2.secrets, field) != getattr(a.secrets, field), field
    assert b.config.pack_size == 1 << 20
    c = _init(tmp_path, "c", chunk_avg=32 << 10)
    assert c.secrets.chunker_seed != a.secrets.chunker_seed and copy_mode(a, c) == RE_CHUNK


def test_interrupted_mirror_resumes_and_keeps_snapshots_last(tmp_path: Path, tree: Path) -> None:
    a = _init(tmp_path, "a")
    _backup(a, tree)
    src, dst = LocalBackend(tmp_path / "a"), LocalBackend(tmp_path / "m")
    stop = threading.Event()
    copied: list[str] = []

    def sink(ev: Event) -> None:
        if ev.kind == "info":
            copied.append(ev.data["name"])
            if len(copied) == 2:
                stop.set()

    with pytest.raises(Interrupted):
        mirror(src, dst, MirrorOptions(workers=1), events=sink, stop=stop)
    assert len(copied) == 2 and all(n.startswith("data/") for n in copied)
    assert not any(True for _ in dst.list("snapshots/")) and list_locks(dst) == []
    rest: list[str] = []

    def record(ev: Event) -> None:
        if ev.kind == "info":
            rest.append(ev.data["name"])

    res = mirror(src, dst, MirrorOptions(workers=1), events=record)
    assert res.skipped == 2 and res.copied == len(rest) > 2 and not res.failed
    order = [n.split("/")[0] for n in rest]
    assert order[-1] == "snapshots" and "config" in order
    assert order == sorted(order, key=["data", "index", "keys", "config", "snapshots"].index)


def test_damage_in_the_source_fails_only_its_snapshot(tmp_path: Path, tree: Path) -> None:
    a = _init(tmp_path, "a")
    s1 = _backup(a, tree)
    before = {i.name for i in a.backend.list("data/")}
    other = tmp_path / "other"
    make_tree(other, 2 << 20, seed=11)
    s2 = _backup(a, other)
    for name in {i.name for i in a.backend.list("data/")} - before:
        path = tmp_path / "a" / name
        path.chmod(0o600)
        raw = bytearray(path.read_bytes())
        for at in range(200, len(raw) - 200, 4096):
            raw[at] ^= 0xFF
        path.write_bytes(bytes(raw))
    b = _init(tmp_path, "b", chunker_from=a)
    locks_seen: list[int] = []

    def sink(ev: Event) -> None:
        locks_seen.append(len(list_locks(a.backend)) + len(list_locks(b.backend)))

    res = copy_snapshots(_open(tmp_path, "a"), b, CopyOptions(), events=sink)
    assert [s for s, _ in res.copied] == [s1.id]
    assert list(res.failed) == [s2.id] and "blob" in res.failed[s2.id]
    assert locks_seen and all(n == 2 for n in locks_seen)  # a reader lock and a writer lock
    b2 = _open(tmp_path, "b")
    assert [s.original for s in b2.snapshots()] == [bytes.fromhex(s1.id)]
    _restores(b2, b2.snapshots()[0], tree, tmp_path / "r")
