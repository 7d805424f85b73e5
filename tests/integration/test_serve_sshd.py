"""safehold serve through a real OpenSSH sshd, with the forced command README.md documents:
the client can back up and restore, but can neither delete nor reach outside the path."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.backends.sshserver import keygen, sshd_missing, start_sshd
from tests.conftest import Cli
from tests.support.treecmp import compare_trees
from tests.support.treegen import make_tree

pytestmark = pytest.mark.skipif(
    sshd_missing() is not None or shutil.which("ssh") is None,
    reason=f"needs OpenSSH's sshd and ssh ({sshd_missing() or 'ssh client missing'})",
)


def test_forced_command_append_only(cli: Cli, tmp_path: Path) -> None:
    work = tmp_path / "sshd"
    work.mkdir()
    server = start_sshd(work)
    try:
        served = tmp_path / "srv"
        served.mkdir()
        pub = keygen(work / "backup_key", "laptop")
        # the authorized_keys line of README.md, with this machine's paths
        command = f"{sys.executable} -m safehold serve --restrict-to-path {served} --append-only"
        (work / "authorized_keys").write_text(f'command="{command}",restrict {pub}\n')
        cli.env["SAFEHOLD_RSH"] = (
            f"ssh -i {work / 'backup_key'} -o IdentitiesOnly=yes -o BatchMode=yes "
            f"-o UserKnownHostsFile={server.known_hosts} -o StrictHostKeyChecking=yes"
        )
        base = f"ssh://{server.user}@127.0.0.1:{server.port}"
        cli.repo = f"{base}/~/laptop"  # type: ignore[assignment]
        src = tmp_path / "src"
        make_tree(src, 2 << 20, seed=5)
        cli.ok("init")
        cli.ok("backup", str(src))
        cli.ok("backup", str(src))
        assert (served / "laptop" / "config").exists()
        cli.ok("restore", "latest", "--target", str(tmp_path / "r"))
        assert compare_trees(src, tmp_path / "r" / str(src).lstrip("/")) == []
        cli.ok("check", "--read-data")
        snaps = json.loads(cli.ok("snapshots", "--json").out)
        r = cli("forget", snaps[0]["id"])
        assert r.code == 2 and "append-only" in r.err
        assert len(json.loads(cli.ok("snapshots", "--json").out)) == 2
        # the key cannot reach anything outside the served path, whatever the client asks
        for outside in ("/etc", "/~/../outside", str(tmp_path)):
            cli.repo = f"{base}{outside}"  # type: ignore[assignment]
            r = cli("init")
            assert r.code == 2 and "outside" in r.err, (outside, r.err)
        assert not (tmp_path / "outside").exists()
    finally:
        server.stop()
