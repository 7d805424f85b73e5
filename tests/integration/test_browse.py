"""ls, find, diff, dump, stats, key management and check subsets through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import Cli


def _tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "deep.txt").write_text("deep")
    (root / "a" / "x.log").write_text("log " * 100)
    (root / "top.txt").write_text("top")
    (root / os.fsdecode(b"caf\xe9")).write_bytes(b"latin1")


def test_ls_find_dump_stats(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    _tree(src)
    cli.ok("init")
    cli.ok("backup", str(src))
    out = cli.ok("ls", "latest", str(src / "a")).out.splitlines()
    assert out == [f"{src}/a/b", f"{src}/a/b/deep.txt", f"{src}/a/x.log"]
    rows = [json.loads(x) for x in cli.ok("ls", "--json", "latest").out.splitlines()]
    assert {r["path"] for r in rows} >= {f"{src}/top.txt", f"{src}/a/b/deep.txt"}
    assert any(r["path"].endswith("caf\udce9") or "caf" in r["path"] for r in rows)
    long = cli.ok("ls", "-l", "latest", str(src)).out
    assert "-rw-" in long and "top.txt" in long
    found = cli.ok("find", "*.txt").out
    assert "deep.txt" in found and "top.txt" in found and "x.log" not in found
    raw = subprocess.run(
        [
            sys.executable,
            "-m",
            "safehold",
            "--repo",
            str(cli.repo),
            "dump",
            "latest",
            f"{src}/a/x.log",
        ],
        env=cli.env,
        capture_output=True,
        check=True,
    ).stdout
    assert raw == (src / "a" / "x.log").read_bytes()
    r = cli("dump", "latest", f"{src}/nope")
    assert r.code == 2 and "not a file" in r.err
    stats = json.loads(cli.ok("stats", "--json", "latest").out)
    assert stats["files"] == 4 and stats["total_size"] == sum(
        p.stat().st_size for p in src.rglob("*") if p.is_file()
    )


def test_diff(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    _tree(src)
    cli.ok("init")
    first = json.loads(cli.ok("backup", "--json", str(src)).out.splitlines()[-1])["snapshot"]
    (src / "top.txt").write_text("changed")
    (src / "new.txt").write_text("new")
    (src / "a" / "x.log").unlink()
    os.chmod(src / "a" / "b" / "deep.txt", 0o600)
    second = json.loads(cli.ok("backup", "--json", str(src)).out.splitlines()[-1])["snapshot"]
    rows = [json.loads(x) for x in cli.ok("diff", "--json", first[:8], second[:8]).out.splitlines()]
    changes = {r["path"].rsplit("/", 1)[-1]: r["change"] for r in rows if "path" in r}
    assert changes["top.txt"] == "modified"
    assert changes["new.txt"] == "added"
    assert changes["x.log"] == "removed"
    assert changes["deep.txt"] == "metadata"
    summary = rows[-1]
    assert (summary["added"], summary["removed"], summary["modified"]) == (1, 1, 1)
    assert summary["metadata"] == sum(1 for c in changes.values() if c == "metadata") >= 1


def test_key_commands(cli: Cli, tmp_path: Path) -> None:
    cli.ok("init")
    new = tmp_path / "new-pw"
    new.write_text("second password\n")
    cli.ok("key", "add", "--new-password-file", str(new))
    keys = json.loads(cli.ok("key", "list", "--json").out)
    assert len(keys) == 2 and sum(k["current"] for k in keys) == 1
    other = next(k for k in keys if not k["current"])
    assert cli("snapshots", env={"SAFEHOLD_PASSWORD": "second password"}).code == 0
    third = tmp_path / "third"
    third.write_text("third password")
    cli.ok("key", "passwd", "--new-password-file", str(third))
    assert cli("snapshots").code == 3  # the old password no longer opens
    env3 = {"SAFEHOLD_PASSWORD": "third password"}
    r = cli("key", "remove", other["id"][:10], env=env3)
    assert r.code == 0, str(r)
    keys = json.loads(cli.ok("key", "list", "--json", env=env3).out)
    assert len(keys) == 1
    r = cli("key", "remove", keys[0]["id"][:10], env=env3)
    assert r.code == 2 and "last key" in r.err


def test_check_read_data_subset(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(600_000))
    cli.ok("init", "--pack-size", "1M", "--chunk-avg", "64K")
    cli.ok("backup", str(src))
    total = json.loads(cli.ok("check", "--json", "--read-data").out)["packs_read"]
    assert total >= 4
    parts = [
        json.loads(cli.ok("check", "--json", "--read-data-subset", f"{n}/3").out)["packs_read"]
        for n in (1, 2, 3)
    ]
    assert sum(parts) == total
    r = cli("check", "--read-data-subset", "0/3")
    assert r.code == 2 and "invalid subset" in r.err
    pct = json.loads(cli.ok("check", "--json", "--read-data-subset", "100%").out)["packs_read"]
    assert pct == total


def test_sigint_stops_cleanly_and_the_next_run_reuses_the_uploads(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    for i in range(10):
        (src / f"f{i}").write_bytes(os.urandom(8 << 20))
    cli.ok("init", "--pack-size", "1M")
    proc = subprocess.Popen(
        [sys.executable, "-m", "safehold", "--repo", str(cli.repo), "backup", str(src)],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    data = cli.repo / "data"
    deadline = time.time() + 60
    while time.time() < deadline:
        if sum(1 for p in data.rglob("*") if p.is_file() and not p.name.startswith(".")) >= 3:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert "interrupted" in err.decode()
    assert json.loads(cli.ok("snapshots", "--json").out) == []
    cli.ok("check", "--read-data")
    second = json.loads(cli.ok("backup", "--json", str(src)).out.splitlines()[-1])
    assert second["bytes_uploaded"] < 80 << 20
    cli.ok("check", "--read-data")
