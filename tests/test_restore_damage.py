"""Restore on a bad day (issue 8), through the library: damage costs only the files it touches,
a file that cannot be restored whole never appears under its name, nothing recurses, and a
hostile tree DAG is refused after reading its few distinct trees.

Snapshots are made here by ``archive``, a small iterative archiver over real directories built
on the library's WriteSession (it also handles trees deeper than PATH_MAX), so that these tests
depend on restore alone. ``digest`` records a tree (also deeper than PATH_MAX) for comparison.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from safehold.backends.local import LocalBackend
from safehold.compress import Compression
from safehold.errors import IntegrityError
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node, tree_to_bytes
from safehold.ids import BlobType
from safehold.ops.restore import TMP_PREFIX, RestoreOptions, iter_files, plan_restore, restore
from safehold.ops.walk import tree_totals, walk_tree
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD
from tests.support.tools import skip_or_fail
from tests.support.treecmp import kind_of

BLOCK = 64 << 10  # archive's blob size: a flipped byte costs one blob of one file


# --- an archiver and a tree digest that work at any depth -----------------------------------


@dataclass
class _Frame:
    fd: int
    names: list[bytes]
    node: Node | None  # None: the root
    nodes: list[Node] = field(default_factory=list)
    i: int = 0


def _names(fd: int) -> list[bytes]:
    return sorted(os.fsencode(n) for n in os.listdir(fd))


def archive(repo: Repository, root: Path, *, summary: bool = True) -> Snapshot:
    """Store the tree at ``root`` as a snapshot (root tree = root's entries), iteratively."""
    s = repo.write_session()
    counts = {"files_new": 0, "files_changed": 0, "files_unmodified": 0, "dirs": 0}
    others = 0
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    frames = [_Frame(fd, _names(fd), None)]
    root_tree = b""
    while frames:
        f = frames[-1]
        if f.i < len(f.names):
            name = f.names[f.i]
            f.i += 1
            st = os.lstat(name, dir_fd=f.fd)
            node = Node(
                name=name,
                type=kind_of(st.st_mode),
                mode=st.st_mode,
                uid=st.st_uid,
                gid=st.st_gid,
                mtime_ns=st.st_mtime_ns,
                ctime_ns=st.st_ctime_ns,
                atime_ns=st.st_atime_ns,
                size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
                dev=st.st_dev,
                ino=st.st_ino,
                nlink=st.st_nlink,
                rdev=st.st_rdev,
            )
            if node.type == "dir":
                counts["dirs"] += 1
                cfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=f.fd)
                frames.append(_Frame(cfd, _names(cfd), node))
                continue
            if node.type == "file":
                counts["files_new"] += 1
                ffd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=f.fd)
                with os.fdopen(ffd, "rb") as fh:
                    data = fh.read()
                node.content = [
                    s.add_blob(BlobType.DATA, data[i : i + BLOCK], Compression())[0]
                    for i in range(0, len(data), BLOCK)
                ]
            else:
                others += 1
                if node.type == "symlink":
                    node.target = os.readlink(name, dir_fd=f.fd)
            f.nodes.append(node)
            continue
        frames.pop()
        os.close(f.fd)
        tid, _ = s.add_blob(BlobType.TREE, tree_to_bytes(f.nodes), Compression())
        if f.node is None:
            root_tree = tid
        else:
            f.node.subtree = tid
            frames[-1].nodes.append(f.node)
    s.flush()
    snap = Snapshot(
        time.time_ns(),
        "test",
        "test",
        [str(root)],
        root_tree,
        summary={**counts, "other_entries": others} if summary else {},
    )
    repo.save_snapshot(snap)
    return snap


Digest = dict[bytes, tuple[object, ...]]


def digest(root: Path) -> tuple[Digest, set[frozenset[bytes]]]:
    """Every entry below ``root`` (relative bytes path -> kind, mode, size, content hash, mtime,
    symlink target) and the hardlink partition; iterative, with descriptors (any depth)."""
    out: Digest = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    stack: list[tuple[int, bytes, list[bytes]]] = [(fd, b"", _names(fd))]
    while stack:
        dfd, rel, names = stack[-1]
        if not names:
            stack.pop()
            os.close(dfd)
            continue
        name = names.pop()
        path = rel + b"/" + name if rel else name
        st = os.lstat(name, dir_fd=dfd)
        kind = kind_of(st.st_mode)
        h = b""
        target = b""
        if kind == "file":
            ffd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
            with os.fdopen(ffd, "rb") as fh:
                h = hashlib.sha256(fh.read()).digest()
            inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
        elif kind == "symlink":
            target = os.readlink(name, dir_fd=dfd)
        mode = 0 if kind == "symlink" else stat.S_IMODE(st.st_mode)
        size = 0 if kind == "dir" else st.st_size
        out[path] = (kind, mode, size, h, st.st_mtime_ns, target)
        if kind == "dir":
            cfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            stack.append((cfd, path, _names(cfd)))
    links = {frozenset(v) for v in inodes.values() if len(v) > 1}
    return out, links


def temporaries(root: Path) -> list[bytes]:
    return [p for p in digest(root)[0] if p.rsplit(b"/", 1)[-1].startswith(TMP_PREFIX)]


def flip_blob(repo: Repository, repo_dir: Path, blob_id: bytes) -> None:
    """Flip one byte in the middle of a blob's stored bytes, in the pack file itself."""
    loc = repo.index.lookup(blob_id)
    assert loc is not None
    pid = loc.pack_id.hex()
    pack = repo_dir / "data" / pid[:2] / pid
    raw = bytearray(pack.read_bytes())
    raw[loc.entry.offset + loc.entry.length // 2] ^= 0x01
    os.chmod(pack, 0o600)
    pack.write_bytes(bytes(raw))


def node_at(repo: Repository, snap: Snapshot, path: str) -> Node:
    return next(n for p, n in iter_files(repo, snap.tree) if p == path)


REPO_DIR = "lib-repo"  # where the ``repo`` fixture keeps its repository under tmp_path


def fresh(tmp_path: Path) -> Repository:
    """The ``repo`` fixture's repository opened again, without a cache."""
    return Repository.open(LocalBackend(tmp_path / REPO_DIR), PASSWORD.encode())


def _source(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "victim.bin").write_bytes(os.urandom(5 * BLOCK))
    (root / "a.txt").write_text("fine " * 1000)
    (root / "sub" / "b.bin").write_bytes(os.urandom(3 * BLOCK + 17))
    (root / "sub" / "deeper" / "c.txt").write_text("deep")
    (root / "sub" / "link").symlink_to("b.bin")
    os.mkfifo(root / "sub" / "fifo")
    (root / "empty").write_bytes(b"")
    os.link(root / "a.txt", root / "sub" / "a-again.txt")
    os.utime(root / "sub", ns=(1_000_000_000, 1_234_567_891_000))
    return root


def _restore(repo: Repository, snap: Snapshot, target: Path, **kw: object) -> object:
    return restore(repo, snap, RestoreOptions(target=str(target), **kw))  # type: ignore[arg-type]


# --- damage costs only the files it touches ---------------------------------------------------


def test_a_corrupt_blob_costs_only_its_file_and_never_leaves_a_torn_one(
    repo: Repository, tmp_path: Path
) -> None:
    src = _source(tmp_path / "src")
    snap = archive(repo, src)
    victim = node_at(repo, snap, "/victim.bin")
    assert victim.content is not None and len(victim.content) == 5
    flip_blob(repo, tmp_path / REPO_DIR, victim.content[3])  # the fourth of five blobs
    target = tmp_path / "target"
    target.mkdir()
    (target / "victim.bin").write_bytes(b"the previous version")  # left as it was
    res = restore(repo, snap, RestoreOptions(target=str(target)))
    assert [(f.path, f.damage) for f in res.failed] == [("/victim.bin", True)], res.errors
    assert "failed authentication" in res.failed[0].reason or "match" in res.failed[0].reason
    assert res.damaged
    assert (target / "victim.bin").read_bytes() == b"the previous version"
    want, want_links = digest(src)
    got, got_links = digest(target)
    del want[b"victim.bin"], got[b"victim.bin"]
    assert got == want
    assert got_links == want_links
    assert temporaries(target) == []
    files = sum(1 for v in want.values() if v[0] == "file")
    assert res.files == files  # every file but the victim, and the counts say so
    # the damage was recorded for the next backup (the repository's damage record)
    assert victim.content[3] in {b for _, b in repo.damage_reasons}


def test_a_missing_pack_costs_only_the_files_in_it(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("kept")
    snap1 = archive(repo, src)
    (src / "lost.bin").write_bytes(os.urandom(BLOCK))  # stored in a pack of its own
    snap2 = archive(repo, src)
    lost = node_at(repo, snap2, "/lost.bin")
    assert lost.content and snap1.tree != snap2.tree
    loc = repo.index.lookup(lost.content[0])
    assert loc is not None
    pid = loc.pack_id.hex()
    os.remove(tmp_path / REPO_DIR / "data" / pid[:2] / pid)
    target = tmp_path / "t"
    res = restore(repo, snap2, RestoreOptions(target=str(target)))
    assert [f.path for f in res.failed] == ["/lost.bin"] and res.damaged
    assert (target / "a.txt").read_text() == "kept"
    assert not (target / "lost.bin").exists() and temporaries(target) == []


def test_an_unreadable_directory_is_named_and_the_rest_restores(
    repo: Repository, tmp_path: Path
) -> None:
    src = _source(tmp_path / "src")
    snap = archive(repo, src)
    deeper = node_at(repo, snap, "/sub/deeper")
    assert deeper.subtree is not None
    flip_blob(repo, tmp_path / REPO_DIR, deeper.subtree)
    repo = fresh(tmp_path)  # no tree cached in memory or on disk
    target = tmp_path / "t"
    res = restore(repo, snap, RestoreOptions(target=str(target)))
    assert [(f.path, f.damage) for f in res.failed] == [("/sub/deeper", True)], res.errors
    assert "cannot be read" in res.failed[0].reason
    assert not (target / "sub" / "deeper").exists()
    want, _ = digest(src)
    got, _ = digest(target)
    for k in (b"sub/deeper", b"sub/deeper/c.txt"):
        del want[k]
    assert got == want


def test_an_unsafe_name_costs_only_its_entry(repo: Repository, tmp_path: Path) -> None:
    s = repo.write_session()
    data, _ = s.add_blob(BlobType.DATA, b"evil", Compression())
    good, _ = s.add_blob(BlobType.DATA, b"good", Compression())
    nodes = [
        Node(name=b"../x", type="file", mode=0o100644, size=4, content=[data]),
        Node(name=b"ok", type="file", mode=0o100644, size=4, content=[good]),
    ]
    tree, _ = s.add_blob(BlobType.TREE, tree_to_bytes(nodes), Compression())
    s.flush()
    snap = Snapshot(time.time_ns(), "h", "u", ["/x"], tree)
    target = tmp_path / "t" / "in"
    res = restore(repo, snap, RestoreOptions(target=str(target)))
    assert len(res.failed) == 1 and "unsafe name" in res.failed[0].reason and res.damaged
    assert (target / "ok").read_bytes() == b"good"
    assert not (tmp_path / "t" / "x").exists()


def test_a_socket_is_named_not_silently_skipped(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    sock.close()
    snap = archive(repo, src)
    target = tmp_path / "t"
    res = restore(repo, snap, RestoreOptions(target=str(target)))
    assert res.not_restored == ["not restored: /sock is a socket"]
    assert not res.failed and res.others == 0 and res.files == 1
    assert not (target / "sock").exists()


def test_restore_over_an_existing_tree_replaces_entries_whole(
    repo: Repository, tmp_path: Path
) -> None:
    src = _source(tmp_path / "src")
    snap = archive(repo, src)
    target = tmp_path / "t"
    (target / "victim.bin").mkdir(parents=True)  # a directory where a file goes
    (target / "victim.bin" / "x" / "y").mkdir(parents=True)
    (target / "sub").write_text("a file where a directory goes")
    (target / "a.txt").write_text("old")
    res = restore(repo, snap, RestoreOptions(target=str(target)))
    assert not res.errors, res.errors
    assert digest(target) == digest(src)


# --- disk full: a real full file system (tmpfs) -------------------------------------------------


@contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        skip_or_fail("mounting a tmpfs needs root (the CLI test falls back to RLIMIT_FSIZE)")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)])
    if r.returncode != 0:
        skip_or_fail("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_disk_full_mid_file_leaves_no_partial_file(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.txt").write_text("small")
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    snap = archive(repo, src)
    with small_tmpfs(tmp_path / "full", "1m") as target:
        (target / "big.bin").write_bytes(b"old")
        res = restore(repo, snap, RestoreOptions(target=str(target)))
        failed = {f.path: f for f in res.failed}
        assert "No space left" in failed["/big.bin"].reason, res.errors
        assert not res.damaged
        assert (target / "big.bin").read_bytes() == b"old"
        # the small file is written beside the big one: restored whole, or named and absent
        if "/small.txt" in failed:
            assert not (target / "small.txt").exists() and res.files == 0
        else:
            assert (target / "small.txt").read_text() == "small" and res.files == 1
        assert len(failed) + res.files == 2
        assert temporaries(target) == []


# --- no recursion, bounded descriptors ----------------------------------------------------------


def _chain(repo: Repository, depth: int, name: bytes = b"d") -> Snapshot:
    """A snapshot of ``depth`` nested directories with a file at the bottom."""
    s = repo.write_session()
    data, _ = s.add_blob(BlobType.DATA, b"bottom", Compression())
    nodes = [Node(name=b"f", type="file", mode=0o100644, size=6, content=[data])]
    for _ in range(depth):
        tree, _ = s.add_blob(BlobType.TREE, tree_to_bytes(nodes), Compression())
        nodes = [Node(name=name, type="dir", mode=0o40755, subtree=tree)]
    tree, _ = s.add_blob(BlobType.TREE, tree_to_bytes(nodes), Compression())
    s.flush()
    snap = Snapshot(time.time_ns(), "h", "u", ["/x"], tree, summary={"files_new": 1, "dirs": depth})
    repo.save_snapshot(snap)
    return snap


@pytest.fixture
def remove_deep(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths removed after the test with ``rm -rf`` (pytest's own clean-up of old temporary
    directories recurses, and fails on trees deeper than Python's recursion limit)."""
    paths: list[Path] = []
    yield paths
    for p in paths:
        subprocess.run(["rm", "-rf", "--", str(p)], check=False)


def test_a_tree_deeper_than_the_recursion_limit_plans_lists_and_restores(
    repo: Repository, tmp_path: Path, remove_deep: list[Path]
) -> None:
    depth = 1500  # beyond Python's default recursion limit of 1000
    snap = _chain(repo, depth)
    assert len(plan_restore(repo, snap)) == depth + 1
    paths = [p for p, _ in iter_files(repo, snap.tree)]
    assert len(paths) == depth + 1 and paths[-1] == "/d" * depth + "/f"
    target = tmp_path / "t"
    remove_deep.append(target)
    res = restore(repo, snap, RestoreOptions(target=str(target)))
    assert not res.errors and (res.files, res.dirs) == (1, depth)
    got, _ = digest(target)
    assert got[b"/".join([b"d"] * depth + [b"f"])][0] == "file"


# --- a hostile tree DAG ---------------------------------------------------------------------


def dag_snapshot(repo: Repository, levels: int = 30, *, summary: bool = True) -> Snapshot:
    """Trees ``levels`` deep, each referencing the next twice: 2^levels paths from a few
    trees. The summary (when given) records what one path of it holds."""
    s = repo.write_session()
    data, _ = s.add_blob(BlobType.DATA, b"leaf", Compression())
    tree, _ = s.add_blob(
        BlobType.TREE,
        tree_to_bytes([Node(name=b"leaf", type="file", mode=0o100644, size=4, content=[data])]),
        Compression(),
    )
    for _ in range(levels):
        nodes = [Node(name=n, type="dir", mode=0o40755, subtree=tree) for n in (b"a", b"b")]
        tree, _ = s.add_blob(BlobType.TREE, tree_to_bytes(nodes), Compression())
    s.flush()
    counts = {"files_new": 1, "files_changed": 0, "files_unmodified": 0, "dirs": levels}
    snap = Snapshot(
        time.time_ns(),
        "evil",
        "evil",
        ["/x"],
        tree,
        summary={**counts, "other_entries": 0} if summary else {},
    )
    repo.save_snapshot(snap)
    return snap


@pytest.mark.parametrize("summary", [True, False])
def test_a_tree_dag_is_refused_quickly(repo: Repository, tmp_path: Path, summary: bool) -> None:
    snap = dag_snapshot(repo, summary=summary)
    started = time.monotonic()
    with pytest.raises(IntegrityError, match="expand beyond what it recorded"):
        tree_totals(repo, snap.tree)
    with pytest.raises(IntegrityError, match="expand beyond what it recorded"):
        restore(repo, snap, RestoreOptions(target=str(tmp_path / "t")))
    assert not (tmp_path / "t").exists()  # refused before anything was written
    with pytest.raises(IntegrityError, match="expand beyond"):
        list(walk_tree(repo, snap.tree, limit=100_000))
    assert time.monotonic() - started < 30


def test_shared_subtrees_of_an_honest_snapshot_are_fine(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in ("one", "two", "three"):  # identical directories share one tree
        (src / d).mkdir(parents=True)
        (src / d / "f").write_text("same")
        os.utime(src / d / "f", ns=(0, 0))
        os.utime(src / d, ns=(0, 0))
    snap = archive(repo, src)
    totals = tree_totals(repo, snap.tree)
    assert (totals.entries, totals.files, totals.dirs) == (6, 3, 3)
    res = restore(repo, snap, RestoreOptions(target=str(tmp_path / "t")))
    assert not res.errors and digest(tmp_path / "t") == digest(src)


def test_includes_and_excludes_select_without_recursion(repo: Repository, tmp_path: Path) -> None:
    snap = archive(repo, _source(tmp_path / "src"))

    def planned(**kw: list[str]) -> list[str]:
        return ["/".join(p.decode() for p in it.parts) for it in plan_restore(repo, snap, **kw)]

    assert planned(includes=["/sub/deeper/c.txt"]) == ["sub", "sub/deeper", "sub/deeper/c.txt"]
    assert planned(includes=["deeper"]) == ["sub", "sub/deeper", "sub/deeper/c.txt"]
    assert planned(includes=["nothing-matches"]) == []
    everything = planned()
    assert "sub/link" in everything and len(everything) == 10
    assert [p for p in planned(excludes=["sub"]) if p.startswith("sub")] == []
    assert planned(excludes=["*.bin", "/sub/deeper"]) == [
        p for p in everything if not p.endswith(".bin") and not p.startswith("sub/deeper")
    ]
