"""Backup options and metadata: dry run, compression rules, parent, xattrs, owners, TTY use."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PASSWORD, Cli


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def _summary(r_out: str) -> dict[str, object]:
    last: dict[str, object] = json.loads(r_out.splitlines()[-1])
    return last


def test_dry_run_stores_nothing(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(100_000))
    cli.ok("init")
    before = _files(cli.repo)
    s = _summary(cli.ok("backup", "--dry-run", "--json", str(src)).out)
    assert s["dry_run"] is True and s["files_new"] == 1 and s["data_added"] == 100_000
    assert "snapshot" not in s
    assert _files(cli.repo) == before
    assert json.loads(cli.ok("snapshots", "--json").out) == []


def test_compression_for_overrides_by_glob(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    text = b"the same words again and again " * 20_000
    (src / "a.txt").write_bytes(text)
    (src / "b.raw").write_bytes(text + b"!")
    cli.ok("init")
    cli.ok("backup", str(src), "--compression-for", "*.raw=none")
    stats = json.loads(cli.ok("stats", "--json").out)
    # a.txt compresses to almost nothing; b.raw is stored whole
    assert len(text) < stats["stored_size"] < len(text) * 1.1


def test_explicit_parent_and_unknown_parent(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_text("x")
    cli.ok("init")
    first = _summary(cli.ok("backup", "--json", str(src)).out)["snapshot"]
    assert isinstance(first, str)
    second = _summary(cli.ok("backup", "--json", "--parent", first[:8], str(src)).out)
    assert second["parent"] == first
    r = cli("backup", "--parent", "deadbeef", str(src))
    assert r.code == 2 and "--parent" in r.err


def test_xattrs_and_owners_survive(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    f = src / "f"
    f.write_text("with attributes")
    try:
        os.setxattr(f, "user.safehold-test", b"value \x00\xff")
    except OSError as e:  # pragma: no cover - depends on the filesystem
        pytest.skip(f"this filesystem has no user xattrs ({e.strerror})")
    if os.geteuid() == 0:
        os.chown(f, 12345, 23456)
    cli.ok("init")
    cli.ok("backup", str(src))
    cli.ok("restore", "latest", "--target", str(tmp_path / "r"))
    g = tmp_path / "r" / str(f).lstrip("/")
    assert os.getxattr(g, "user.safehold-test") == b"value \x00\xff"
    if os.geteuid() == 0:
        assert (g.stat().st_uid, g.stat().st_gid) == (12345, 23456)


def test_cache_only_changes_speed(cli: Cli, tmp_path: Path) -> None:
    """The same tree with a warm cache, with no cache, and after a change the cache cannot see
    in the mtime (content changed, mtime set back: the ctime still moves)."""
    src = tmp_path / "s"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "e" / "f").write_text("original")
    (src / "g").write_text("g")
    cli.ok("init")
    trees = []
    for extra in ([], [], ["--no-cache"]):
        cli.ok(*extra, "backup", str(src))
        trees.append(_source_tree(cli, src))
    # the tree of the source itself (its ancestors' metadata changes as the test writes files)
    assert trees[0] == trees[1] == trees[2]
    f = src / "d" / "e" / "f"
    st = f.stat()
    time.sleep(0.01)
    f.write_text("modified")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    s = _summary(cli.ok("backup", "--json", str(src)).out)
    assert s["files_changed"] == 1
    out = subprocess.run(
        [sys.executable, "-m", "safehold", "--repo", str(cli.repo), "dump", "latest", str(f)],
        env=cli.env,
        capture_output=True,
        check=True,
    ).stdout
    assert out == b"modified"


def _source_tree(cli: Cli, src: Path) -> bytes:
    """The tree id of ``src`` in the latest snapshot."""
    from safehold.backends.local import LocalBackend
    from safehold.repository.repo import Repository

    repo = Repository.open(LocalBackend(cli.repo), PASSWORD.encode())
    tree = repo.find_snapshot("latest").tree
    for part in src.parts[1:]:
        (node,) = [n for n in repo.read_tree(tree) if n.name == os.fsencode(part)]
        assert node.subtree is not None
        tree = node.subtree
    return tree


def _run_on_tty(cli: Cli, args: list[str], answer: bytes | None = None) -> tuple[int, bytes]:
    """Run the CLI with stdin and stderr on a pseudo-terminal; type ``answer`` at a prompt."""
    master, slave = pty.openpty()
    env = dict(cli.env)
    if answer is not None:
        env.pop("SAFEHOLD_PASSWORD", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "safehold", "--repo", str(cli.repo), *args],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    seen = b""
    deadline = time.time() + 60
    typed = False
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            if answer is not None and not typed and b"password" in seen.lower():
                os.write(master, answer + b"\n")
                typed = True
        if proc.poll() is not None and not r:
            break
    proc.wait(timeout=30)
    os.close(master)
    return proc.returncode, seen


def test_password_prompt_and_progress_on_a_tty(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(200_000))
    cli.ok("init")
    code, seen = _run_on_tty(cli, ["backup", str(src)], answer=PASSWORD.encode())
    assert code == 0, seen
    assert json.loads(cli.ok("snapshots", "--json").out)
    code, seen = _run_on_tty(cli, ["snapshots"], answer=b"wrong password")
    assert code == 3 and b"wrong password" in seen
