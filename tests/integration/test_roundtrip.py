"""Backup and restore end to end through the CLI, compared by hashing both trees."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.conftest import Cli
from tests.support.treecmp import compare_trees
from tests.support.treegen import make_tree, mutate_tree


def _restored(target: Path, src: Path) -> Path:
    return target / str(src).lstrip("/")


def test_roundtrip_then_change_set(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 4 << 20, seed=3)
    cli.ok("init", "--chunk-avg", "64K", "--pack-size", "1M")
    first = json.loads(cli.ok("backup", "--json", str(src)).out.splitlines()[-1])
    assert first["type"] == "summary" and first["files_new"] > 100
    cli.ok("restore", "latest", "--target", str(tmp_path / "r1"), "--verify")
    assert compare_trees(src, _restored(tmp_path / "r1", src)) == []

    # unchanged: nothing is read again, (almost) nothing stored
    second = json.loads(cli.ok("backup", "--json", str(src)).out.splitlines()[-1])
    assert second["files_new"] == second["files_changed"] == 0
    assert second["bytes_read"] == 0
    assert second["parent"] == first["snapshot"]

    mutate_tree(src, seed=4)
    third = json.loads(cli.ok("backup", "--json", str(src)).out.splitlines()[-1])
    assert third["files_changed"] + third["files_new"] > 0
    assert third["data_added"] < first["data_added"] / 2, "the change set must deduplicate"
    cli.ok("restore", third["snapshot"][:10], "--target", str(tmp_path / "r3"))
    assert compare_trees(src, _restored(tmp_path / "r3", src)) == []

    # the first snapshot still restores to the original tree
    orig = tmp_path / "orig"
    make_tree(orig, 4 << 20, seed=3)
    cli.ok("restore", first["snapshot"][:8], "--target", str(tmp_path / "r1b"))
    diffs = compare_trees(orig, _restored(tmp_path / "r1b", src))
    # symlink targets that embed the tree's own absolute path differ by design
    assert all("symlink" in d or "target" in d for d in diffs), diffs
    cli.ok("check", "--read-data")


def test_restore_into_existing_target_touches_nothing_else(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a.txt").write_text("from the snapshot")
    (src / "b.txt").write_text("b")
    cli.ok("init")
    cli.ok("backup", str(src))
    target = tmp_path / "t"
    dest = _restored(target, src)
    (dest / "d").mkdir(parents=True)
    (dest / "d" / "a.txt").write_text("old content that is replaced, longer than before")
    (dest / "keep.txt").write_text("not in the snapshot")
    (dest / "b.txt").symlink_to("/etc/passwd")  # replaced, never followed
    cli.ok("restore", "latest", "--target", str(target))
    assert (dest / "d" / "a.txt").read_text() == "from the snapshot"
    assert (dest / "keep.txt").read_text() == "not in the snapshot"
    assert not (dest / "b.txt").is_symlink() and (dest / "b.txt").read_text() == "b"


def test_restore_include_exclude(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    for rel in ("docs/a.txt", "docs/b.log", "pics/c.jpg", "top.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    cli.ok("init")
    cli.ok("backup", str(src))
    cli.ok(
        "restore",
        "latest",
        "--target",
        str(tmp_path / "i"),
        "--include",
        "*.txt",
        "--exclude",
        "top.txt",
    )
    got = sorted(
        str(p.relative_to(_restored(tmp_path / "i", src)))
        for p in _restored(tmp_path / "i", src).rglob("*")
        if p.is_file()
    )
    assert got == ["docs/a.txt"]


def test_backup_excludes(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    (src / "cache").mkdir(parents=True)
    (src / "cache" / "CACHEDIR.TAG").write_bytes(b"Signature: 8a477f597d28d172789f06886806bc55\n")
    (src / "cache" / "junk").write_text("junk")
    (src / "proj" / "node_modules").mkdir(parents=True)
    (src / "proj" / "node_modules" / "x.js").write_text("x")
    (src / "proj" / "main.py").write_text("print()")
    (src / "skipme").mkdir()
    (src / "skipme" / ".nobackup").touch()
    (src / "skipme" / "secret").write_text("s")
    (src / "big.bin").write_bytes(os.urandom(300_000))
    (src / "a.tmp").write_text("t")
    excl = tmp_path / "excl.txt"
    excl.write_text("# comment\n*.tmp\n")
    cli.ok("init")
    cli.ok(
        "backup",
        str(src),
        "--exclude",
        "node_modules/",
        "--exclude-file",
        str(excl),
        "--exclude-caches",
        "--exclude-if-present",
        ".nobackup",
        "--exclude-larger-than",
        "100K",
    )
    listing = cli.ok("ls", "latest").out.splitlines()
    names = {line.rsplit("/", 1)[-1] for line in listing}
    assert "main.py" in names and "CACHEDIR.TAG" in names
    for gone in ("junk", "x.js", "secret", "big.bin", "a.tmp"):
        assert gone not in names, gone


def test_stdin_backup_and_dump(cli: Cli) -> None:
    payload = os.urandom(200_000) + b"dump me" * 10000
    cli.ok("init")
    cli.ok("backup", "--stdin", "--stdin-filename", "db.sql", input=payload)
    r = cli("dump", "latest", "/db.sql")
    assert r.code == 0, r.err
    out = cli.ok("dump", "latest", "db.sql")
    assert out.code == 0
    import subprocess
    import sys

    raw = subprocess.run(
        [sys.executable, "-m", "safehold", "--repo", str(cli.repo), "dump", "latest", "/db.sql"],
        env=cli.env,
        capture_output=True,
        check=True,
    ).stdout
    assert raw == payload


def test_embedded_default_repository(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "docs"
    src.mkdir()
    (src / "f.txt").write_text("hello")
    env = {"SAFEHOLD_PASSWORD": ""}
    cli.env.pop("SAFEHOLD_PASSWORD")
    r = cli("backup", str(src), repo=False)
    assert r.code == 0, str(r)
    assert "password" in r.err and "keep a copy" in r.err
    pw = Path(cli.env["SAFEHOLD_CONFIG_DIR"]) / "password"
    assert pw.stat().st_mode & 0o777 == 0o600
    assert (Path(cli.env["SAFEHOLD_DATA_DIR"]) / "repository" / "config").exists()
    r = cli("snapshots", "--json", repo=False)
    assert r.code == 0 and len(json.loads(r.out)) == 1
    del env


def test_snapshot_filters_and_latest(cli: Cli, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "y").write_text("b")
    cli.ok("init")
    cli.ok("backup", str(a), "--tag", "one", "--host", "h1")
    cli.ok("backup", str(b), "--tag", "two", "--host", "h2")
    snaps = json.loads(cli.ok("snapshots", "--json").out)
    assert [s["host"] for s in snaps] == ["h1", "h2"]
    assert len(json.loads(cli.ok("snapshots", "--json", "--tag", "one").out)) == 1
    out = cli.ok("ls", "latest", "--host", "h1").out
    assert "/x" in out and "/y" not in out
    r = cli("ls", "latest", "--host", "nobody")
    assert r.code == 2 and "no snapshot" in r.err
    shutil.rmtree(a)


def test_zeros_and_holes_restore_exactly(cli: Cli, tmp_path: Path) -> None:
    """Zero runs stored as data and real holes, at the start, middle and end of files."""
    k = 64 * 1024
    src = tmp_path / "z"
    src.mkdir()
    contents = {
        "tail-zeros": os.urandom(k) + bytes(2 * k),  # one blob ending in aligned zero blocks
        "all-zeros": bytes(3 * k),
        "middle": os.urandom(100) + bytes(5 * k) + os.urandom(100),
        "big-tail": os.urandom(3 << 20) + bytes(2 << 20),  # several chunks
        "empty": b"",
    }
    for name, data in contents.items():
        (src / name).write_bytes(data)
    with open(src / "hole-at-end", "wb") as f:
        f.write(b"head")
        f.truncate(4 << 20)
    cli.ok("init", "--chunk-avg", "64K")
    cli.ok("backup", str(src))
    cli.ok("restore", "latest", "--target", str(tmp_path / "r"))
    out = _restored(tmp_path / "r", src)
    for name, data in contents.items():
        assert (out / name).read_bytes() == data, name
    assert compare_trees(src, out) == []
