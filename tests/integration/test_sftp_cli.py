"""The command line end to end on an SFTP repository: a real OpenSSH sshd (tests/backends)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import Cli, Result
from tests.support.checks import stderr_line as _one_line
from tests.support.treecmp import compare_trees

if TYPE_CHECKING:
    from tests.backends.sshserver import SSHServer

# sshd, dead_port
pytest_plugins = ["tests.backends.sshserver"]
pytestmark = pytest.mark.sftp


class SFTPCli:
    """``safehold --repo sftp://USER@127.0.0.1:PORT/PATH -o sftp.key-file=… …`` in a subprocess."""

    def __init__(self, cli: Cli, url: str, options: dict[str, str]) -> None:
        self.cli = cli
        self.url = url
        self.options = options
        cli.env.pop("SSH_AUTH_SOCK", None)  # nothing of the developer's agent

    def args(self) -> list[str]:
        args = ["--repo", self.url]
        for key, value in self.options.items():
            args += ["-o", f"{key}={value}"]
        return args

    def __call__(self, *args: str, **kw: Any) -> Result:
        return self.cli(*self.args(), *args, repo=False, **kw)

    def ok(self, *args: str, **kw: Any) -> Result:
        r = self(*args, **kw)
        assert r.code == 0, str(r)
        return r


def test_init_backup_restore_check(
    cli: Cli, sshd: SSHServer, small_tree: Path, tmp_path: Path
) -> None:
    root = sshd.new_dir()
    s = SFTPCli(cli, sshd.url(root), sshd.options())
    r = s.ok("init", "--chunk-avg", "64K", "--pack-size", "1M")
    assert f"at {sshd.url(root)}" in r.out
    assert s("init").code == 2  # refuses a location that holds one
    summary = json.loads(s.ok("backup", "--json", str(small_tree)).out.splitlines()[-1])
    assert summary["type"] == "summary" and summary["files_new"] > 10
    tops = {p.name for p in root.iterdir()}
    assert {"config", "keys", "data", "index", "snapshots"} <= tops
    assert not [p for p in root.rglob(".tmp-*")]
    snaps = json.loads(s.ok("snapshots", "--json").out)
    assert [x["id"] for x in snaps] == [summary["snapshot"]]
    s.ok("restore", "latest", "--target", str(tmp_path / "r"))
    assert compare_trees(small_tree, tmp_path / "r" / str(small_tree).lstrip("/")) == []
    r = s("check", "--read-data")
    assert r.code == 0, str(r)
    assert "no errors" in r.out


def test_relative_path_and_ssh_config(cli: Cli, sshd: SSHServer, small_tree: Path) -> None:
    """``/~/path`` under the login folder, with host, port, user and key from ~/.ssh/config."""
    ssh = Path(cli.env["HOME"]) / ".ssh"
    ssh.mkdir()
    (ssh / "config").write_text(
        f"Host backupbox\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n"
        f"  IdentityFile {sshd.client_key}\n"
    )
    (ssh / "known_hosts").write_text(sshd.known_hosts.read_text())
    rel = f"cli-{time.monotonic_ns()}"
    s = SFTPCli(cli, f"sftp://backupbox/~/{rel}", {})
    s.ok("init")
    s.ok("backup", str(small_tree))
    assert (sshd.home / rel / "config").is_file()
    s.ok("check")


def test_bad_locations_are_one_line_errors(
    cli: Cli, sshd: SSHServer, tmp_path: Path, dead_port: int
) -> None:
    root = sshd.new_dir()
    good = sshd.options()

    # nothing listening: retried, then one line
    port = dead_port
    unreachable = SFTPCli(cli, f"sftp://{sshd.user}@127.0.0.1:{port}{root}", good)
    started = time.monotonic()
    r = unreachable("init")
    assert r.code == 2, str(r)
    line = _one_line(r.err)
    assert "failed after 6 attempts" in line, line
    assert f"cannot reach 127.0.0.1:{port}: Connection refused" in line, line
    assert time.monotonic() - started < 30

    # a key the server does not accept
    wrong_key = SFTPCli(cli, sshd.url(root), good | {"sftp.key-file": str(sshd.other_key)})
    r = wrong_key("init")
    assert r.code == 2, str(r)
    assert _one_line(r.err).startswith(
        f"safehold: authentication failed for {sshd.user}@127.0.0.1:{sshd.port}: "
    )

    # a server whose host key is not known
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    unknown = SFTPCli(cli, sshd.url(root), good | {"sftp.known-hosts": str(empty)})
    for cmd in (["init"], ["snapshots"]):
        r = unknown(*cmd)
        assert r.code == 2, str(r)
        line = _one_line(r.err)
        assert line.startswith(f"safehold: host key of [127.0.0.1]:{sshd.port} is not known")
        assert sshd.fingerprint() in line
        assert "ssh-keyscan" in line
    assert empty.read_text() == ""
    assert not root.exists()  # nothing was written anywhere

    # an unknown option, and no repository there
    s = SFTPCli(cli, sshd.url(root), good)
    r = s("-o", "sftp.keyfile=x", "snapshots")
    assert r.code == 2 and "unknown option 'sftp.keyfile'" in _one_line(r.err)
    r = s("snapshots")
    assert r.code == 2 and "there is no repository at sftp://" in _one_line(r.err)
