"""--retry-lock, repair and rotating check subsets through the CLI."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

from tests.conftest import Cli


def _foreign_lock(cli: Cli, expires_in: float) -> Path:
    lock = {
        "v": 1,
        "host": "other-" + socket.gethostname(),
        "pid": 1,
        "user": "x",
        "time": time.time(),
        "expires": time.time() + expires_in,
        "exclusive": True,
    }
    (cli.repo / "locks").mkdir(exist_ok=True)
    path = cli.repo / "locks" / ("cd" * 32)
    path.write_text(json.dumps(lock))
    return path


def test_retry_lock_waits_and_gives_up_with_exit_5(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    cli.ok("init")
    lock = _foreign_lock(cli, 300)  # an honest lease (a longer one is garbage)
    t0 = time.monotonic()
    r = cli("--retry-lock", "2s", "backup", str(src))
    assert r.code == 5 and "locked" in r.err
    assert time.monotonic() - t0 >= 2
    r = cli("--retry-lock", "soon", "snapshots")
    assert r.code == 2 and "invalid wait" in r.err
    # a lock that expires while we wait is waited out
    lock.unlink()
    _foreign_lock(cli, 1.5)
    cli.ok("--retry-lock", "30s", "backup", str(src))


def test_repair_index_cli(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    cli.ok("init")
    cli.ok("backup", str(src))
    for p in (cli.repo / "index").iterdir():
        p.unlink()
    assert cli("--no-cache", "check").code == 4
    assert "would index" in cli.ok("repair", "index", "--dry-run").out
    out = cli.ok("repair", "index").out
    assert "indexed" in out and "0 unreadable" in out
    cli.ok("check", "--read-data")
    assert "rewrote 0 snapshots" in cli.ok("repair", "snapshots").out


def test_check_subset_reports_coverage(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(500_000))
    cli.ok("init", "--pack-size", "1M")
    cli.ok("backup", str(src))
    total = json.loads(cli.ok("check", "--json", "--read-data").out)["packs_read"]
    per_run = math.ceil(0.34 * total)
    seen = []
    for _ in range(10):
        res = json.loads(cli.ok("check", "--json", "--read-data-subset", "34%").out)
        seen.append(res["coverage"])
        if res["cycle_complete"]:
            break
    assert seen[-1] == 1.0 and len(seen) == math.ceil(total / per_run)
    nxt = res["cycle"] + 1  # a new cycle starts (a full --read-data also completes one)
    assert f"subset cycle {nxt}" in cli.ok("check", "--read-data-subset", "34%").out
