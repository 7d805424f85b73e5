"""The v1 repository made once and kept in git: every run opens, checks and restores it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import Cli
from tests.fixtures.make_v1_repo import manifest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_v1_fixture_opens_checks_and_restores(cli: Cli, tmp_path: Path) -> None:
    doc = json.loads((FIXTURES / "v1-manifest.json").read_text())
    repo = tmp_path / "v1"
    shutil.copytree(FIXTURES / "v1-repo", repo)  # tests never write into the fixture
    env = {"SAFEHOLD_PASSWORD": doc["password"], "SAFEHOLD_REPOSITORY": str(repo)}
    snaps = json.loads(cli.ok("snapshots", "--json", repo=False, env=env).out)
    assert [s["id"] for s in snaps] == [doc["snapshot"]]
    assert snaps[0]["tags"] == ["v1"] and snaps[0]["paths"] == [doc["source"]]
    r = cli.ok("check", "--read-data", repo=False, env=env)
    assert "no errors" in r.out
    target = tmp_path / "restore"
    cli.ok("restore", doc["snapshot"][:8], "--target", str(target), repo=False, env=env)
    got = manifest(target / doc["source"].lstrip("/"))
    assert got == doc["entries"]
    sparse = target / doc["source"].lstrip("/") / "sparse.img"
    assert sparse.stat().st_blocks * 512 < sparse.stat().st_size
