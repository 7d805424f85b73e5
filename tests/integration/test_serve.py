"""safehold serve: the raw protocol cannot leave --restrict-to-path, and with --append-only can
create only data/, index/, snapshots/ and locks/ objects and overwrite or delete only locks/
(every kind of name x every operation); and ssh:// repositories end to end (through a local
stand-in for ssh; the real sshd with the documented forced command is in test_serve_sshd.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import pytest

from safehold.backends.local import LocalBackend
from safehold.backends.remote import Server, read_message, write_message
from tests.conftest import Cli
from tests.support.treecmp import compare_trees
from tests.support.treegen import make_tree

FAKE_RSH = Path(__file__).resolve().parent.parent / "support" / "fake_rsh.py"


class Raw:
    """A client speaking the protocol directly, as a hostile client could, to a
    ``safehold serve --restrict-to-path ROOT [--append-only]`` process, or (``in_process``,
    for the large parametrized matrix: no interpreter start per case) to the same
    :class:`Server` that command runs, serving the same bytes over a pair of OS pipes."""

    def __init__(self, root: Path, append_only: bool, *, in_process: bool = False) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.thread: threading.Thread | None = None
        self.failure: BaseException | None = None
        self.requests: IO[bytes]
        self.responses: IO[bytes]
        if in_process:
            r, w = os.pipe()
            to_server, self.requests = os.fdopen(r, "rb"), os.fdopen(w, "wb")
            r, w = os.pipe()
            self.responses, from_server = os.fdopen(r, "rb"), os.fdopen(w, "wb")
            server = Server(str(root), append_only=append_only)

            def run() -> None:
                try:
                    with to_server, from_server:
                        server.serve(to_server, from_server)
                except BaseException as e:  # reported by close()
                    self.failure = e

            self.thread = threading.Thread(target=run, daemon=True)
            self.thread.start()
            return
        args = [sys.executable, "-m", "safehold", "serve", "--restrict-to-path", str(root)]
        if append_only:
            args.append("--append-only")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.requests, self.responses = self.proc.stdin, self.proc.stdout

    def __call__(self, **req: Any) -> dict[str, Any]:
        write_message(self.requests, req)
        resp = read_message(self.responses)
        assert resp is not None
        return resp

    def close(self) -> None:
        self.requests.close()
        if self.proc is not None:
            assert self.proc.wait(timeout=10) == 0
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.responses.close()
            assert not self.thread.is_alive() and self.failure is None, self.failure


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


def _id(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


# One name of every kind a client could send: the names of docs/format.md §1, and names outside
# them (an unknown prefix; well-known prefixes with a malformed id or layout).
KINDS: dict[str, str] = {
    "config": "config",
    "keys": f"keys/{_id('k')}",
    "plans": f"plans/{_id('p')}",
    "data": f"data/{_id('d')[:2]}/{_id('d')}",
    "index": f"index/{_id('i')}",
    "snapshots": f"snapshots/{_id('s')}",
    "locks": f"locks/{_id('l')}",
    "unknown prefix": f"other/{_id('o')}",
    "top-level id": _id("t"),
    "data without fan-out": f"data/{_id('d2')}",
    "data with wrong fan-out": f"data/{'ff' if _id('d3')[:2] != 'ff' else 'ee'}/{_id('d3')}",
    "index, upper-case id": f"index/{_id('i2').upper()}",
    "snapshots, short id": f"snapshots/{_id('s2')[:63]}",
    "locks, not an id": "locks/mine",
    "locks, nested": f"locks/{_id('l2')[:2]}/{_id('l2')}",
}
# What --append-only allows: new objects of the four kinds a backup writes, and lock objects'
# whole life (their first store is an overwrite store, see repository/locks.py).
APPEND_ONLY_ALLOWS: dict[str, set[str]] = {
    "store": {"data", "index", "snapshots", "locks"},
    "overwrite": {"locks"},
    "overwrite absent": {"locks"},
    "delete": {"locks"},
}
OPS = list(APPEND_ONLY_ALLOWS)


def _disk(root: Path) -> tuple[dict[str, str], set[str]]:
    """Every file (relative name -> SHA-256 of its content) and every folder under ``root``."""
    files: dict[str, str] = {}
    dirs: set[str] = set()
    for here, subdirs, names in os.walk(root):
        rel = Path(here).relative_to(root)
        dirs.update(str(rel / d) for d in subdirs)
        for n in names:
            files[str(rel / n)] = hashlib.sha256((Path(here) / n).read_bytes()).hexdigest()
    return files, dirs


def _populated_repo(root: Path, absent: str | None = None) -> Path:
    """``root/repo`` holding an object under every name of KINDS but ``absent``, written
    directly (the owner's side), not through the server."""
    repo = root / "repo"
    backend = LocalBackend(repo)
    backend.create()
    for name in KINDS.values():
        if name != absent:
            backend.store(name, f"old {name}".encode())
    return repo


@pytest.mark.parametrize("append_only", [True, False], ids=["append-only", "plain"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_raw_protocol_every_kind_and_operation(
    tmp_path: Path, kind: str, op: str, append_only: bool
) -> None:
    """A hostile client's store, overwrite or delete of one name: with --append-only exactly
    APPEND_ONLY_ALLOWS succeeds and nothing else on disk changes; without, everything does."""
    root = tmp_path / "root"
    root.mkdir()
    name = KINDS[kind]
    absent = op in ("store", "overwrite absent")
    repo = _populated_repo(root, absent=name if absent else None)
    files, dirs = _disk(repo)
    raw = Raw(root, append_only=append_only, in_process=True)
    assert raw(op="hello", v=1, path="repo")["append_only"] is append_only
    new = f"new {name}".encode()
    if op == "delete":
        r = raw(op="delete", name=name)
    else:
        r = raw(op="store", name=name, data=new, overwrite=op != "store")
    raw.close()

    allowed = not append_only or kind in APPEND_ONLY_ALLOWS[op]
    if allowed:
        assert r == {"ok": True}, r
        if op == "delete":
            del files[name]
        else:
            files[name] = hashlib.sha256(new).hexdigest()
            dirs.update(str(p) for p in Path(name).parents if str(p) != ".")
    else:
        assert r["error"] == "PermanentError", r
        message = r["message"]
        assert "append-only" in message and name in message and "\n" not in message, r
    assert _disk(repo) == (files, dirs)


def test_raw_protocol_append_only_reads_everything(tmp_path: Path) -> None:
    """list, load and stat work on every name; create is refused, for a new repository and for
    an existing one, and makes nothing."""
    root = tmp_path / "root"
    root.mkdir()
    repo = _populated_repo(root)
    before = _disk(repo)
    raw = Raw(root, append_only=True)
    assert raw(op="hello", v=1, path="repo")["ok"]
    listed = {n: size for n, size in raw(op="list", prefix="")["items"]}
    assert listed == {n: len(f"old {n}") for n in KINDS.values()}
    for name in KINDS.values():
        assert raw(op="load", name=name)["data"] == f"old {name}".encode()
        assert raw(op="load", name=name, offset=1, length=2)["data"] == f"old {name}"[1:3].encode()
        assert raw(op="stat", name=name)["size"] == len(f"old {name}")
    r = raw(op="create")
    assert r["error"] == "PermanentError" and "append-only" in r["message"], r
    raw.close()
    assert _disk(repo) == before
    raw = Raw(root, append_only=True)
    assert raw(op="hello", v=1, path="new")["ok"]
    r = raw(op="create")
    assert r["error"] == "PermanentError" and "append-only" in r["message"], r
    assert "new" in r["message"]
    raw.close()
    assert not (root / "new").exists()
    raw = Raw(root, append_only=False)
    assert raw(op="hello", v=1, path="new")["ok"]
    assert raw(op="create")["ok"]  # without --append-only, as before
    raw.close()
    assert (root / "new").is_dir()


def test_raw_protocol_append_only(tmp_path: Path) -> None:
    """The life of allowed names: create-if-absent for data, a lock stored, refreshed and
    released; malformed names are refused as such."""
    root = tmp_path / "root"
    (root / "repo").mkdir(parents=True)
    raw = Raw(root, append_only=True)
    assert raw(op="hello", v=1, path="repo")["append_only"] is True
    pack = KINDS["data"]
    assert raw(op="store", name=pack, data=b"first")["ok"]
    r = raw(op="delete", name=pack)
    assert r["error"] == "PermanentError" and "append-only" in r["message"]
    r = raw(op="store", name=pack, data=b"other", overwrite=True)
    assert r["error"] == "PermanentError" and "append-only" in r["message"]
    assert raw(op="store", name=pack, data=b"other")["error"] == "AlreadyExists"
    assert raw(op="store", name=pack, data=b"first")["ok"]  # same content: fine
    # lock objects are the exception: overwritten while they live, deleted when released
    lock = KINDS["locks"]
    assert raw(op="store", name=lock, data=b"1", overwrite=True)["ok"]
    assert raw(op="store", name=lock, data=b"2", overwrite=True)["ok"]
    assert raw(op="load", name=lock)["data"] == b"2"
    assert raw(op="delete", name=lock)["ok"]
    assert raw(op="delete", name=lock)["error"] == "NotFound"
    for bad in ("../x", "/etc/passwd", f"data/../{pack}", "", f"index/.tmp-{_id('x')}"):
        r = raw(op="store", name=bad, data=b"x")
        assert r["error"] == "PermanentError" and "append-only" not in r["message"], (bad, r)
    assert raw(op="store", name=7, data=b"x")["error"] == "PermanentError"
    assert raw(op="load", name=pack)["data"] == b"first"
    raw.close()
    files, _ = _disk(root / "repo")
    assert list(files) == [pack]


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
    ssh_cli.ok("init")  # the owner, without --append-only
    (src / "f").write_bytes(os.urandom(300_000))
    ssh_cli.ok("backup", str(src))
    old = json.loads(ssh_cli.ok("snapshots", "--json").out)[0]["id"]
    (src / "f").write_bytes(os.urandom(300_000))
    ssh_cli.ok("backup", str(src))
    ssh_cli.ok("forget", old)  # its data is left for a prune
    ssh_cli.env["FAKE_RSH_APPEND_ONLY"] = "1"
    (src / "f").write_bytes(os.urandom(300_000))
    ssh_cli.ok("backup", str(src))  # backups work: they only add
    first = json.loads(ssh_cli.ok("snapshots", "--json").out)[0]["id"]
    r = ssh_cli("forget", first)
    assert r.code == 2 and "append-only" in r.err and len(r.err.strip().splitlines()) == 1
    assert len(json.loads(ssh_cli.ok("snapshots", "--json").out)) == 2
    # prune has a pack to condemn but cannot store its plan object
    r = ssh_cli("prune")
    assert r.code == 2 and "append-only" in r.err and len(r.err.strip().splitlines()) == 1
    assert "plans/" in r.err and not (tmp_path / "server" / "repo" / "plans").exists()
    ssh_cli.ok("check", "--read-data")
    # nor can a new repository be made
    ssh_cli.repo = "ssh://backup@server.invalid/~/new"  # type: ignore[assignment]
    r = ssh_cli("init")
    assert r.code == 2 and "append-only" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "server" / "new").exists()


def test_unreachable_server_is_one_line(cli: Cli) -> None:
    cli.env["SAFEHOLD_RSH"] = "false"  # the ssh command fails at once, as a refused login does
    cli.repo = "ssh://nobody@127.0.0.1:1/repo"  # type: ignore[assignment]
    r = cli("snapshots")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
