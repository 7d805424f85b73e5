"""Restore (and ls/find/stats/diff) on a bad day, through the CLI (issue 8): exit 4 for damage
with every other file restored identical, exit 2 for a full disk with no partial file under a
real name, sockets named (exit 1), a 400-level tree with 1,500 hardlinked files under
``ulimit -n 256``, and a hostile tree DAG refused within 60 s and 512 MiB."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from safehold.backends.local import LocalBackend
from safehold.format.snapshot import Snapshot
from safehold.repository.repo import Repository
from tests.conftest import PASSWORD, Cli, Result
from tests.test_restore_damage import (
    dag_snapshot,
    digest,
    flip_blob,
    node_at,
    small_tmpfs,
    temporaries,
)


def _repo(cli: Cli) -> Repository:
    return Repository.open(LocalBackend(cli.repo), PASSWORD.encode())


def run_limited(
    cli: Cli, *args: str, limits: dict[int, int], ignore_xfsz: bool = False, timeout: float = 300
) -> tuple[Result, float]:
    """Like ``cli(...)``, in a subprocess with resource limits; also returns the time taken."""

    def preexec() -> None:
        for res, value in limits.items():
            resource.setrlimit(res, (value, value))
        if ignore_xfsz:  # a write past RLIMIT_FSIZE then fails with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "safehold", "--repo", str(cli.repo), *args],
        env=cli.env | {"MALLOC_ARENA_MAX": "2"},
        capture_output=True,
        timeout=timeout,
        preexec_fn=preexec,
        check=False,
    )
    took = time.monotonic() - started
    out = Result(
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )
    return out, took


def _restored(target: Path, src: Path) -> Path:
    return target / str(src).lstrip("/")


def test_a_corrupt_blob_exit_4_names_the_file_and_restores_the_rest(
    cli: Cli, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "victim.bin").write_bytes(os.urandom(300_000))
    for i in range(20):
        (src / "sub" / f"f{i}.txt").write_text(f"file {i} " * (100 * i + 1))
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    os.link(src / "sub" / "f3.txt", src / "f3-link.txt")
    cli.ok("init")
    cli.ok("backup", str(src))
    repo = _repo(cli)
    snap = repo.find_snapshot("latest")
    victim = node_at(repo, snap, str(src / "victim.bin"))
    assert victim.content
    flip_blob(repo, cli.repo, victim.content[-1])
    target = tmp_path / "target"
    r = cli("restore", "latest", "--target", str(target))
    assert r.code == 4, str(r)
    assert "Traceback" not in r.err
    assert f"not restored: {src}/victim.bin:" in r.err  # as it happens
    assert f"{src}/victim.bin:" in r.out and "1 entries not restored" in r.out  # in the summary
    assert "22 files" in r.out  # the counts say what happened: 23 files, 22 restored
    out = _restored(target, src)
    assert not (out / "victim.bin").exists() and temporaries(target) == []
    want, want_links = digest(src)
    got, got_links = digest(out)
    del want[b"victim.bin"]
    assert got == want and got_links == want_links
    # --json names it too
    r = cli("--json", "restore", "latest", "--target", str(tmp_path / "t2"))
    assert r.code == 4, str(r)
    summary = [json.loads(line) for line in r.out.splitlines()][-1]
    assert summary["failed"] == [
        {"path": f"{src}/victim.bin", "reason": summary["failed"][0]["reason"], "damage": True}
    ]
    assert summary["files"] == 22


@pytest.mark.parametrize("how", ["tmpfs", "rlimit_fsize"])
def test_disk_full_mid_file_exit_2_and_no_partial_file(cli: Cli, tmp_path: Path, how: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "small.txt").write_text("small")
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    cli.ok("init")
    cli.ok("backup", str(src))
    if how == "tmpfs":  # a real full file system
        with small_tmpfs(tmp_path / "full", "1m") as target:
            out = _restored(target, src)
            out.mkdir(parents=True)
            (out / "big.bin").write_bytes(b"the previous version")
            r = cli("restore", "latest", "--target", str(target))
            assert r.code == 2, str(r)
            assert "No space left on device" in r.err
            assert (out / "big.bin").read_bytes() == b"the previous version"
            _whole_or_named(out / "small.txt", src / "small.txt", "small", r)
            assert temporaries(target) == []
    else:  # the kernel refuses to grow a file beyond RLIMIT_FSIZE (EFBIG): no root needed
        target = tmp_path / "t"
        r, _ = run_limited(
            cli,
            "restore",
            "latest",
            "--target",
            str(target),
            limits={resource.RLIMIT_FSIZE: 1 << 20},
            ignore_xfsz=True,
        )
        assert r.code == 2, str(r)
        assert "File too large" in r.err and "big.bin" in r.err
        out = _restored(target, src)
        assert not (out / "big.bin").exists() and temporaries(target) == []
        assert (out / "small.txt").read_text() == "small"
        assert "1 files" in r.out and "0 damaged in the repository, 1 not written" in r.out
    assert "Traceback" not in r.err
    assert "0 damaged in the repository" in r.out


def _whole_or_named(path: Path, snapshot_path: Path, text: str, r: Result) -> None:
    """A file written while the disk was full (because of another file) is restored whole, or
    named and absent: never cut off."""
    if path.exists():
        assert path.read_text() == text
    else:
        assert f"not restored: {snapshot_path}:" in r.err, str(r)


def test_a_socket_is_named_exit_1(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    sock.close()
    cli.ok("init")
    cli.ok("backup", str(src))
    target = tmp_path / "t"
    r = cli("restore", "latest", "--target", str(target))
    assert r.code == 1, str(r)
    assert f"not restored: {src}/sock is a socket" in r.err
    assert (_restored(target, src) / "f").read_text() == "x"
    assert "exit status" in cli("restore", "--help").out  # the codes are documented


# --- deep trees and many hardlinks under a descriptor limit ---------------------------------

DEPTH = 400
LINKED = 1500  # hardlinked names: 750 inodes with two names each, in different directories


@pytest.fixture
def removed_after(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths removed after the test with ``rm -rf`` (pytest's own clean-up of old temporary
    directories recurses, and fails on trees deeper than Python's recursion limit)."""
    paths: list[Path] = []
    yield paths
    for p in paths:
        subprocess.run(["rm", "-rf", "--", str(p)], check=False)


def make_deep_tree(root: Path) -> None:
    """DEPTH nested directories (the path exceeds PATH_MAX: made with dir_fd) holding LINKED
    hardlinked names spread over the levels."""
    root.mkdir()
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for i in range(DEPTH):
            name = f"level-{i:04d}"  # 11 bytes a level with the slash: 4,400 bytes in all
            os.mkdir(name, dir_fd=fds[-1])
            fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        for k in range(LINKED // 2):
            a, b = fds[k % (DEPTH + 1)], fds[DEPTH - k % (DEPTH + 1)]
            fd = os.open(f"h{k}-a", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=a)
            os.write(fd, f"inode {k}\n".encode() * (k % 7 + 1))
            os.close(fd)
            os.link(f"h{k}-a", f"h{k}-b", src_dir_fd=a, dst_dir_fd=b)
    finally:
        for fd in fds:
            os.close(fd)


def test_a_400_level_tree_with_1500_hardlinks_restores_under_ulimit_256(
    cli: Cli, tmp_path: Path, removed_after: list[Path]
) -> None:
    src = tmp_path / "src"
    target = tmp_path / "t"
    removed_after += [src, target]
    make_deep_tree(src)
    cli.ok("init")
    cli.ok("backup", str(src))  # backup copes with the depth
    limits = {resource.RLIMIT_NOFILE: 256}
    r, _ = run_limited(cli, "restore", "latest", "--target", str(target), limits=limits)
    assert r.code == 0, str(r)
    assert f"{LINKED} files, {DEPTH + len(src.parts) - 1} directories" in r.out
    want, want_links = digest(src)
    got, got_links = digest(_restored(target, src))
    assert len(want_links) == LINKED // 2
    assert got == want and got_links == want_links
    r, _ = run_limited(cli, "ls", "latest", limits=limits)
    assert r.code == 0, str(r)
    assert len(r.out.splitlines()) == len(want) + len(src.parts) - 1


def test_restore_holds_few_descriptors(cli: Cli, tmp_path: Path, removed_after: list[Path]) -> None:
    """Counted in the process itself: never more than 64 descriptors above what it held
    before restore began, sampled while it runs."""
    from safehold.ops.restore import RestoreOptions, restore

    src = tmp_path / "src"
    target = tmp_path / "t"
    removed_after += [src, target]
    make_deep_tree(src)
    cli.ok("init")
    cli.ok("backup", str(src))
    repo = _repo(cli)
    snap = repo.find_snapshot("latest")
    repo.index  # noqa: B018 - loaded before the baseline
    baseline = len(os.listdir("/proc/self/fd"))
    peak = [0]
    done = [False]

    def sample() -> None:
        while not done[0]:
            peak[0] = max(peak[0], len(os.listdir("/proc/self/fd")))

    import threading

    t = threading.Thread(target=sample)
    t.start()
    try:
        res = restore(repo, snap, RestoreOptions(target=str(target)))
    finally:
        done[0] = True
        t.join()
    assert not res.errors and res.files == LINKED
    assert peak[0] - baseline <= 64, (baseline, peak[0])


# --- a hostile tree DAG ----------------------------------------------------------------------

MEMORY = 512 << 20


def _dag_cases(cli: Cli, tmp_path: Path, summary: bool) -> tuple[Snapshot, list[list[str]]]:
    honest = tmp_path / "honest"
    honest.mkdir()
    (honest / "f").write_text("x")
    cli.ok("init")
    cli.ok("backup", str(honest))
    repo = _repo(cli)
    good = repo.find_snapshot("latest")
    snap = dag_snapshot(repo, 30, summary=summary)
    repo.close()
    sid = snap.id[:12]
    return snap, [
        ["ls", sid],
        ["ls", "-l", sid, "/a/a/b"],
        ["find", "leaf"],
        ["stats", sid],
        ["stats"],
        ["diff", good.id[:12], sid],
        ["restore", sid, "--target", str(tmp_path / "t")],
    ]


@pytest.mark.parametrize("summary", [True, False], ids=["recorded-counts", "no-counts"])
def test_a_tree_dag_is_refused_in_bounded_time_and_memory(
    cli: Cli, tmp_path: Path, summary: bool
) -> None:
    _, cases = _dag_cases(cli, tmp_path, summary)
    for args in cases:
        r, took = run_limited(cli, *args, limits={resource.RLIMIT_AS: MEMORY}, timeout=120)
        assert r.code == 4, (args, str(r))
        assert took < 60, (args, took)
        assert "Traceback" not in r.err and "MemoryError" not in r.err, (args, str(r))
        lines = [x for x in r.err.splitlines() if "expand beyond what it recorded" in x]
        assert len(lines) == 1, (args, str(r))
        if args[0] != "find":  # find goes on with the other snapshots, then counts matches
            assert len(r.err.strip().splitlines()) == 1, (args, str(r))
    assert not (tmp_path / "t").exists()
