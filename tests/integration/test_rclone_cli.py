"""The command line end to end on an rclone repository: the real rclone binary, a local remote.

The remote is defined in a temporary config file named by ``RCLONE_CONFIG`` (see
``tests/backends/rclone_env.py``); each ``safehold`` subprocess starts its own ``rclone rcd``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from safehold.backends import open_backend
from tests.conftest import Cli, Result
from tests.support.checks import stderr_line as _one_line
from tests.support.rclone_config import REMOTE, RcloneEnv
from tests.support.treecmp import compare_trees

pytest_plugins = ["tests.backends.rclone_env"]  # rclone_env
pytestmark = pytest.mark.rclone


class RcloneCli:
    """``safehold --repo rclone:REMOTE:PATH …`` in a subprocess."""

    def __init__(self, cli: Cli, env: RcloneEnv, sub: str = "backups/host1") -> None:
        self.cli = cli
        self.path = env.base / sub
        self.url = f"rclone:{env.remote_path(sub)}"
        cli.env = {k: v for k, v in cli.env.items() if not k.startswith("RCLONE_")} | env.env

    def __call__(self, *args: str, url: str | None = None, **kw: Any) -> Result:
        return self.cli("--repo", url or self.url, *args, repo=False, **kw)

    def ok(self, *args: str, **kw: Any) -> Result:
        r = self(*args, **kw)
        assert r.code == 0, str(r)
        return r


@pytest.fixture
def rcli(cli: Cli, rclone_env: RcloneEnv) -> RcloneCli:
    return RcloneCli(cli, rclone_env)


def _rcd_processes(marker: str) -> list[int]:
    """The pids of running ``rclone rcd`` processes whose command line holds ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"rcd" in argv and marker.encode() in argv and state != "Z":
            pids.append(int(entry))
    return pids


def test_init_backup_restore_check(
    rcli: RcloneCli, rclone_env: RcloneEnv, small_tree: Path, tmp_path: Path
) -> None:
    r = rcli.ok("init", "--chunk-avg", "64K", "--pack-size", "1M")
    assert f"at {rcli.url}" in r.out
    assert rcli("init").code == 2  # refuses a location that holds one
    summary = json.loads(rcli.ok("backup", "--json", str(small_tree)).out.splitlines()[-1])
    assert summary["type"] == "summary" and summary["files_new"] > 10
    # the objects are files under the remote's path, and no temporary file is left
    on_disk = [p.relative_to(rcli.path) for p in rcli.path.rglob("*") if p.is_file()]
    assert {p.parts[0] for p in on_disk} >= {"config", "keys", "data", "index", "snapshots"}
    assert not [p for p in on_disk if p.name.startswith(".tmp-")]

    snaps = json.loads(rcli.ok("snapshots", "--json").out)
    assert [s["id"] for s in snaps] == [summary["snapshot"]]
    rcli.ok("restore", "latest", "--target", str(tmp_path / "r"))
    assert compare_trees(small_tree, tmp_path / "r" / str(small_tree).lstrip("/")) == []
    # with the config named by the option instead of RCLONE_CONFIG; it is also on the
    # daemon's command line, which shows that no daemon outlives its command
    del rcli.cli.env["RCLONE_CONFIG"]
    marker = str(rclone_env.config)
    probe = open_backend(rcli.url, {"rclone.config": marker})
    probe.stat("config")
    assert len(_rcd_processes(marker)) == 1  # the check below can see a daemon
    probe.close()
    assert _rcd_processes(marker) == []
    r = rcli("check", "--read-data", "-o", f"rclone.config={marker}")
    assert r.code == 0, str(r)
    assert "no errors" in r.out
    assert _rcd_processes(marker) == []


def test_bad_locations_are_one_line_errors(rcli: RcloneCli, rclone_env: RcloneEnv) -> None:
    # a remote that is not configured
    for cmd in (["init"], ["snapshots"]):
        r = rcli(*cmd, url="rclone:nosuch:backups")
        assert r.code == 2, str(r)
        assert _one_line(r.err) == (
            f"safehold: rclone remote 'nosuch' is not configured in {rclone_env.config} "
            "(add it with 'rclone config', or set RCLONE_CONFIG or -o rclone.config=PATH)"
        )
    # no rclone binary
    r = rcli("snapshots", "-o", f"rclone.binary={rclone_env.base}/no-rclone")
    assert r.code == 2, str(r)
    assert _one_line(r.err) == (
        "safehold: rclone not found: install it (e.g. apt-get install rclone) or set "
        "-o rclone.binary=PATH"
    )
    # an unknown option, and the "//" of other schemes
    r = rcli("-o", "rclone.confg=x", "snapshots")
    assert r.code == 2 and "unknown option 'rclone.confg'" in _one_line(r.err)
    r = rcli("snapshots", url=f"rclone://{REMOTE}/x")
    assert r.code == 2 and "write rclone:REMOTE:PATH" in _one_line(r.err)
    # an empty location is no repository
    r = rcli("snapshots")
    assert r.code == 2 and f"there is no repository at {rcli.url}" in _one_line(r.err)
