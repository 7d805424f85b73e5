"""safehold serve: the raw protocol cannot delete, overwrite or leave --restrict-to-path; and
ssh:// repositories end to end (through a local stand-in for ssh; the real sshd with the
documented forced command is tested in test_serve_sshd.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from safehold.backends.remote import read_message, write_message
from tests.conftest import Cli
from tests.support.treecmp import compare_trees
from tests.support.treegen import make_tree

FAKE_RSH = Path(__file__).resolve().parent.parent / "support" / "fake_rsh.py"


class Raw:
    """A client speaking the protocol directly, as a hostile client could."""

    def __init__(self, root: Path, append_only: bool) -> None:
        args = [sys.executable, "-m", "safehold", "serve", "--restrict-to-path", str(root)]
        if append_only:
            args.append("--append-only")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def __call__(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        write_message(self.proc.stdin, req)
        resp = read_message(self.proc.stdout)
        assert resp is not None
        return resp

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0


def test_raw_protocol_cannot_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "sneaky")
    for path in ("../outside", str(tmp_path / "outside"), "/etc", "sneaky", "a/../../outside"):
        raw = Raw(root, append_only=False)
        r = raw(op="hello", v=1, path=path)
        assert r.get("error") == "PermanentError" and "outside" in r["message"], (path, r)
        raw.close()
    raw = Raw(root, append_only=False)
    assert raw(op="list", prefix="")["error"] == "PermanentError"  # no hello yet
    assert raw(op="hello", v=1, path="repo")["ok"]
    for bad in ("../x", "/etc/passwd", "data/../../x"):
        assert raw(op="store", name=bad, data=b"x").get("error"), bad
    raw.close()
    assert not any((tmp_path / "outside").iterdir())


def test_raw_protocol_append_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    raw = Raw(root, append_only=True)
    assert raw(op="hello", v=1, path="repo")["append_only"] is True
    assert raw(op="create")["ok"]
    assert raw(op="store", name="data/aa/x", data=b"first")["ok"]
    r = raw(op="delete", name="data/aa/x")
    assert r["error"] == "PermanentError" and "append-only" in r["message"]
    r = raw(op="store", name="data/aa/x", data=b"other", overwrite=True)
    assert r["error"] == "PermanentError" and "append-only" in r["message"]
    assert raw(op="store", name="data/aa/x", data=b"other")["error"] == "AlreadyExists"
    assert raw(op="store", name="data/aa/x", data=b"first")["ok"]  # same content: fine
    for name in ("snapshots/s", "index/i", "keys/k", "config"):
        assert raw(op="store", name=name, data=b"v")["ok"]
        assert "append-only" in raw(op="delete", name=name)["message"]
    # lock objects are the exception: overwritten while they live, deleted when released
    assert raw(op="store", name="locks/l", data=b"1")["ok"]
    assert raw(op="store", name="locks/l", data=b"2", overwrite=True)["ok"]
    assert raw(op="delete", name="locks/l")["ok"]
    assert raw(op="load", name="data/aa/x")["data"] == b"first"
    raw.close()


@pytest.fixture
def ssh_cli(cli: Cli, tmp_path: Path) -> Cli:
    root = tmp_path / "server"
    root.mkdir()
    cli.env |= {"SAFEHOLD_RSH": f"{sys.executable} {FAKE_RSH}", "FAKE_RSH_ROOT": str(root)}
    cli.repo = "ssh://backup@server.invalid/~/repo"  # type: ignore[assignment]
    return cli


def test_ssh_repository_end_to_end(ssh_cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, 3 << 20, seed=11)
    ssh_cli.ok("init", "--pack-size", "1M")
    ssh_cli.ok("backup", str(src))
    ssh_cli.ok("restore", "latest", "--target", str(tmp_path / "r"))
    assert compare_trees(src, tmp_path / "r" / str(src).lstrip("/")) == []
    ssh_cli.ok("check", "--read-data")
    assert (tmp_path / "server" / "repo" / "config").exists()


def test_ssh_append_only_keeps_history(ssh_cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    ssh_cli.ok("init")
    (src / "f").write_bytes(os.urandom(300_000))
    ssh_cli.ok("backup", str(src))
    ssh_cli.env["FAKE_RSH_APPEND_ONLY"] = "1"
    (src / "f").write_bytes(os.urandom(300_000))
    ssh_cli.ok("backup", str(src))  # backups work: they only add
    first = json.loads(ssh_cli.ok("snapshots", "--json").out)[0]["id"]
    r = ssh_cli("forget", first)
    assert r.code == 2 and "append-only" in r.err and len(r.err.strip().splitlines()) == 1
    assert len(json.loads(ssh_cli.ok("snapshots", "--json").out)) == 2
    ssh_cli.ok("check", "--read-data")


def test_unreachable_server_is_one_line(cli: Cli) -> None:
    cli.env["SAFEHOLD_RSH"] = "false"  # the ssh command fails at once, as a refused login does
    cli.repo = "ssh://nobody@127.0.0.1:1/repo"  # type: ignore[assignment]
    r = cli("snapshots")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
