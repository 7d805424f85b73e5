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


def test_prune_cli(cli: Cli, tmp_path: Path) -> None:
    import os

    src = tmp_path / "s"
    src.mkdir()
    cli.ok("init")
    (src / "big").write_bytes(os.urandom(2_000_000))
    cli.ok("backup", str(src))
    (src / "big").write_bytes(os.urandom(1_000_000))
    cli.ok("backup", str(src))
    size = lambda: sum(p.stat().st_size for p in (cli.repo / "data").rglob("*") if p.is_file())  # noqa: E731
    before = size()
    dry = cli.ok("prune", "--dry-run", "--grace-minutes", "0").out
    assert "would condemn 0 unused packs" in dry and size() == before  # nothing is unused yet
    # as a new user would: no grace option; on a local disk with no other client active, the
    # space is freed in the same run
    r = cli.ok("forget", "--keep-last", "1", "--prune", "--json")
    prune_out = json.loads(r.out.splitlines()[-1])
    assert prune_out["type"] == "prune" and prune_out["deleted_bytes"] >= 1_900_000
    assert size() <= before - 1_900_000
    cli.ok("check", "--read-data")
    # with a grace period the deletion waits for a later prune, and says when
    (src / "big").write_bytes(os.urandom(500_000))
    cli.ok("backup", str(src))
    cli.ok("forget", "--keep-last", "1")
    out = cli.ok("prune", "--grace-minutes", "5").out
    assert "deleted 0 packs" in out and "waits" in out and "condemned 2 packs" in out, out
    assert "condemned" in cli.ok("check").out
    again = cli.ok("prune", "--grace-minutes", "5").out
    assert "nothing to prune" in again and "deleted 0 packs" in again, again
    assert list((cli.repo / "plans").iterdir()).__len__() == 1  # no plan for nothing to do
    done = cli.ok("prune").out
    assert "finished 1 earlier plans" in done and "deleted 2 packs" in done, done
    # a plan made and carried out in one run is not an "earlier" one
    (src / "big").write_bytes(os.urandom(400_000))
    cli.ok("backup", str(src))
    now = cli.ok("forget", "--keep-last", "1", "--prune").out
    assert "deleted at once" in now and "earlier" not in now, now
    r = cli("prune", "--max-unused", "lots")
    assert r.code == 2 and "max-unused" in r.err
