"""mirror never spreads a loss and mends what is damaged at its target (found by an outside
tester): a pack lost from the repository while its index lists it is never deleted from the
mirror; a damaged object at the target is replaced; a target inside the repository is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.support.checks import stderr_line
from tests.support.treecmp import compare_trees


@pytest.fixture
def mirrored(cli: Cli, tmp_path: Path, small_tree: Path) -> tuple[Path, Path]:
    cli.ok("init", "--chunk-avg", "64K", "--pack-size", "1M")
    cli.ok("backup", str(small_tree))
    target = tmp_path / "mirror"
    cli.ok("mirror", str(target))
    return cli.repo, target


def _packs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "data").rglob("*") if p.is_file())


def test_a_lost_pack_is_not_deleted_from_the_mirror(
    cli: Cli, mirrored: tuple[Path, Path], small_tree: Path, tmp_path: Path
) -> None:
    repo, target = mirrored
    lost = _packs(repo)[0]
    lost.unlink()
    assert cli("check").code == 4
    r = cli("--json", "mirror", str(target), "--delete")
    assert r.code == 1, str(r)
    res = json.loads(r.out.splitlines()[-1])
    assert res["deleted"] == 0 and res["kept"] == [f"data/{lost.parent.name}/{lost.name}"]
    assert "lost, not pruned" in r.out  # a JSON warning line
    # the mirror still restores everything
    assert cli("--repo", str(target), "check", "--read-data", repo=False).code == 0
    out = tmp_path / "r"
    cli.ok("--repo", str(target), "restore", "latest", "--target", str(out), repo=False)
    assert compare_trees(small_tree, out / str(small_tree).lstrip("/")) == []


def test_damage_at_the_target_is_replaced(cli: Cli, mirrored: tuple[Path, Path]) -> None:
    _repo, target = mirrored
    flipped, truncated = _packs(target)[:2]
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    assert cli("--repo", str(target), "check", "--read-data", repo=False).code == 4
    res = json.loads(cli.ok("--json", "mirror", str(target)).out.splitlines()[-1])
    assert res["repaired"] == 1 and res["copied"] == 1, res  # the size told
    res = json.loads(cli.ok("--json", "mirror", str(target), "--verify").out.splitlines()[-1])
    assert res["repaired"] == 1 and res["copied"] == 1, res  # reading told
    assert cli("--repo", str(target), "check", "--read-data", repo=False).code == 0
    res = json.loads(cli.ok("--json", "mirror", str(target), "--verify").out.splitlines()[-1])
    assert res["copied"] == 0 and res["repaired"] == 0


def test_a_target_inside_the_repository_is_refused(cli: Cli, mirrored: tuple[Path, Path]) -> None:
    repo, _ = mirrored
    for inside in (repo / "data", repo.parent):
        r = cli("mirror", str(inside))
        assert r.code == 2 and "one inside the other" in stderr_line(r.err), str(r)
    assert cli("check").code == 0


def test_two_copies_at_once_copy_each_snapshot_once(
    cli: Cli, tmp_path: Path, small_tree: Path
) -> None:
    import subprocess
    import sys

    cli.ok("init", "--chunk-avg", "64K", "--pack-size", "1M")
    cli.ok("backup", str(small_tree))
    cli.ok("backup", str(small_tree), "--tag", "second")
    target = tmp_path / "target"
    cli.ok("--repo", str(target), "init", repo=False)
    cmd = [sys.executable, "-m", "safehold", "--repo", str(target), "copy", "--from-repo",
           str(cli.repo)]  # fmt: skip
    procs = [
        subprocess.Popen(
            cmd, env=cli.env | {"SAFEHOLD_FROM_PASSWORD": cli.env["SAFEHOLD_PASSWORD"]}
        )
        for _ in range(2)
    ]
    assert [p.wait(300) for p in procs] == [0, 0]
    snaps = json.loads(cli.ok("--repo", str(target), "--json", "snapshots", repo=False).out)
    assert len(snaps) == 2, [(s["id"][:8], s["tags"]) for s in snaps]
