"""Restore on a bad day, second round (issue 8, an outside tester's findings): SIGINT/SIGTERM stop
restore promptly while it plans a large snapshot; a hardlinked name is restored when the group's
first name cannot be written for a target-side reason; a ``--target`` that is a symlink to a
directory is followed (and only the target itself)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from safehold.backends.local import LocalBackend
from safehold.compress import Compression
from safehold.errors import Interrupted
from safehold.format.snapshot import Snapshot
from safehold.format.tree import Node, tree_to_bytes
from safehold.ids import BlobType
from safehold.ops.restore import RestoreOptions, restore
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD, Cli
from tests.support.tools import skip_or_fail
from tests.test_restore_damage import digest, small_tmpfs, temporaries

LEVELS = 13
WIDTH = 500
"""Directories ``LEVELS`` deep, two in each, the last ones holding ``WIDTH`` files each: 4 million
entries, planned in some 20 s here (far beyond the 5 s a stop may take)."""


def wide_snapshot(
    repo: Repository, levels: int = LEVELS, width: int = WIDTH, *, summary: bool = True
) -> Snapshot:
    """A legitimately large snapshot cheap to make: identical directories share one tree (each
    level holds two directories of the level below, the last ``width`` distinct files of one
    content), well within the expansion bound of its distinct entries. Its summary records
    every entry, as a backup of such a tree would."""
    s = repo.write_session()
    data, _ = s.add_blob(BlobType.DATA, b"leaf", Compression())
    files = [
        Node(name=f"f{i:04d}".encode(), type="file", mode=0o100644, size=4, content=[data])
        for i in range(width)
    ]
    tree, _ = s.add_blob(BlobType.TREE, tree_to_bytes(files), Compression())
    for _ in range(levels):
        nodes = [Node(name=n, type="dir", mode=0o40755, subtree=tree) for n in (b"a", b"b")]
        tree, _ = s.add_blob(BlobType.TREE, tree_to_bytes(nodes), Compression())
    s.flush()
    counts = {
        "files_new": width << levels,
        "files_changed": 0,
        "files_unmodified": 0,
        "dirs": (2 << levels) - 2,
        "other_entries": 0,
    }
    snap = Snapshot(time.time_ns(), "host", "user", ["/x"], tree, summary=counts if summary else {})
    repo.save_snapshot(snap)
    return snap


def _open(cli: Cli) -> Repository:
    return Repository.open(LocalBackend(cli.repo), PASSWORD.encode())


# --- 1. a signal stops planning -------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_restore_while_it_plans(cli: Cli, tmp_path: Path, sig: int) -> None:
    cli.ok("init")
    repo = _open(cli)
    snap = wide_snapshot(repo)
    repo.close()
    target = tmp_path / "t"
    # an include that matches nothing: the whole snapshot is walked, the plan stays small
    cmd = [sys.executable, "-m", "safehold", "--repo", str(cli.repo), "restore", snap.id]
    cmd += ["--target", str(target), "--include", "/no-such-entry"]
    proc = subprocess.Popen(cmd, env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(3)  # started, repository opened: planning
        assert proc.poll() is None, proc.communicate()
        assert not target.exists()  # the target is made once the plan is complete
        proc.send_signal(sig)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 5, f"still running {took:.1f} s after the signal"
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert err.decode().strip().splitlines()[-1].startswith("safehold: interrupted")
    assert b"Traceback" not in err
    assert not target.exists()  # nothing written, not even the target


@pytest.mark.parametrize("summary", [True, False])
def test_restore_stops_while_it_sizes_or_plans(
    repo: Repository, tmp_path: Path, summary: bool
) -> None:
    """The library: a stop set while restore sizes (no recorded counts) or plans."""
    snap = wide_snapshot(repo, summary=summary)
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(Interrupted):
            restore(repo, snap, RestoreOptions(target=str(tmp_path / "t")), stop=stop)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 5
    assert not (tmp_path / "t").exists()


# --- 2. a hardlink group whose first name cannot be written ---------------------------------


def _hardlinked_source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for d in "abc":
        (src / d).mkdir(parents=True)
    (src / "a" / "first").write_bytes(b"data\n" * 1000)
    os.link(src / "a" / "first", src / "b" / "second")
    os.link(src / "a" / "first", src / "c" / "third")
    (src / "b" / "plain").write_text("plain")
    return src


def _restored(target: Path, src: Path) -> Path:
    return target / str(src).lstrip("/")


@contextmanager
def _first_name_unwritable(how: str, first: Path) -> Iterator[None]:
    """``first`` (in the target) cannot be written: an immutable file of that name (EPERM),
    or its directory a full filesystem (ENOSPC)."""
    if how == "immutable":
        if os.geteuid() != 0 or shutil.which("chattr") is None:
            skip_or_fail("chattr +i needs root")
        first.parent.mkdir(parents=True)
        first.write_bytes(b"OLD\n")
        if subprocess.run(["chattr", "+i", str(first)], capture_output=True).returncode != 0:
            skip_or_fail("this filesystem has no immutable flag")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(first)], check=True)
        return
    first.parent.parent.mkdir(parents=True)
    with small_tmpfs(first.parent, "64k") as full:
        with contextlib.suppress(OSError), open(full / "filler", "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
        yield


@pytest.mark.parametrize("how", ["immutable", "full"])
def test_a_hardlink_is_restored_when_the_first_name_cannot_be_written(
    cli: Cli, tmp_path: Path, how: str
) -> None:
    src = _hardlinked_source(tmp_path)
    cli.ok("init")
    cli.ok("backup", str(src))
    target = tmp_path / "t"
    out = _restored(target, src)
    with _first_name_unwritable(how, out / "a" / "first"):
        r = cli("restore", "latest", "--target", str(target))
        assert r.code == 2, str(r)  # the first name: not written to the target
        assert f"{src}/a/first: " in r.out, str(r)
        assert "failed: 1 entries not restored (0 damaged" in r.out, str(r)
        assert "Traceback" not in r.err
        want = (src / "a" / "first").read_bytes()
        second, third = out / "b" / "second", out / "c" / "third"
        assert second.read_bytes() == want and third.read_bytes() == want
        # the group goes on from its first name restored: the others are linked to it
        assert second.stat().st_ino == third.stat().st_ino
        assert second.stat().st_nlink == 2
        assert (out / "b" / "plain").read_text() == "plain"
        if how == "immutable":
            assert (out / "a" / "first").read_bytes() == b"OLD\n"
        else:
            assert not (out / "a" / "first").exists()
        assert temporaries(target) == []


def test_a_damaged_first_name_still_names_its_other_names(cli: Cli, tmp_path: Path) -> None:
    """Damage (the content cannot be read) is not a target-side failure: the other names
    cannot be restored either, and are named with the reason (exit 4)."""
    from tests.test_restore_damage import flip_blob, node_at

    src = _hardlinked_source(tmp_path)
    cli.ok("init")
    cli.ok("backup", str(src))
    repo = _open(cli)
    snap = repo.find_snapshot("latest")
    node = node_at(repo, snap, str(src / "a" / "first"))
    assert node.content
    flip_blob(repo, cli.repo, node.content[0])
    repo.close()
    target = tmp_path / "t"
    r = cli("restore", "latest", "--target", str(target))
    assert r.code == 4, str(r)
    for name in ("a/first", "b/second", "c/third"):
        assert f"{src}/{name}: " in r.out, str(r)
        assert not (_restored(target, src) / name).exists()
    assert (_restored(target, src) / "b" / "plain").read_text() == "plain"
    assert temporaries(target) == []


# --- 3. a --target that is a symlink to a directory -----------------------------------------


def test_a_target_that_is_a_symlink_to_a_directory_is_followed(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("content")
    (src / "g").write_bytes(os.urandom(10_000))
    os.symlink("d", src / "s")
    cli.ok("init")
    cli.ok("backup", str(src))
    real = tmp_path / "big" / "restore"
    real.mkdir(parents=True)
    link = tmp_path / "restore"
    link.symlink_to(real)
    # a symlink inside the target, where the restored tree has a directory: never followed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = Path(str(src).lstrip("/")).parts[0]
    (real / first).symlink_to(elsewhere)
    r = cli("restore", "latest", "--target", str(link))
    assert r.code == 0, str(r)
    assert digest(_restored(real, src)) == digest(src)
    assert not (real / first).is_symlink()
    assert list(elsewhere.iterdir()) == []
    assert link.is_symlink()


def test_a_target_symlink_to_nothing_is_a_clear_error(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    cli.ok("init")
    cli.ok("backup", str(src))
    link = tmp_path / "restore"
    link.symlink_to(tmp_path / "missing")
    r = cli("restore", "latest", "--target", str(link))
    assert r.code == 2, str(r)
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, str(r)
    assert str(link) in r.err and "missing" in r.err, str(r)
    assert not (tmp_path / "missing").exists()


def test_a_stop_set_before_restore_reads_nothing_and_writes_nothing(
    repo: Repository, tmp_path: Path
) -> None:
    snap = wide_snapshot(repo, summary=False)  # sized first: the stop ends the sizing walk
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    with pytest.raises(Interrupted):
        restore(repo, snap, RestoreOptions(target=str(tmp_path / "t")), stop=stop)
    assert time.monotonic() - started < 2
    assert not (tmp_path / "t").exists()
