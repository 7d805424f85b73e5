"""What the conformance suite does not cover about RcloneBackend, against the real rclone binary.

Each test gets a temporary rclone config (``rclone_env``) whose local-type remote stores files
under the test's own folder, so what the backend did can be checked on disk. Nothing is mocked;
the tests that need rclone are skipped, with the reason, only where it is not installed.
"""

from __future__ import annotations

import base64
import http.client
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from safehold.backends import RetryingBackend, open_backend
from safehold.backends.base import ObjectInfo, clean_temporaries
from safehold.backends.rclone import MISSING_BINARY, RcloneBackend, _mod_time
from safehold.errors import AlreadyExists, NotFound, PermanentError, TransientError, UsageError
from tests.support.checks import error_line as one_line
from tests.support.checks import no_sleep
from tests.support.rclone_config import (
    RCLONE,
    REMOTE,
    RcloneEnv,
    free_port,
    write_config,
)

pytest_plugins = ["tests.backends.rclone_env"]  # rclone_env
pytestmark = pytest.mark.rclone

MiB = 1 << 20


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie nobody reaped counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.05)
    return False


def daemon_pid(backend: RcloneBackend) -> int:
    daemon = backend._daemon
    assert daemon is not None, "no rclone rcd running"
    return daemon.proc.pid


def disk_names(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --- a missing binary ----------------------------------------------------------------------------


def test_missing_binary_is_a_clear_permanent_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # named with -o rclone.binary=PATH
    b = RcloneBackend("remote:path", binary=str(tmp_path / "no-such-rclone"))
    for call in (lambda: list(b.list("")), lambda: b.stat("config"), b.create):
        with pytest.raises(PermanentError) as info:
            call()
        assert one_line(info.value) == MISSING_BINARY
    assert MISSING_BINARY == (
        "rclone not found: install it (e.g. apt-get install rclone) or set -o rclone.binary=PATH"
    )
    # looked up on PATH
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(PermanentError) as info:
        RcloneBackend("remote:path").load("config")
    assert one_line(info.value) == MISSING_BINARY
    # through open_backend: permanent, so not retried
    retries: list[str] = []
    wrapped = open_backend("rclone:remote:path")
    assert isinstance(wrapped, RetryingBackend)
    wrapped._on_retry = lambda op, name, e, attempt: retries.append(op)
    with pytest.raises(PermanentError) as info:
        wrapped.stat("config")
    assert one_line(info.value) == MISSING_BINARY
    assert retries == []
    # a file that is not executable
    not_exec = tmp_path / "rclone"
    not_exec.write_text("#!/bin/sh\n")
    not_exec.chmod(0o644)
    with pytest.raises(PermanentError) as info:
        RcloneBackend("remote:path", binary=str(not_exec)).stat("config")
    assert one_line(info.value) == f"cannot run rclone binary {not_exec}: permission denied"


def test_a_binary_that_exits_at_once_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "rclone"
    fake.write_text("#!/bin/sh\necho 'Fatal error: unknown command \"rcd\"' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(PermanentError) as info:
        RcloneBackend("remote:path", binary=str(fake)).stat("config")
    assert one_line(info.value) == (
        f'rclone rcd ({fake}) exited at start (status 3: Fatal error: unknown command "rcd")'
    )


# --- remotes and configuration -------------------------------------------------------------------


def test_unknown_remote_is_a_clear_permanent_error(rclone_env: RcloneEnv) -> None:
    b = RcloneBackend("nosuch:backups/repo")
    expected = (
        f"rclone remote 'nosuch' is not configured in {rclone_env.config} "
        "(add it with 'rclone config', or set RCLONE_CONFIG or -o rclone.config=PATH)"
    )
    calls = [
        b.create,
        lambda: list(b.list("")),
        lambda: list(b.list("data/")),
        lambda: b.stat("config"),
        lambda: b.load("config"),
        lambda: b.load("config", 5, 10),
        lambda: b.store("config", b"c"),
        lambda: b.store("locks/l", b"c", overwrite=True),
        lambda: b.delete("config"),
    ]
    try:
        for call in calls:
            with pytest.raises(PermanentError) as info:
                call()
            assert one_line(info.value) == expected
    finally:
        b.close()
    # not retried behind a RetryingBackend
    retries: list[str] = []
    wrapped = RetryingBackend(
        RcloneBackend("nosuch:x"), sleep=no_sleep, on_retry=lambda *a: retries.append(a[0])
    )
    with pytest.raises(PermanentError):
        wrapped.stat("config")
    wrapped.close()
    assert retries == []


def test_unknown_remote_names_rclones_default_config_file(
    rclone_env: RcloneEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("RCLONE_CONFIG")
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    b = RcloneBackend(f"{REMOTE}:{rclone_env.base}")  # defined only in the test's config file
    with pytest.raises(PermanentError) as info:
        b.stat("config")
    b.close()
    assert one_line(info.value) == (
        f"rclone remote {REMOTE!r} is not configured in {home}/.config/rclone/rclone.conf "
        "(add it with 'rclone config', or set RCLONE_CONFIG or -o rclone.config=PATH)"
    )


def test_rclone_config_is_honoured(
    rclone_env: RcloneEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RCLONE_CONFIG (set by the fixture) defines the local remote: objects land on disk
    b = RcloneBackend(rclone_env.remote_path("repo"))
    b.create()
    assert (rclone_env.base / "repo").is_dir()
    b.store("data/ab/x", b"hello")
    b.store("config", b"c")
    b.close()
    stored = rclone_env.base / "repo" / "data" / "ab" / "x"
    assert stored.read_bytes() == b"hello"
    assert stored.stat().st_mode & 0o777 == 0o600  # the daemon runs with umask 077
    assert disk_names(rclone_env.base / "repo") == ["config", "data/ab/x"]

    # another config with an alias of a local remote: chosen with the option ...
    aliased = tmp_path / "aliased"
    other = write_config(
        tmp_path / "other.conf",
        {"inner": {"type": "local"}, "box": {"type": "alias", "remote": f"inner:{aliased}"}},
    )
    b = RcloneBackend("box:repo", config=str(other))
    b.create()
    b.store("keys/k1", b"key")
    assert b.load("keys/k1") == b"key"
    assert list(b.list("")) == [ObjectInfo("keys/k1", 3)]
    b.close()
    assert (aliased / "repo" / "keys" / "k1").read_bytes() == b"key"
    # ... which RCLONE_CONFIG, naming the first file, does not define
    b = RcloneBackend("box:repo")
    with pytest.raises(PermanentError, match="rclone remote 'box' is not configured"):
        b.stat("keys/k1")
    b.close()
    # ... or with RCLONE_CONFIG, and through open_backend
    monkeypatch.setenv("RCLONE_CONFIG", str(other))
    wrapped = open_backend("rclone:box:repo")
    assert wrapped.location == "rclone:box:repo"
    assert wrapped.load("keys/k1") == b"key"
    wrapped.close()
    wrapped = open_backend("rclone:box:repo", {"rclone.config": str(rclone_env.config)})
    with pytest.raises(PermanentError, match="rclone remote 'box' is not configured"):
        wrapped.stat("keys/k1")
    wrapped.close()


def test_plain_paths_and_on_the_fly_remotes(rclone_env: RcloneEnv) -> None:
    for fs in (str(rclone_env.base / "plain"), f":local:{rclone_env.base}/fly"):
        b = RcloneBackend(fs)
        b.create()
        b.store("index/i", b"index")
        assert b.load("index/i", 1, 3) == b"nde"
        b.close()
    assert (rclone_env.base / "plain" / "index" / "i").read_bytes() == b"index"
    assert (rclone_env.base / "fly" / "index" / "i").read_bytes() == b"index"


def test_urls_and_options(rclone_env: RcloneEnv) -> None:
    path = rclone_env.remote_path("u")
    b = open_backend(f"rclone:{path}")
    assert isinstance(b, RetryingBackend) and isinstance(b.inner, RcloneBackend)
    assert b.location == f"rclone:{path}"
    assert b.inner.remote == REMOTE
    assert open_backend(f"rclone:{path}/").location == f"rclone:{path}"
    assert open_backend("rclone:box:").location == "rclone:box:"
    assert open_backend("rclone:/srv/repo").location == "rclone:/srv/repo"
    assert open_backend(
        f"rclone:{path}", {"rclone.binary": "/x/rclone", "rclone.config": "/x/rclone.conf"}
    ).location == (f"rclone:{path}")
    for bad, message in [
        ("rclone://box/path", "write rclone:REMOTE:PATH (no '//')"),
        ("rclone:", "names no remote; use rclone:REMOTE:PATH"),
        ("rclone:box:a]b", "must not contain ']'"),
        ("rclone:box:a\nb", "invalid rclone remote"),
    ]:
        with pytest.raises(UsageError) as info:
            open_backend(bad)
        assert message in str(info.value)
    with pytest.raises(UsageError) as info:
        open_backend(f"rclone:{path}", {"rclone.bogus": "1"})
    assert str(info.value) == (
        "unknown option 'rclone.bogus' for rclone: repositories "
        "(known: rclone.binary, rclone.config)"
    )
    # only "rclone:" is special: other words before a colon are still local paths
    assert open_backend("rclonex:y").location == os.path.abspath("rclonex:y")


# --- reading, listing, storing -------------------------------------------------------------------


def test_range_reads(rclone_env: RcloneEnv) -> None:
    b = RcloneBackend(rclone_env.remote_path("repo"))
    size = 3 * MiB + 17
    data = random.Random(3).randbytes(size)
    b.store("data/ab/pack", data)
    rng = random.Random(4)
    cases: list[tuple[int, int | None]] = [
        (0, None),
        (size - 1, None),
        (size, None),
        (size + 5, 10),
        (MiB, MiB),
        (size - 10, 100),
    ]
    for _ in range(60):
        offset = rng.randrange(size + 100)
        length = None if rng.random() < 0.2 else rng.randrange(2 * MiB)
        cases.append((offset, length))
    for offset, length in cases:
        want = data[offset:] if length is None else data[offset : offset + length]
        got = b.load("data/ab/pack", offset, length)
        assert got == want, f"load(offset={offset}, length={length})"
    with pytest.raises(NotFound):
        b.load("data/ab/none", 10, 10)
    b.close()


def test_listing_more_than_a_thousand_names_skips_foreign_files(rclone_env: RcloneEnv) -> None:
    root = rclone_env.base / "repo"
    expected: dict[str, int] = {}
    for i in range(1500):  # written on disk directly: the listing is what is tested
        name = f"data/{i % 256:02x}/{i:064x}"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"z" * (i % 11))
        expected[name] = i % 11
    (root / "data" / "0a" / ".tmp-0123456789abcdef").write_bytes(b"partial upload")
    (root / ".tmp-fedcba9876543210").write_bytes(b"partial")
    (root / "data" / "empty-folder").mkdir()
    (root / "config").write_bytes(b"cfg")
    b = RcloneBackend(rclone_env.remote_path("repo"))
    listed = list(b.list("data/"))
    assert len(listed) == 1500
    assert {i.name: i.size for i in listed} == expected
    assert {i.name: i.size for i in b.list("")} == {**expected, "config": 3}
    assert {i.name for i in b.list("data/0a/")} == {n for n in expected if n.startswith("data/0a/")}
    assert {i.name for i in b.list("data/0a/000")} == {
        n for n in expected if n.startswith("data/0a/000")
    }
    assert list(b.list("data/zz/")) == []
    assert list(b.list("snapshots/")) == []
    b.close()


def unprivileged_rclone(tmp_path: Path) -> str:
    """An rclone binary that cannot bypass file permissions (as root: without DAC capabilities)."""
    assert RCLONE is not None
    if os.geteuid() != 0:
        return RCLONE
    caps = "-dac_override,-dac_read_search"
    wrapper = tmp_path / "rclone-unprivileged"
    wrapper.write_text(
        f'#!/bin/sh\nexec setpriv --inh-caps={caps} --bounding-set={caps} {RCLONE} "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.mark.skipif(
    os.geteuid() == 0 and shutil.which("setpriv") is None,
    reason="running as root without setpriv, cannot make a folder unreadable",
)
def test_a_listing_that_misses_a_folder_raises(rclone_env: RcloneEnv, tmp_path: Path) -> None:
    root = rclone_env.base / "repo"
    for name in ("data/00/a", "data/01/b", "data/02/c"):
        (root / name).parent.mkdir(parents=True)
        (root / name).write_bytes(b"x")
    b = RcloneBackend(rclone_env.remote_path("repo"), binary=unprivileged_rclone(tmp_path))
    assert {i.name for i in b.list("data/")} == {"data/00/a", "data/01/b", "data/02/c"}
    (root / "data" / "01").chmod(0)
    try:
        for prefix in ("data/", ""):
            with pytest.raises(PermanentError) as info:
                list(b.list(prefix))
            text = one_line(info.value)
            assert text.startswith(f"cannot list rclone:{REMOTE}:{root}: incomplete listing")
            assert "permission denied" in text
        assert {i.name for i in b.list("data/02/")} == {"data/02/c"}
    finally:
        (root / "data" / "01").chmod(0o700)
        b.close()


def test_stores_leave_no_temporary_objects(rclone_env: RcloneEnv) -> None:
    b = RcloneBackend(rclone_env.remote_path("repo"))
    for i in range(20):
        b.store(f"data/{i % 3:02x}/p{i}", os.urandom(1000 + i))
    b.store("data/00/p0", (rclone_env.base / "repo" / "data/00/p0").read_bytes())  # same: ok
    with pytest.raises(AlreadyExists):
        b.store("data/00/p0", b"other")
    for i in range(3):
        b.store("locks/l", f"lock {i}".encode(), overwrite=True)
    b.close()
    names = disk_names(rclone_env.base / "repo")
    assert len(names) == 21
    assert not [n for n in names if ".tmp-" in n]
    assert (rclone_env.base / "repo" / "locks" / "l").read_bytes() == b"lock 2"


def test_store_into_a_folder_name_is_refused(rclone_env: RcloneEnv) -> None:
    b = RcloneBackend(rclone_env.remote_path("repo"))
    b.store("data/ab/x", b"x")
    with pytest.raises(PermanentError) as info:
        b.store("data/ab", b"y", overwrite=True)
    one_line(info.value)
    b.close()
    assert disk_names(rclone_env.base / "repo") == ["data/ab/x"]


# --- the daemon ----------------------------------------------------------------------------------


def test_a_daemon_started_by_a_short_lived_thread_outlives_the_thread(
    rclone_env: RcloneEnv,
) -> None:
    # PR_SET_PDEATHSIG fires when the *thread* that started the child ends: the daemons are
    # started from one long-lived thread, so this one's end must not stop the daemon
    b = RcloneBackend(rclone_env.remote_path("repo"))
    worker = threading.Thread(target=b.store, args=("config", b"c"))
    worker.start()
    worker.join()
    pid = daemon_pid(b)
    time.sleep(0.5)
    assert not gone(pid)
    assert b.load("config") == b"c"
    assert daemon_pid(b) == pid
    b.close()


def test_close_stops_the_daemon(rclone_env: RcloneEnv) -> None:
    b = RcloneBackend(rclone_env.remote_path("repo"))
    assert b._daemon is None  # started on first use
    b.store("config", b"c")
    pid = daemon_pid(b)
    assert not gone(pid)
    b.close()
    assert gone(pid)
    with pytest.raises(PermanentError, match="is closed"):
        b.load("config")
    b.close()  # harmless twice


def test_the_daemons_credentials_are_random_and_not_on_its_command_line(
    rclone_env: RcloneEnv,
) -> None:
    b = RcloneBackend(rclone_env.remote_path("repo"))
    b.store("config", b"secret config")
    daemon = b._daemon
    assert daemon is not None
    user, password = base64.b64decode(daemon._auth.split()[1]).decode().split(":", 1)
    assert len(password) >= 24
    with open(f"/proc/{daemon.proc.pid}/cmdline", "rb") as f:
        cmdline = f.read().split(b"\0")
    assert b"127.0.0.1:0" in cmdline
    assert not [a for a in cmdline if password.encode() in a or user.encode() in a]
    for path, headers in [
        ("/[" + rclone_env.remote_path("repo") + "]/config", {}),
        ("/rc/noop", {"Authorization": "Basic " + base64.b64encode(b"x:y").decode()}),
    ]:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        conn.request("GET" if path.startswith("/[") else "POST", path, headers=headers)
        resp = conn.getresponse()
        assert resp.status == 401
        assert b"secret" not in resp.read()
        conn.close()
    other = RcloneBackend(rclone_env.remote_path("repo"))
    other.stat("config")
    assert other._daemon is not None and other._daemon._auth != daemon._auth
    other.close()
    b.close()


def test_a_killed_daemon_is_replaced(rclone_env: RcloneEnv) -> None:
    raw = RcloneBackend(rclone_env.remote_path("repo"))
    raw.store("config", b"c")
    first = daemon_pid(raw)
    os.kill(first, signal.SIGKILL)
    assert raw._daemon is not None
    raw._daemon.proc.wait(10)  # gone for good (its threads too), not just dying
    with pytest.raises(TransientError) as info:
        raw.load("config")
    assert "rclone rcd stopped (status -9" in one_line(info.value)
    assert raw.load("config") == b"c"  # a new daemon
    assert daemon_pid(raw) != first
    # behind a RetryingBackend nobody notices
    os.kill(daemon_pid(raw), signal.SIGKILL)
    wrapped = RetryingBackend(raw, sleep=no_sleep)
    assert wrapped.load("config") == b"c"
    wrapped.close()


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from safehold.backends.rclone import RcloneBackend
    b = RcloneBackend(sys.argv[1])
    b.store("config", b"c")
    print(b._daemon.proc.pid, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    # "exit": leave without close(); the atexit handler stops the daemon
    """
)


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_the_daemon_does_not_outlive_its_process(rclone_env: RcloneEnv, how: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, rclone_env.remote_path("repo"), how],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == (-signal.SIGKILL if how == "kill" else 0), proc.stderr.decode()
    pid = int(proc.stdout.split()[0])
    assert wait_gone(pid), f"rclone rcd {pid} outlived its parent ({how})"


def test_an_unreachable_remote_is_transient_then_one_line(
    rclone_env: RcloneEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "dead.conf", {"dead": {"type": "webdav", "url": f"http://127.0.0.1:{port}/"}}
    )
    monkeypatch.setenv("RCLONE_CONFIG", str(config))
    monkeypatch.setenv("RCLONE_LOW_LEVEL_RETRIES", "1")  # rclone's own retries: off
    retries: list[str] = []
    b = RetryingBackend(
        RcloneBackend("dead:repo"), sleep=no_sleep, on_retry=lambda *a: retries.append(a[0])
    )
    started = time.monotonic()
    for call in (lambda: list(b.list("")), lambda: b.store("config", b"c")):
        with pytest.raises(TransientError) as info:
            call()
        text = one_line(info.value)
        assert "failed after 6 attempts: cannot reach rclone remote 'dead'" in text, text
        assert f"127.0.0.1:{port}" in text, text
    assert len(retries) == 10
    assert time.monotonic() - started < 30
    b.close()


# --- temporaries of interrupted stores -----------------------------------------------------------

HOUR = 3600.0

# A store in a child process that SIGKILLs itself once the temporary is uploaded, just before
# the move that would give it its final name (its rclone rcd gets SIGTERM as it dies).
KILLED_STORE = textwrap.dedent(
    """
    import os, signal, sys
    from safehold.backends.rclone import RcloneBackend

    real_upload = RcloneBackend._upload

    def upload_then_crash(self, name, view):
        real_upload(self, name, view)
        os.kill(os.getpid(), signal.SIGKILL)

    RcloneBackend._upload = upload_then_crash
    RcloneBackend(sys.argv[1]).store(sys.argv[2], b"payload" * 1000)
    """
)


def make_old(path: Path, age_s: float) -> None:
    when = time.time() - age_s
    os.utime(path, (when, when))


def test_temporary_of_a_killed_store_is_cleaned_once_old(rclone_env: RcloneEnv) -> None:
    root = rclone_env.base / "repo"
    b = RetryingBackend(RcloneBackend(rclone_env.remote_path("repo")), sleep=no_sleep)
    b.create()
    b.store("data/ab/kept", b"kept")
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_STORE, rclone_env.remote_path("repo"), "data/ab/lost"],
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    left = [name for name in disk_names(root) if name != "data/ab/kept"]
    assert len(left) == 1 and left[0].startswith("data/ab/.tmp-"), left
    assert (root / left[0]).read_bytes() == b"payload" * 1000
    assert [i.name for i in b.list("")] == ["data/ab/kept"]
    assert clean_temporaries(b, HOUR) == []  # young: it could be another client's
    make_old(root / left[0], 2 * HOUR)
    assert clean_temporaries(b, HOUR) == left
    assert disk_names(root) == ["data/ab/kept"]
    b.store("data/ab/lost", b"payload" * 1000)
    assert sorted(i.name for i in b.list("")) == ["data/ab/kept", "data/ab/lost"]
    b.close()


def test_clean_temporaries_takes_partial_uploads_and_leaves_folders(
    rclone_env: RcloneEnv,
) -> None:
    root = rclone_env.base / "repo"
    b = RcloneBackend(rclone_env.remote_path("repo"))
    b.create()
    b.store("data/ab/object", b"object")
    b.store("data/.tmp-folder/object", b"in a folder named like a temporary")
    folder = root / "data" / "ab"
    # what newer rclone versions upload to before renaming (--inplace off)
    (folder / ".tmp-0123456789abcdef.a1b2c3d4.partial").write_bytes(b"half uploaded")
    (folder / "foreign.tmp-file").write_bytes(b"not ours")
    for path in root.rglob("*"):
        make_old(path, 2 * HOUR)
    assert b.clean_temporaries(HOUR) == ["data/ab/.tmp-0123456789abcdef.a1b2c3d4.partial"]
    assert disk_names(root) == [
        "data/.tmp-folder/object",
        "data/ab/foreign.tmp-file",
        "data/ab/object",
    ]
    assert b.load("data/.tmp-folder/object") == b"in a folder named like a temporary"
    b.close()
    empty = RcloneBackend(rclone_env.remote_path("no-such-folder"))
    assert empty.clean_temporaries(0) == []
    empty.close()


def test_clean_temporaries_skips_what_vanished_meanwhile(
    rclone_env: RcloneEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = rclone_env.base / "repo"
    b = RcloneBackend(rclone_env.remote_path("repo"))
    b.create()
    gone, kept = root / f".tmp-{1:016x}", root / "data" / "ab" / f".tmp-{2:016x}"
    kept.parent.mkdir(parents=True)
    for path in (gone, kept):
        path.write_bytes(b"half written")
        make_old(path, 2 * HOUR)
    real_list_files = b._list_files

    def list_then_lose_one(*args: Any, **kwargs: Any) -> Any:
        found = real_list_files(*args, **kwargs)
        gone.unlink()  # moved into place, or removed by another client, after the listing
        return found

    monkeypatch.setattr(b, "_list_files", list_then_lose_one)
    assert b.clean_temporaries(HOUR) == [f"data/ab/.tmp-{2:016x}"]
    assert disk_names(root) == []
    b.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T10:00:00Z", 1714557600.0),
        ("2024-05-01T10:00:00.25Z", 1714557600.25),
        ("2024-05-01T12:00:00.123456789+02:00", 1714557600.123456),
        ("2024-05-01T10:00:00", None),  # no time zone: unknown
        ("yesterday", None),
        ("", None),
        (None, None),
        (1714557600, None),
    ],
)
def test_mod_times_of_listings(text: object, expected: float | None) -> None:
    got = _mod_time(text)
    assert got == (None if expected is None else pytest.approx(expected, abs=1e-6))
