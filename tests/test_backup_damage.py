"""Backups never keep a torn file, never link two different files, walk trees of any depth, and
store again what the repository knows is damaged (issue 8).

Faults are injected into real parts: a writer thread rewrites a file while the backup reads it
(synchronised on the chunker's first chunk), an inode number is reported for two files (a wrapper
around the real directory listing), and bytes are flipped in (or whole packs removed from) a
real local repository."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from safehold.backends.local import LocalBackend
from safehold.format.tree import Node
from safehold.ids import pack_name
from safehold.ops import backup as backup_mod
from safehold.ops.backup import BackupOptions, BackupResult, backup
from safehold.ops.restore import RestoreOptions, restore
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD, Cli
from tests.support.treecmp import file_hash

# --- helpers ---------------------------------------------------------------------------------


def _backup(repo: Repository, *paths: Path, **kw: Any) -> BackupResult:
    return backup(repo, BackupOptions(paths=[str(p) for p in paths], **kw))


def _snapshot_files(repo: Repository, tree: bytes) -> dict[bytes, Node]:
    """Every entry of a snapshot by its path (``/a/b``), walked without recursion."""
    out: dict[bytes, Node] = {}
    stack = [(b"", tree)]
    while stack:
        prefix, tid = stack.pop()
        for node in repo.read_tree(tid):
            path = prefix + b"/" + node.name
            out[path] = node
            if node.type == "dir" and node.subtree is not None:
                stack.append((path, node.subtree))
    return out


def _content_hash(repo: Repository, node: Node) -> bytes:
    h = hashlib.sha256()
    for c in node.content or []:
        h.update(repo.read_blob(c))
    return h.digest()


def _wait_for_new_ctime(than: Path) -> None:
    """Return once a change made now gets a later ctime than ``than`` has (coarse clocks)."""
    probe = than.with_name(".ctime-probe")
    old = os.stat(than).st_ctime_ns
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        probe.write_bytes(b"x")
        if os.stat(probe).st_ctime_ns > old:
            probe.unlink()
            return
        time.sleep(0.002)
    raise AssertionError("the file system clock does not advance")


def _summary(out: str) -> dict[str, Any]:
    for line in out.splitlines():
        obj = json.loads(line)
        if obj.get("type") == "summary":
            return dict(obj)
    raise AssertionError(f"no summary in {out!r}")


def _find_pack_file(repo_dir: Path, pack_id: bytes) -> Path:
    name = pack_id.hex()
    found = [p for p in repo_dir.rglob(name + "*") if p.is_file()]
    assert len(found) == 1, found
    return found[0]


# --- torn reads ------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["plain", "mtime-reset"])
def test_file_rewritten_while_read_is_read_again(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep_mtime: bool
) -> None:
    """A writer rewrites the beginning and the end of a file (same size) while the backup reads
    it: the backup warns, and the next backup reads the file again and stores what it holds
    then (also when the writer puts the old mtime back)."""
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big.bin"
    size = 4 << 20
    big.write_bytes(os.urandom(size))
    (src / "small.txt").write_bytes(b"steady")
    _wait_for_new_ctime(big)
    old_mtime = os.stat(big).st_mtime_ns
    wrote = threading.Event()

    def writer() -> None:
        with open(big, "r+b") as f:
            f.write(os.urandom(64 << 10))  # the beginning: read already
            f.seek(size - (64 << 10))
            f.write(os.urandom(64 << 10))  # the end: not read yet
        if keep_mtime:
            os.utime(big, ns=(old_mtime, old_mtime))
        wrote.set()

    real_chunker = backup_mod._Archiver._chunker

    class TearingChunker:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def chunks(self, stream: Any) -> Iterator[memoryview]:
            for i, chunk in enumerate(self.inner.chunks(stream)):
                yield chunk
                if i == 0 and not wrote.is_set():
                    t = threading.Thread(target=writer)
                    t.start()
                    t.join()

    def tearing(self: Any) -> Any:
        return TearingChunker(real_chunker(self))

    monkeypatch.setattr(backup_mod._Archiver, "_chunker", tearing)
    first = _backup(repo, src)
    assert wrote.is_set()
    assert any("big.bin" in w and "changed while it was read" in w for w in first.warnings), (
        first.warnings
    )
    assert len(first.warnings) == 1
    monkeypatch.setattr(backup_mod._Archiver, "_chunker", real_chunker)

    now = file_hash(big)
    second = _backup(repo, src)
    assert second.warnings == []
    assert second.summary["files_unmodified"] == 1, second.summary  # small.txt only
    assert second.summary["files_changed"] == 1, second.summary
    assert second.snapshot is not None
    nodes = _snapshot_files(repo, second.snapshot.tree)
    path = os.fsencode(str(big))
    assert _content_hash(repo, nodes[path]) == hashlib.sha256(big.read_bytes()).digest()

    target = tmp_path / "restored"
    res = restore(repo, second.snapshot, RestoreOptions(target=str(target)))
    assert not res.errors
    assert file_hash(target / str(big).lstrip("/")) == now

    # and a third backup, with nothing changed, takes it as unmodified again
    third = _backup(repo, src)
    assert third.warnings == []
    assert third.summary["files_unmodified"] == 2, third.summary


# --- hardlink identity -----------------------------------------------------------------------


def _doctored(st: os.stat_result, **fields: int) -> os.stat_result:
    seq = list(st)
    extra = {n: getattr(st, n) for n in dir(st) if n.startswith("st_")}
    names = ["st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size"]
    for k, v in fields.items():
        if k in names:
            seq[names.index(k)] = v
        extra[k] = v
    return os.stat_result(seq, extra)


@pytest.mark.parametrize("same_metadata", [False, True], ids=["metadata-differs", "content-only"])
def test_inode_reused_between_stats_is_not_a_hardlink(
    repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_metadata: bool
) -> None:
    """``b`` is reported with ``a``'s (dev, ino) and a link count of 2 (an inode number reused
    between two lstat calls, or a file system with unstable inode numbers): it must be restored
    with its own content, not as a hardlink of ``a``; the real hardlinks stay linked."""
    src = tmp_path / "src"
    src.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (src / "a").write_bytes(b"A" * 50_000)
    (src / "b").write_bytes(b"B" * 50_000)
    (src / "c").write_bytes(b"C" * 1000)
    os.link(src / "a", src / "a2")  # a real pair, in the backup
    os.link(src / "b", outside / "b2")  # b has a second name, outside the backup
    same_ns = 1_600_000_000_123_456_789
    for name in ("a", "b"):
        os.utime(src / name, ns=(same_ns, same_ns))
    a_st = os.lstat(src / "a")
    real_scan = backup_mod._Archiver.scan_dir

    def lying_scan(self: Any, path: bytes) -> Any:
        listing = real_scan(self, path)
        if isinstance(listing, OSError):
            return listing
        out = []
        for name, st, err in listing:
            if name == b"b" and st is not None:
                if same_metadata:  # everything the lstat says is a's: only the content differs
                    st = _doctored(st, st_ino=a_st.st_ino, st_ctime_ns=a_st.st_ctime_ns)
                else:
                    st = _doctored(st, st_ino=a_st.st_ino)
            out.append((name, st, err))
        return out

    monkeypatch.setattr(backup_mod._Archiver, "scan_dir", lying_scan)
    result = _backup(repo, src)
    assert result.snapshot is not None
    nodes = _snapshot_files(repo, result.snapshot.tree)
    base = os.fsencode(str(src))
    assert nodes[base + b"/b"].ino == a_st.st_ino  # the lie was seen
    # the snapshot keeps the format's promise: names with nlink > 1 and equal (dev, ino) are one
    # file (same content, size and times), so any reader may link them
    groups: dict[tuple[int, int], set[tuple[Any, ...]]] = {}
    for node in nodes.values():
        if node.type == "file" and node.nlink > 1:
            groups.setdefault((node.dev, node.ino), set()).add(
                (tuple(node.content or []), node.size, node.mtime_ns)
            )
    assert groups and all(len(g) == 1 for g in groups.values()), groups
    assert nodes[base + b"/a2"].nlink == 2
    target = tmp_path / "restored"
    res = restore(repo, result.snapshot, RestoreOptions(target=str(target)))
    assert not res.errors, res.errors
    out = target / str(src).lstrip("/")
    assert (out / "a").read_bytes() == b"A" * 50_000
    assert (out / "b").read_bytes() == b"B" * 50_000
    assert os.stat(out / "a").st_ino == os.stat(out / "a2").st_ino  # the real pair stays one
    assert os.stat(out / "a").st_ino != os.stat(out / "b").st_ino


# --- deep trees ------------------------------------------------------------------------------

DEPTH = 400
NAMES = {"short": b"d", "long": b"level-%03d-dir"}  # long: the paths exceed PATH_MAX


def _make_deep_tree(root: Path, level: bytes) -> dict[bytes, bytes]:
    """A ``DEPTH``-level chain of directories, made with directory descriptors; a file every 50
    levels and at the bottom. Returns relative path -> sha256."""
    root.mkdir()
    files: dict[bytes, bytes] = {}
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    rel = b""
    try:
        for i in range(DEPTH):
            name = level % i if b"%" in level else level
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            rel = rel + b"/" + name if rel else name
            if i % 50 == 49 or i == DEPTH - 1:
                data = b"level %d\n" % i * (i + 1)
                f = os.open(b"file.txt", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
                os.write(f, data)
                os.close(f)
                files[rel + b"/file.txt"] = hashlib.sha256(data).digest()
        os.symlink(b"file.txt", b"link", dir_fd=fd)
    finally:
        os.close(fd)
    if b"%" in level:
        assert len(os.fsencode(str(root))) + len(rel) > 4096
    return files


def _rmtree_deep(root: Path) -> None:
    """Remove a tree of any depth with directory descriptors and an explicit stack (pytest's
    own clean-up recurses, and the paths are too long for path-based calls)."""
    if not os.path.lexists(root):
        return
    parent = os.open(root.parent, os.O_RDONLY | os.O_DIRECTORY)
    stack: list[tuple[int, bytes, int]] = []  # (parent fd, name, fd)
    stack.append((parent, os.fsencode(root.name), -1))
    while stack:
        pfd, name, fd = stack[-1]
        if fd < 0:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=pfd)
            stack[-1] = (pfd, name, fd)
        sub = None
        with os.scandir(fd) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    sub = os.fsencode(e.name)
                    break
                os.unlink(e.name, dir_fd=fd)
        if sub is not None:
            stack.append((fd, sub, -1))
            continue
        os.close(fd)
        os.rmdir(name, dir_fd=pfd)
        stack.pop()
    os.close(parent)


@pytest.fixture
def deep_tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for name in ("src", "restored"):
        _rmtree_deep(tmp_path / name)


def _walk_fd(root: Path) -> dict[bytes, tuple[str, bytes]]:
    """relative path -> (type, sha256 of a file's content / a symlink's target), walked with
    directory descriptors (no path is ever longer than one name)."""
    out: dict[bytes, tuple[str, bytes]] = {}
    stack: list[tuple[bytes, int]] = [(b"", os.open(root, os.O_RDONLY | os.O_DIRECTORY))]
    while stack:
        rel, fd = stack.pop()
        try:
            names = sorted(os.fsencode(e.name) for e in os.scandir(fd))
            for name in names:
                path = rel + b"/" + name if rel else name
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    out[path] = ("dir", b"")
                    stack.append((path, os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)))
                elif stat.S_ISLNK(st.st_mode):
                    out[path] = ("symlink", os.readlink(name, dir_fd=fd))
                else:
                    f = os.open(name, os.O_RDONLY, dir_fd=fd)
                    with os.fdopen(f, "rb") as fh:
                        out[path] = ("file", hashlib.sha256(fh.read()).digest())
        finally:
            os.close(fd)
    return out


@pytest.mark.parametrize("names", sorted(NAMES))
def test_deep_tree_backs_up_without_recursion_limit(
    repo: Repository, deep_tmp: Path, names: str
) -> None:
    """400 levels (short names: beyond Python's recursion limit; long names: paths beyond
    PATH_MAX too) back up; the snapshot holds every entry with its content; the next backup
    (directory cache, parent snapshot) gives the same tree."""
    src = deep_tmp / "src"
    files = _make_deep_tree(src, NAMES[names])
    want = _walk_fd(src)
    first = _backup(repo, src)
    assert first.warnings == [], first.warnings[:3]
    assert first.snapshot is not None
    nodes = _snapshot_files(repo, first.snapshot.tree)
    prefix = os.fsencode(str(src)) + b"/"
    got: dict[bytes, tuple[str, bytes]] = {}
    for path, node in nodes.items():
        if not path.startswith(prefix):
            continue
        rel = path[len(prefix) :]
        if node.type == "file":
            got[rel] = ("file", _content_hash(repo, node))
        elif node.type == "symlink":
            got[rel] = ("symlink", node.target)
        else:
            got[rel] = (node.type, b"")
    assert got == want
    assert sum(1 for v in got.values() if v[0] == "file") == len(files)

    second = _backup(repo, src)
    assert second.warnings == []
    assert second.snapshot is not None and second.snapshot.tree == first.snapshot.tree
    assert second.summary["dirs_unchanged"] >= DEPTH


@pytest.mark.parametrize("names", sorted(NAMES))
def test_deep_tree_restores(repo: Repository, deep_tmp: Path, names: str) -> None:
    src = deep_tmp / "src"
    _make_deep_tree(src, NAMES[names])
    want = _walk_fd(src)
    result = _backup(repo, src)
    assert result.snapshot is not None
    target = deep_tmp / "restored"
    res = restore(repo, result.snapshot, RestoreOptions(target=str(target)))
    assert not res.errors, res.errors[:3]
    assert _walk_fd(target / str(src).lstrip("/")) == want


# --- damaged blobs ---------------------------------------------------------------------------


def _record_damage(cli: Cli, pack_id: bytes, blob_ids: list[bytes]) -> None:
    """``check --read-data`` finds the damage (exit 4) and records it in the repository, so that
    any client learns it."""
    r = cli("check", "--read-data")
    assert r.code == 4, str(r)
    repo = Repository.open(LocalBackend(cli.repo), PASSWORD.encode())  # no cache: the record
    try:
        index = repo.reload_index()
        assert not any(index.usable(b) for b in blob_ids), "check did not record the damage"
        assert all(index.is_damaged(pack_id, b) for b in blob_ids)
    finally:
        repo.close()


def _data_pack_of(cli: Cli, path: Path) -> tuple[bytes, list[bytes], list[bytes], int, int]:
    """The pack holding the first data blob of ``path`` in the latest snapshot: (pack id, the
    pack's blob ids, the file's content ids, that blob's offset and length)."""
    repo = Repository.open(LocalBackend(cli.repo), PASSWORD.encode())
    try:
        snap = repo.find_snapshot("latest")
        node = _snapshot_files(repo, snap.tree)[os.fsencode(str(path))]
        assert node.content
        loc = repo.index.lookup(node.content[0])
        assert loc is not None
        pack = repo.index.pack(loc.pack_id)
        assert pack is not None
        return (
            loc.pack_id,
            [e.id for e in pack.blobs],
            list(node.content),
            loc.entry.offset,
            loc.entry.length,
        )
    finally:
        repo.close()


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_backup_stores_again_what_is_known_damaged(cli: Cli, tmp_path: Path, damage: str) -> None:
    """One flipped byte in a data blob (or a deleted data pack) that check has found: the next
    backup, with the file untouched on disk, reads it again and stores it anew, so that the new
    snapshot restores it identically."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    victim = src / "sub" / "victim.bin"
    victim.write_bytes(os.urandom(300_000))
    (src / "sub" / "other.txt").write_bytes(b"other" * 100)
    (src / "top.txt").write_bytes(b"top")
    cli.ok("init")
    cli.ok("backup", str(src))
    cli.ok("backup", str(src))  # the directory cache now holds every directory
    pack_id, pack_blobs, content, offset, length = _data_pack_of(cli, victim)
    pack_file = _find_pack_file(cli.repo, pack_id)
    if damage == "flip":
        with open(pack_file, "r+b") as f:
            f.seek(offset + length // 2)
            b = f.read(1)
            f.seek(offset + length // 2)
            f.write(bytes([b[0] ^ 0x40]))
        _record_damage(cli, pack_id, [content[0]])
    else:
        pack_file.unlink()
        _record_damage(cli, pack_id, pack_blobs)

    healing = _summary(cli.ok("backup", "--json", str(src)).out)
    assert healing["files_changed"] == (1 if damage == "flip" else 3), healing
    target = tmp_path / "restored"
    r = cli("restore", "latest", "--target", str(target))
    assert r.code == 0, str(r)
    restored = target / str(src).lstrip("/")
    for rel in ("sub/victim.bin", "sub/other.txt", "top.txt"):
        assert file_hash(restored / rel) == file_hash(src / rel), rel
    # the damaged copy is still there (nothing was repaired): the new copy is another one
    if damage == "flip":
        assert pack_file.exists()
    repo = Repository.open(LocalBackend(cli.repo), PASSWORD.encode())
    try:
        snap = repo.find_snapshot("latest")
        node = _snapshot_files(repo, snap.tree)[os.fsencode(str(victim))]
        first = (node.content or [])[0]
        assert first == content[0]
        assert any(loc.pack_id != pack_id for loc in repo.index.locations(first))
    finally:
        repo.close()
    # healed: the directory cache serves the next backups again, without reading any tree
    cli.ok("backup", str(src))
    after = _summary(cli.ok("backup", "--json", str(src)).out)
    assert after["files_changed"] == 0 and after["dirs_unchanged"] == 2, after  # src, sub


def test_damaged_tree_is_not_reused(cli: Cli, tmp_path: Path) -> None:
    """A tree blob known damaged is stored again by the next backup (the directory cache and
    the parent snapshot must not hand its id on)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_bytes(b"f" * 1000)
    cli.ok("init")
    cli.ok("backup", str(src))
    cli.ok("backup", str(src))
    repo = Repository.open(LocalBackend(cli.repo), PASSWORD.encode())
    try:
        snap = repo.find_snapshot("latest")
        node = _snapshot_files(repo, snap.tree)[os.fsencode(str(src / "d"))]
        assert node.subtree is not None
        tree_id = node.subtree
        loc = repo.index.lookup(tree_id)
        assert loc is not None
    finally:
        repo.close()
    pack_file = _find_pack_file(cli.repo, loc.pack_id)
    with open(pack_file, "r+b") as f:
        f.seek(loc.entry.offset + loc.entry.length // 2)
        b = f.read(1)
        f.seek(loc.entry.offset + loc.entry.length // 2)
        f.write(bytes([b[0] ^ 0x01]))
    _record_damage(cli, loc.pack_id, [tree_id])
    cli.ok("backup", str(src))
    repo = Repository.open(LocalBackend(cli.repo), PASSWORD.encode())
    try:
        index = repo.reload_index()
        assert tree_id in index  # stored again: a good copy is known
        assert pack_name(loc.pack_id.hex()) != ""  # (the damaged pack itself is untouched)
    finally:
        repo.close()
    target = tmp_path / "restored"
    r = cli("restore", "latest", "--target", str(target))
    assert r.code == 0, str(r)
    assert (target / str(src).lstrip("/") / "d" / "f.txt").read_bytes() == b"f" * 1000
