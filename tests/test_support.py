"""Tests of the test helpers: the tree generator and the tree comparison."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import treecmp, treegen
from tests.support.treecmp import compare_trees, tree_digest
from tests.support.treegen import make_tree, mutate_tree

MiB = 1 << 20
SMALL = 2 * MiB


def _twins(tmp_path: Path, size: int = SMALL, seed: int = 1) -> tuple[Path, Path]:
    """Two trees from the same seed, both generated at the same path (so that the
    absolute symlink, whose target holds the tree's path, is byte-identical too)."""
    work = tmp_path / "tree"
    ref = tmp_path / "ref"
    make_tree(work, size, seed)
    work.rename(ref)
    make_tree(work, size, seed)
    return ref, work


@contextlib.contextmanager
def _parent_mtime_kept(path: Path) -> Iterator[None]:
    st = os.stat(path.parent)
    yield
    os.utime(path.parent, ns=(st.st_atime_ns, st.st_mtime_ns))


def _kinds(diffs: list[str]) -> set[str]:
    return {d.split(":", 1)[0] for d in diffs}


def _walk(root: Path) -> dict[bytes, os.stat_result]:
    out: dict[bytes, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, os.fsencode(root))] = os.lstat(p)
    return out


def _sparse_files(entries: dict[bytes, os.stat_result]) -> list[bytes]:
    return [
        rel
        for rel, st in entries.items()
        if stat.S_ISREG(st.st_mode) and st.st_blocks * 512 + 2 * MiB < st.st_size
    ]


# --------------------------------------------------------------------------- treegen
def test_small_tree_has_every_feature(tmp_path: Path) -> None:
    root = tmp_path / "t"
    make_tree(root, SMALL)
    broot = os.fsencode(root)
    entries = _walk(root)
    files = {r: st for r, st in entries.items() if stat.S_ISREG(st.st_mode)}
    dirs = {r: st for r, st in entries.items() if stat.S_ISDIR(st.st_mode)}
    links = {
        r: os.readlink(os.path.join(broot, r))
        for r, st in entries.items()
        if stat.S_ISLNK(st.st_mode)
    }

    # about 30 files per MiB (more in tiny trees, which still hold every feature)
    assert 40 <= len(files) <= 200
    data = sum(min(st.st_size, st.st_blocks * 512) for st in files.values())
    assert 0.8 * SMALL <= data <= 2 * SMALL

    # symlinks: relative, absolute into the tree, dangling
    targets = list(links.values())
    assert any(
        not t.startswith(b"/") and os.path.exists(os.path.join(broot, r)) for r, t in links.items()
    )
    assert any(t.startswith(broot + b"/") and os.path.exists(t) for t in targets)
    assert any(not os.path.exists(os.path.join(broot, r)) for r in links)

    # hardlinks: a group of three names and one of two
    groups = Counter((st.st_dev, st.st_ino) for st in files.values() if st.st_nlink > 1)
    assert sorted(groups.values()) == [2, 3]

    # sparse files with big holes: one ending in data, one ending in a hole
    sparse = _sparse_files(entries)
    assert len(sparse) == 2
    for rel in sparse:
        with open(os.path.join(broot, rel), "rb") as f:
            assert f.read(4096).strip(b"\0")
    ends = set()
    for rel in sparse:
        path = os.path.join(broot, rel)
        with open(path, "rb") as f:
            f.seek(-4096, os.SEEK_END)
            ends.add(bool(f.read().strip(b"\0")))
    assert ends == {True, False}

    # names: not UTF-8, unicode, long; deep nesting
    def utf8(name: bytes) -> bool:
        try:
            name.decode()
        except UnicodeDecodeError:
            return False
        return True

    assert [r for r in entries if not utf8(r)] == [b"Documents/unicode/latin1-caf\xe9.txt"]
    assert any(utf8(r) and not r.isascii() for r in entries)
    assert max(len(os.path.basename(r)) for r in entries) >= 240
    assert max(r.count(b"/") + 1 for r in entries) >= 12

    # empty file, empty directories
    assert any(st.st_size == 0 for st in files.values())
    assert any(not os.listdir(os.path.join(broot, r)) for r in dirs)

    # modes and nanosecond mtimes
    modes = {stat.S_IMODE(st.st_mode) for st in files.values()}
    assert {0o600, 0o644, 0o755, 0o444} <= modes
    assert 0o700 in {stat.S_IMODE(st.st_mode) for st in dirs.values()}
    assert sum(st.st_mtime_ns % 1000 != 0 for st in entries.values()) > len(entries) // 2

    # exact duplicates (not hardlinks), compressible text, incompressible binaries
    digest = tree_digest(root)
    by_content: dict[bytes | None, set[tuple[int, int]]] = defaultdict(set)
    for e in digest.values():
        if e.kind == "file" and e.size > 0:
            by_content[e.content].add(e.inode)
    assert sum(len(inodes) > 1 for inodes in by_content.values()) >= 3

    def ratio(rel: str) -> float:
        raw = (root / rel).read_bytes()[: 1 << 18]
        return len(zlib.compress(raw, 1)) / len(raw)

    assert ratio("Videos/holiday 2023.mp4") > 0.99
    assert ratio(".bash_history") < 0.6

    # a VM image with duplicated 4 KiB blocks that are not all zeros
    vm = (root / "VMs/debian-12.img").read_bytes()
    blocks = Counter(vm[i : i + 4096] for i in range(0, len(vm), 4096))
    assert any(n > 1 for b, n in blocks.items() if b.strip(b"\0"))
    assert blocks.get(bytes(4096), 0) > 0


def test_make_tree_is_deterministic(tmp_path: Path) -> None:
    ref, work = _twins(tmp_path)
    assert compare_trees(ref, work) == []
    other = tmp_path / "other"
    make_tree(other, SMALL, seed=7)
    assert len(compare_trees(ref, other)) > 100


def test_make_tree_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("x")
    with pytest.raises(FileExistsError):
        make_tree(tmp_path, SMALL)


def test_mutate_is_deterministic_and_detected(tmp_path: Path) -> None:
    work = tmp_path / "tree"
    make_tree(work, SMALL)
    work.rename(tmp_path / "pristine")
    make_tree(work, SMALL)
    mutate_tree(work)
    work.rename(tmp_path / "mutated")
    make_tree(work, SMALL)
    mutate_tree(work)
    assert compare_trees(tmp_path / "mutated", work) == []

    diffs = compare_trees(tmp_path / "pristine", work)
    kinds = _kinds(diffs)
    expected = {"missing", "extra", "content differs", "size differs", "mode differs"}
    expected |= {"mtime differs", "symlink target differs"}
    assert expected <= kinds, diffs
    assert any("(dir)" in d for d in diffs if d.startswith("missing"))  # a renamed dir
    # files whose content did not change but whose mtime did (touch)
    assert any(d.startswith("mtime differs") and "(file)" in d for d in diffs)
    # the mutated tree keeps its hardlinks and sparse files
    entries = _walk(work)
    assert len(_sparse_files(entries)) == 2
    nlinks = Counter(
        s.st_ino for s in entries.values() if s.st_nlink > 1 and not stat.S_ISDIR(s.st_mode)
    )
    assert sorted(nlinks.values()) == [2, 3]


def test_make_tree_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert treegen.main([str(tmp_path / "t"), "--size-mb", "2", "--seed", "3"]) == 0
    assert "files" in capsys.readouterr().out
    assert treegen.main([str(tmp_path / "t"), "--mutate"]) == 0
    assert "renamed" in capsys.readouterr().out


# --------------------------------------------------------------------------- treecmp
def _one_byte(root: Path) -> None:
    path = root / ".bash_history"
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _chmod(root: Path) -> None:
    os.chmod(root / ".profile", 0o640)


def _mtime(root: Path) -> None:
    st = (root / ".profile").stat()
    os.utime(root / ".profile", ns=(st.st_atime_ns, st.st_mtime_ns + 1))


def _dir_mtime(root: Path) -> None:
    st = (root / "Templates").stat()
    os.utime(root / "Templates", ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))


def _missing(root: Path) -> None:
    path = root / ".profile"
    with _parent_mtime_kept(path):
        path.unlink()


def _missing_non_utf8(root: Path) -> None:
    path = os.fsencode(root) + b"/Documents/unicode/latin1-caf\xe9.txt"
    with _parent_mtime_kept(root / "Documents/unicode/x"):
        os.unlink(path)


def _extra(root: Path) -> None:
    path = root / "Templates/new.txt"
    with _parent_mtime_kept(path):
        path.write_bytes(b"new")


def _symlink(root: Path) -> None:
    path = root / "Desktop/dangling"
    st = os.lstat(path)
    with _parent_mtime_kept(path):
        path.unlink()
        path.symlink_to("does/not/exist-either.txt")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _broken_hardlink(root: Path) -> None:
    path = root / "Documents/LICENSE.hardlink"
    with _parent_mtime_kept(path):
        data = path.read_bytes()
        st = path.stat()
        path.unlink()
        path.write_bytes(data)
        os.chmod(path, stat.S_IMODE(st.st_mode))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _merged_hardlink(root: Path) -> None:
    """Two identical files (the vendored copies, same mtime) become one inode."""
    copies = sorted(root.glob("Projects/*/vendor/fastjson/lib/*/*.py"))
    first = copies[0].relative_to(root).parts
    twin = next(c for c in copies if c.relative_to(root).parts[2:] == first[2:] and c != copies[0])
    with _parent_mtime_kept(twin):
        twin.unlink()
        os.link(copies[0], twin)


def _lost_hole(root: Path) -> None:
    path = root / "VMs/sparse-disk.raw"
    st = path.stat()
    data = path.read_bytes()
    with open(path, "r+b") as f:  # rewrite every byte in place: the holes get allocated
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_blocks * 512 >= st.st_size


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_one_byte, "content differs"),
        (_chmod, "mode differs"),
        (_mtime, "mtime differs"),
        (_dir_mtime, "mtime differs"),
        (_missing, "missing"),
        (_missing_non_utf8, "missing"),
        (_extra, "extra"),
        (_symlink, "symlink target differs"),
        (_broken_hardlink, "hardlinks differ"),
        (_merged_hardlink, "hardlinks differ"),
        (_lost_hole, "not sparse"),
    ],
    ids=lambda x: getattr(x, "__name__", x).strip("_") if callable(x) else None,
)
def test_compare_trees_detects(
    tmp_path: Path, change: Callable[[Path], None], expected: str
) -> None:
    ref, work = _twins(tmp_path)
    change(work)
    diffs = compare_trees(ref, work)
    assert _kinds(diffs) == {expected}, diffs
    assert len(diffs) == 1, diffs


def test_compare_trees_reports_non_utf8_names_readably(tmp_path: Path) -> None:
    ref, work = _twins(tmp_path)
    _missing_non_utf8(work)
    assert compare_trees(ref, work) == ["missing: Documents/unicode/latin1-caf\\xe9.txt (file)"]


def test_compare_trees_owner_and_atime_are_optional(tmp_path: Path) -> None:
    ref, work = _twins(tmp_path)
    path = work / ".profile"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns + 5, st.st_mtime_ns))
    if os.geteuid() == 0:
        os.chown(path, st.st_uid + 1, st.st_gid + 1)
    assert compare_trees(ref, work) == []
    assert _kinds(compare_trees(ref, work, check_atime=True)) == {"atime differs"}
    if os.geteuid() == 0:
        assert _kinds(compare_trees(ref, work, check_owner=True)) == {"owner differs"}


def test_compare_digest_after_the_fact(tmp_path: Path) -> None:
    ref, work = _twins(tmp_path)
    before = tree_digest(work)
    shutil.rmtree(ref)
    assert treecmp.compare_digests(before, tree_digest(work)) == []
    _one_byte(work)
    assert _kinds(treecmp.compare_digests(before, tree_digest(work))) == {"content differs"}


def test_treecmp_cli(tmp_path: Path) -> None:
    ref, work = _twins(tmp_path)
    script = Path(treecmp.__file__)
    same = subprocess.run([sys.executable, script, ref, work], capture_output=True, text=True)
    assert same.returncode == 0
    assert same.stdout.startswith("IDENTICAL: ")
    _chmod(work)
    diff = subprocess.run([sys.executable, script, ref, work], capture_output=True, text=True)
    assert diff.returncode == 1
    assert "mode differs: .profile: 0o644 != 0o640" in diff.stdout
