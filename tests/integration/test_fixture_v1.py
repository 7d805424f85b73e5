"""The v1 repository made once and kept in git: every run opens, checks and restores it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tests.conftest import Cli

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _restored_manifest(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root)):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, os.fsencode(root)).hex()
            st = os.lstat(p)
            e: dict[str, Any] = {"mode": st.st_mode, "mtime_ns": st.st_mtime_ns}
            if os.path.islink(p):
                e["target"] = os.readlink(p).hex()
            elif os.path.isfile(p):
                e["size"] = st.st_size
                with open(p, "rb") as f:
                    e["sha256"] = hashlib.sha256(f.read()).hexdigest()
                e["nlink"] = st.st_nlink
            out[rel] = e
    return out


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
    got = _restored_manifest(target / doc["source"].lstrip("/"))
    assert got == doc["entries"]
    sparse = target / doc["source"].lstrip("/") / "sparse.img"
    assert sparse.stat().st_blocks * 512 < sparse.stat().st_size
