"""Issue 8, locks: a foreign lock, exclusive or not, never blocks a command that only reads; a
reader still leaves a lock that prune waits for; ``unlock --force ID`` removes one named lock
after confirmation, and plain ``unlock`` keeps removing only stale locks."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

from safehold.ops.backup import BackupOptions, backup
from safehold.ops.forget import ForgetOptions, forget, plan_forget
from safehold.ops.prune import PruneOptions, prune
from safehold.repository.locks import list_locks, reader_lock
from safehold.repository.repo import Repository
from tests.conftest import Cli
from tests.support.checks import stderr_line

LIVE = "cd" * 32  # an exclusive lock of another host with an honest lease: not stale
YEAR_3000 = "ef" * 32  # a lease ending in the year 3000: garbage, stale at once
SHARED = "ab" * 32  # a shared lock of another host, not stale


def _plant(repo_dir: Path, lock_id: str, *, expires: float, exclusive: bool) -> Path:
    lock = {
        "v": 1,
        "host": "other-" + socket.gethostname(),
        "pid": 4242,
        "user": "someone",
        "time": time.time(),
        "refreshed": time.time(),
        "expires": expires,
        "exclusive": exclusive,
    }
    (repo_dir / "locks").mkdir(exist_ok=True)
    path = repo_dir / "locks" / lock_id
    path.write_text(json.dumps(lock))
    return path


def _backed_up(cli: Cli, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "a.txt").write_text("alpha " * 1000)
    (src / "b.bin").write_bytes(os.urandom(50_000))
    cli.ok("init")
    cli.ok("backup", str(src))
    (src / "c.txt").write_text("new")
    cli.ok("backup", str(src))
    return src


def _locks(cli: Cli) -> set[str]:
    return {p.name for p in (cli.repo / "locks").iterdir()}


def test_reading_commands_ignore_foreign_locks(cli: Cli, tmp_path: Path) -> None:
    src = _backed_up(cli, tmp_path)
    _plant(cli.repo, LIVE, expires=time.time() + 280, exclusive=True)
    _plant(cli.repo, YEAR_3000, expires=32503680000.0, exclusive=True)
    snaps = [s["id"] for s in json.loads(cli.ok("snapshots", "--json").out)]
    assert len(snaps) == 2
    assert f"{src}/d/a.txt" in cli.ok("ls", "latest").out
    assert "a.txt" in cli.ok("find", "*.txt").out
    cli.ok("diff", snaps[0], snaps[1])
    assert cli.ok("dump", "latest", f"{src}/d/a.txt").out == (src / "d" / "a.txt").read_text()
    cli.ok("stats")
    cli.ok("stats", "latest")
    r = cli.ok("check")  # took a shared lock, which an exclusive lock refused (exit 5)
    assert "no errors were found" in r.out
    cli.ok("check", "--read-data")
    cli.ok("check", "--read-data-subset", "1/2")
    assert _locks(cli) == {LIVE, YEAR_3000}  # check removed its own lock, and only it
    # writers and maintenance still respect the exclusive lock
    r = cli("backup", str(src))
    assert r.code == 5 and "locked" in stderr_line(r.err)
    r = cli("prune")
    assert r.code == 5 and "locked" in stderr_line(r.err)


def test_restore_ignores_a_foreign_exclusive_lock(cli: Cli, tmp_path: Path) -> None:
    src = _backed_up(cli, tmp_path)
    _plant(cli.repo, LIVE, expires=time.time() + 280, exclusive=True)
    target = tmp_path / "r"
    cli.ok("restore", "latest", "--target", str(target))
    got = target / str(src).lstrip("/") / "d" / "a.txt"
    assert got.read_text() == (src / "d" / "a.txt").read_text()


def test_a_reader_lock_is_never_refused_and_prune_waits_for_it(
    repo: Repository, tmp_path: Path
) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(300_000))
    old = backup(repo, BackupOptions(paths=[str(src)])).snapshot
    assert old is not None
    _plant(Path(repo.backend.location), LIVE, expires=time.time() + 280, exclusive=True)
    reader = reader_lock(repo.backend)  # an exclusive lock refuses every other lock ...
    assert reader is not None  # ... but not a reader's
    try:
        assert {lk.lock_id for lk in list_locks(repo.backend)} == {LIVE, reader.lock_id}
        (Path(repo.backend.location) / "locks" / LIVE).unlink()
        forget(repo, plan_forget(repo, ForgetOptions(snapshots=[old.id])))
        _, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=0))
        # the reader may be reading the condemned packs: the plan waits for its lock
        assert res.plan_id is not None and res.deleted_packs == 0 and res.plans_waiting == 1
    finally:
        reader.release()
    assert [lk.lock_id for lk in list_locks(repo.backend)] == []
    _, res = prune(repo, PruneOptions(max_unused=0.0, grace_s=0))
    assert res.deleted_packs >= 1 and res.plans_waiting == 0


def test_plain_unlock_removes_only_stale_locks(cli: Cli, tmp_path: Path) -> None:
    cli.ok("init")
    _plant(cli.repo, LIVE, expires=time.time() + 280, exclusive=True)
    _plant(cli.repo, YEAR_3000, expires=32503680000.0, exclusive=True)
    _plant(cli.repo, "12" * 32, expires=time.time() - 5, exclusive=False)  # expired
    r = cli.ok("unlock")
    assert "removed 2 stale locks" in r.out
    assert LIVE[:8] in r.out and "unlock --force" in r.out  # the lock left, and how to remove it
    assert _locks(cli) == {LIVE}


def test_unlock_force_needs_confirmation(cli: Cli, tmp_path: Path) -> None:
    cli.ok("init")
    _plant(cli.repo, LIVE, expires=time.time() + 280, exclusive=True)
    _plant(cli.repo, SHARED, expires=time.time() + 280, exclusive=False)
    # no terminal to ask on, and no --yes: refused, nothing removed
    r = cli("unlock", "--force", LIVE[:8], input=b"y\n")
    assert r.code == 2 and "--yes" in stderr_line(r.err)
    assert _locks(cli) == {LIVE, SHARED}
    # a prefix that names no lock, or more than one, or is not an id
    _plant(cli.repo, "cdef" + "00" * 30, expires=time.time() + 280, exclusive=False)
    for prefix, why in (("99", "no lock"), ("cd", "more than one"), ("xyz", "not a lock id")):
        r = cli("unlock", "--force", prefix, "--yes")
        assert r.code == 2 and why in stderr_line(r.err), (prefix, str(r))
    assert len(_locks(cli)) == 3
    r = cli("unlock", "--yes")
    assert r.code == 2 and "--force" in stderr_line(r.err)
    # --yes: exactly the named lock goes, whoever holds it
    r = cli.ok("unlock", "--force", LIVE[:8], "--yes")
    assert f"removed lock {LIVE[:8]}" in r.out
    assert _locks(cli) == {SHARED, "cdef" + "00" * 30}
    r = cli.ok("unlock", "--json", "--force", SHARED[:10], "--yes")
    assert json.loads(r.out) == {"type": "unlock", "removed": [SHARED]}
    assert _locks(cli) == {"cdef" + "00" * 30}


def _on_terminal(cli: Cli, args: list[str], answer: bytes) -> tuple[int, str, str]:
    """Runs the CLI with a terminal as stdin and stderr; answers the prompt with ``answer``.
    Returns the exit code, stdout, and what the terminal showed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "safehold", "--repo", str(cli.repo), *args],
        env=cli.env,
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + 60
    try:
        while b"[y/N]" not in shown and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    shown += os.read(master, 4096)
                except OSError:
                    break
        assert b"[y/N]" in shown, shown
        os.write(master, answer)
        out, _ = proc.communicate(timeout=60)
        while True:
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return proc.returncode, out.decode(), shown.decode("utf-8", "replace")


def test_unlock_force_asks_on_a_terminal(cli: Cli, tmp_path: Path) -> None:
    cli.ok("init")
    _plant(cli.repo, LIVE, expires=time.time() + 280, exclusive=True)
    code, out, shown = _on_terminal(cli, ["unlock", "--force", LIVE[:8]], b"n\n")
    assert code == 1 and "kept" in out, (out, shown)
    assert "exclusive lock cdcdcdcd by someone@other-" in shown  # says what it would remove
    assert "not stale" in shown
    assert _locks(cli) == {LIVE}
    code, out, shown = _on_terminal(cli, ["unlock", "--force", LIVE[:8]], b"y\n")
    assert code == 0 and f"removed lock {LIVE[:8]}" in out, (out, shown)
    assert _locks(cli) == set()
