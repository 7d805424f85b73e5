"""stdin_command: a shell command's standard output backed up as one file; the backup fails
(no snapshot) when the command fails, and a stop terminates the command."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from safehold.errors import Interrupted, SafeholdError
from safehold.events import Event
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.restore import iter_files
from safehold.repository.repo import Repository
from tests.conftest import Cli

GEN = """\
import random, sys
r = random.Random(1234)
out = sys.stdout.buffer
for _ in range(20):
    out.write(r.randbytes(1 << 20))
sys.stderr.write("dumped 20 MiB\\n")
"""


def _expected() -> str:
    import random

    r = random.Random(1234)
    h = hashlib.sha256()
    for _ in range(20):
        h.update(r.randbytes(1 << 20))
    return h.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers: look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_cli_backs_up_command_output_identically(cli: Cli, tmp_path: Path) -> None:
    gen = tmp_path / "gen.py"
    gen.write_text(GEN)
    cli.ok("init")
    r = cli.ok(
        "backup",
        "--stdin-from-command",
        f"{sys.executable} {gen}",
        "--stdin-filename",
        "db.dump",
    )
    assert "dumped 20 MiB" in r.err  # the command's standard error is shown
    proc = subprocess.run(
        [sys.executable, "-m", "safehold", "--repo", str(cli.repo), "dump", "latest", "db.dump"],
        env=cli.env,
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) == 20 << 20
    assert hashlib.sha256(proc.stdout).hexdigest() == _expected()
    snaps = json.loads(cli.ok("snapshots", "--json").out)
    assert len(snaps) == 1 and snaps[0]["paths"] == ["/db.dump"]


def test_default_name_is_stdin(repo: Repository) -> None:
    res = backup(repo, BackupOptions(stdin_command="printf hello"))
    assert res.snapshot is not None
    files = dict(iter_files(repo, res.snapshot.tree))
    assert set(files) == {"/stdin"} and files["/stdin"].size == 5


def test_failing_command_leaves_no_snapshot(cli: Cli) -> None:
    cli.ok("init")
    r = cli(
        "backup",
        "--stdin-from-command",
        "head -c 3000000 /dev/urandom; echo 'pg_dump: connection refused' >&2; exit 3",
        "--stdin-filename",
        "db.sql",
    )
    assert r.code == 2, r
    errors = [line for line in r.err.splitlines() if line.startswith("safehold:")]
    assert len(errors) == 1, r.err
    assert "exited with status 3" in errors[0] and "connection refused" in errors[0]
    assert "Traceback" not in r.err
    assert json.loads(cli.ok("snapshots", "--json").out) == []
    # what was uploaded is indexed and reused: the next run stores no data again
    assert cli.ok("check").code == 0


def test_failing_command_library(repo: Repository) -> None:
    events: list[Event] = []
    with pytest.raises(SafeholdError) as e:
        backup(
            repo,
            BackupOptions(stdin_command="echo partial; echo bad >&2; exit 1"),
            events=events.append,
        )
    assert (
        str(e.value) == "the command 'echo partial; echo bad >&2; exit 1' exited with status 1: bad"
    )
    assert repo.snapshots() == []
    err = [ev for ev in events if ev.data.get("stderr") is not None]
    assert err and err[0].data["stderr"] == "bad\n"


def test_command_not_found(cli: Cli) -> None:
    cli.ok("init")
    r = cli("backup", "--stdin-from-command", "no-such-command-safehold-test")
    assert r.code == 2
    assert "exited with status 127" in r.err and "not found" in r.err, r.err
    assert json.loads(cli.ok("snapshots", "--json").out) == []


def test_killed_command(repo: Repository) -> None:
    with pytest.raises(SafeholdError, match="killed by signal SIGKILL"):
        backup(repo, BackupOptions(stdin_command="echo some; kill -KILL $$"))
    assert repo.snapshots() == []


def test_stop_terminates_the_command(repo: Repository, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    # the shell forks: the grandchild (sleep) must be stopped too, or the pipe stays open
    cmd = f"sleep 100 & echo $! > {pidfile}; wait"
    stop = threading.Event()
    out: list[BaseException] = []

    def run() -> None:
        try:
            backup(repo, BackupOptions(stdin_command=cmd), stop=stop)
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    assert _alive(pid)
    t0 = time.monotonic()
    stop.set()
    t.join(15)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 8
    assert out and isinstance(out[0], Interrupted), out
    assert not _alive(pid)
    assert repo.snapshots() == []


def test_stop_kills_a_command_that_ignores_sigterm(repo: Repository) -> None:
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        backup(
            repo, BackupOptions(stdin_command="trap '' TERM; while :; do sleep 1; done"), stop=stop
        )
    assert time.monotonic() - t0 < 10


def test_sigterm_to_the_cli(cli: Cli) -> None:
    cli.ok("init")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "safehold", "--repo", str(cli.repo)),
            *("backup", "--stdin-from-command", "echo start; sleep 100"),
        ],
        env=cli.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 130, err
    assert json.loads(cli.ok("snapshots", "--json").out) == []


def test_stderr_is_bounded(repo: Repository) -> None:
    events: list[Event] = []
    cmd = "i=0; while [ $i -lt 3000 ]; do printf '%070d\\n' $i >&2; i=$((i+1)); done; echo out"
    res = backup(repo, BackupOptions(stdin_command=cmd), events=events.append)
    assert res.snapshot is not None
    err = [ev.data["stderr"] for ev in events if ev.data.get("stderr") is not None]
    assert len(err) == 1
    assert len(err[0]) <= 64 * 1024
    assert err[0].endswith(f"{2999:070d}\n")
    assert res.warnings == []  # stderr output alone is no warning


def test_usage_errors(cli: Cli, tmp_path: Path) -> None:
    cli.ok("init")
    r = cli("backup", "--stdin-from-command", "true", str(tmp_path))
    assert r.code == 2 and "takes no paths" in r.err
    r = cli("backup", "--stdin-from-command", "true", "--stdin")
    assert r.code == 2 and "--stdin" in r.err
    r = cli("backup", "--stdin-from-command", "true", "--stdin-filename", "a/b")
    assert r.code == 2 and "plain file name" in r.err
