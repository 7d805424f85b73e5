"""forget through the CLI: dry run shows the plan and removes nothing; errors are clear."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Cli


def test_forget_cli(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "s"
    src.mkdir()
    cli.ok("init")
    for i in range(3):
        (src / "f").write_text(str(i))
        cli.ok("backup", str(src), "--tag", "t")
    ids = [s["id"] for s in json.loads(cli.ok("snapshots", "--json").out)]
    r = cli("forget")
    assert r.code == 2 and "nothing to forget" in r.err
    r = cli("forget", "--keep-tag", "none", "--keep-last", "0")
    assert r.code == 2 and "every snapshot" in r.err
    r = cli("forget", "nonexistent")
    assert r.code == 2
    out = cli.ok("forget", "--keep-last", "1", "--dry-run").out
    assert sum(line.startswith("remove ") for line in out.splitlines()) == 2
    assert "keep   " + ids[-1][:8] in out
    assert len(json.loads(cli.ok("snapshots", "--json").out)) == 3
    plan = json.loads(cli.ok("forget", "--keep-last", "2", "--json").out)
    assert plan["removed"] == [ids[0]]
    assert [s["id"] for s in json.loads(cli.ok("snapshots", "--json").out)] == ids[1:]
    cli.ok("forget", ids[1][:8])
    assert [s["id"] for s in json.loads(cli.ok("snapshots", "--json").out)] == ids[2:]
    cli.ok("check", "--read-data")
