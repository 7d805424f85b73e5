"""Files on a file system with whole-second timestamps (ext4 with 128-byte inodes, FAT, some
network file systems): a file rewritten with the same size in the same second as a backup read it
kept its size and times, and every later backup kept the old content with exit 0. Now a file read
within a few seconds of its last change there is read again by the next backup."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from safehold.ops.backup import BackupOptions, backup
from safehold.repository.repo import Repository
from tests.support.tools import skip_or_fail


@pytest.fixture
def coarse_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on a loop-mounted ext4 with 128-byte inodes (whole-second timestamps)."""
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    why = ""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        why = "needs root and mkfs.ext4"
    else:
        with open(image, "wb") as f:
            f.truncate(32 << 20)
        made = subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-I", "128", str(image)], capture_output=True, check=False
        )
        mounted = made.returncode == 0 and (
            subprocess.run(
                ["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, check=False
            ).returncode
            == 0
        )
        if not mounted:
            why = "cannot make or loop-mount an ext4 image"
    if why:
        skip_or_fail(f"cannot test whole-second timestamps: {why}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _same_second_rewrite(path: Path, data: bytes) -> bool:
    """Rewrite ``path`` (same size) if its timestamps would stay as they are; else False."""
    before = path.stat()
    path.write_bytes(data)
    after = path.stat()
    return (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)


def test_a_same_second_rewrite_is_read_again(repo: Repository, coarse_dir: Path) -> None:
    src = coarse_dir / "src"
    src.mkdir()
    f = src / "f.txt"
    for _ in range(20):
        while time.time() % 1 > 0.3:  # room for backup and rewrite within the same second
            time.sleep(0.02)
        f.write_bytes(b"old content " * 100)
        assert f.stat().st_mtime_ns % 1_000_000_000 == 0  # whole seconds indeed
        first = backup(repo, BackupOptions(paths=[str(src)]))
        if _same_second_rewrite(f, b"NEW CONTENT " * 100):
            break
    else:
        pytest.fail("could not rewrite within the same second 20 times")
    assert first.snapshot is not None
    second = backup(repo, BackupOptions(paths=[str(src)]))
    assert second.summary["files_unmodified"] == 0, second.summary
    snap = second.snapshot
    assert snap is not None
    nodes = repo.read_tree(repo.read_tree(snap.tree)[0].subtree)  # type: ignore[arg-type]
    while nodes[0].type == "dir":
        nodes = repo.read_tree(nodes[0].subtree)  # type: ignore[arg-type]
    node = next(n for n in nodes if n.name == b"f.txt")
    got = b"".join(bytes(repo.read_blob(b)) for b in node.content or [])
    assert got == b"NEW CONTENT " * 100
    # settled: a later backup, seconds after the last change, takes it as unmodified
    time.sleep(3.1)
    backup(repo, BackupOptions(paths=[str(src)]))
    assert backup(repo, BackupOptions(paths=[str(src)])).summary["files_unmodified"] == 1
