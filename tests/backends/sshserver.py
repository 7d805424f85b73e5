"""A real OpenSSH server for the tests: ``/usr/sbin/sshd`` in a subprocess on 127.0.0.1.

Nothing is mocked: the backend under test and ``safehold`` subprocesses talk SSH and SFTP to the
sshd process. :func:`start_sshd` generates an ed25519 host key and two client keys (one the
server accepts, one it does not) in a fresh folder, writes an ``sshd_config`` (a free port of
127.0.0.1, key authentication only against an authorized_keys file of that folder, the
``internal-sftp`` subsystem whose login folder is ``<folder>/home``, no PAM (but for the
unprivileged server below), no StrictModes, a
PidFile in the folder), starts ``sshd -D -e -f CONFIG``, waits until the port answers with an
SSH banner, and writes a known_hosts file with the host key for the clients.

:func:`sshd` (session-scoped) is that server running as the current user: as root (as in CI) it
logs in root (``PermitRootLogin prohibit-password``). :func:`sshd_unprivileged` is one whose
logins cannot override file permissions: the same server when the tests do not run as root,
else a second sshd running as ``nobody`` (an sshd not started by root can only log in the user
it runs as). Both are skipped, with the reason, when sshd is not installed.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from safehold.backends.sftp import SFTPBackend
from tests.support.tools import skip_or_fail

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
PRIVSEP_DIR = "/run/sshd"
"""Debian's sshd, started by root, refuses to start without it (its init script makes it)."""

_START_TIMEOUT = 30.0


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sshd_missing() -> str | None:
    """Why sshd cannot be used here, or None."""
    if not os.access(SSHD, os.X_OK):
        return f"OpenSSH's sshd is not installed ({SSHD}; apt-get install openssh-server)"
    if not os.access(SSH_KEYGEN, os.X_OK):
        return "ssh-keygen is not installed (apt-get install openssh-client)"
    return None


def keygen(path: Path, comment: str = "safehold-test") -> str:
    """Make an ed25519 key pair at ``path`` (no passphrase); the public key line."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path.with_suffix(".pub").read_text().strip()


def fingerprint(public_key: Path) -> str:
    """``ssh-keygen -l``'s SHA256 fingerprint of a public key file, e.g. ``SHA256:abc…``."""
    out = subprocess.run(
        [SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(public_key)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[1]


@dataclass
class SSHServer:
    """One sshd process and the keys that go with it."""

    proc: subprocess.Popen[bytes]
    port: int
    dir: Path
    user: str
    client_key: Path
    """A private key the server accepts."""
    other_key: Path
    """A private key the server does not accept."""
    host_key: Path
    """The server's private host key (its public half beside it, ``.pub``)."""
    known_hosts: Path
    """A known_hosts file with the server's host key for ``[127.0.0.1]:port``."""
    log: Path

    @property
    def home(self) -> Path:
        """The login folder of SFTP sessions (what ``/~/`` paths are relative to)."""
        return self.dir / "home"

    def new_dir(self) -> Path:
        """A fresh, not yet existing folder path under the server's folder."""
        return self.dir / "repos" / uuid.uuid4().hex[:12] / "repo"

    def url(self, path: str | Path) -> str:
        return f"sftp://{self.user}@127.0.0.1:{self.port}{path}"

    def fingerprint(self, key: Path | None = None) -> str:
        """``ssh-keygen -l``'s SHA256 fingerprint of a key (default: the host key)."""
        return fingerprint((key or self.host_key).with_suffix(".pub"))

    def options(self) -> dict[str, str]:
        return {"sftp.key-file": str(self.client_key), "sftp.known-hosts": str(self.known_hosts)}

    def backend(self, path: str | Path, **kw: Any) -> SFTPBackend:
        """An SFTPBackend for ``path`` that uses nothing of the developer's ~/.ssh or agent."""
        args: dict[str, Any] = {
            "user": self.user,
            "port": self.port,
            "key_files": [str(self.client_key)],
            "known_hosts": [str(self.known_hosts)],
            "ssh_config": None,
            "allow_agent": False,
            "look_for_keys": False,
        }
        args.update(kw)
        return SFTPBackend("127.0.0.1", str(path), **args)

    def connection_pids(self, client_port: int) -> list[int]:
        """The server processes holding the connection from ``client_port`` of 127.0.0.1."""
        inodes: set[str] = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                fields = line.split()
                local = int(fields[1].rsplit(":", 1)[1], 16)
                remote = int(fields[2].rsplit(":", 1)[1], 16)
                if local == self.port and remote == client_port:
                    inodes.add(f"socket:[{fields[9]}]")
        pids: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                fds = os.listdir(f"/proc/{entry}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                        pids.append(int(entry))
                        break
                except OSError:
                    continue
        return pids

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _config(work: Path, port: int, *, use_pam: bool = False) -> str:
    return "\n".join(
        [
            "ListenAddress 127.0.0.1",
            f"Port {port}",
            f"HostKey {work / 'host_key'}",
            f"PidFile {work / 'sshd.pid'}",
            f"AuthorizedKeysFile {work / 'authorized_keys'}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            f"UsePAM {'yes' if use_pam else 'no'}",
            "StrictModes no",
            "MaxStartups 100",
            "MaxSessions 10",
            "LogLevel VERBOSE",
            f"Subsystem sftp internal-sftp -d {work / 'home'}",
            "",
        ]
    )


def start_sshd(work: Path, *, run_as: str | None = None) -> SSHServer:
    """Start sshd with keys and configuration in ``work`` (an empty folder).

    ``run_as`` (only as root): the user the sshd process runs as, and so the only user it can
    log in; without, the current user.
    """
    reason = sshd_missing()
    if reason:
        raise RuntimeError(reason)
    user = run_as or getpass.getuser()
    keygen(work / "host_key", "safehold-test-host")
    client_pub = keygen(work / "client_key")
    keygen(work / "other_key")
    (work / "authorized_keys").write_text(client_pub + "\n")
    (work / "home").mkdir()
    (work / "repos").mkdir()
    host_pub = (work / "host_key.pub").read_text().split()
    popen_args: dict[str, Any] = {}
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        for path in [work, *work.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        popen_args = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    elif os.geteuid() == 0 and not os.path.isdir(PRIVSEP_DIR):
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
    last_error = ""
    for attempt in range(3):
        port = free_port()
        config = work / "sshd_config"
        # Without PAM, sshd refuses system accounts such as nobody ("account is locked").
        config.write_text(_config(work, port, use_pam=run_as is not None))
        known_hosts = work / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
        log = work / f"sshd-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                **popen_args,
            )
        server = SSHServer(
            proc,
            port,
            work,
            user,
            work / "client_key",
            work / "other_key",
            work / "host_key",
            known_hosts,
            log,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    if s.recv(64).startswith(b"SSH-2.0-"):
                        return server
            except OSError:
                time.sleep(0.05)
        server.stop()
        last_error = f"attempt {attempt + 1}: exit {proc.returncode}\n{server.log_tail()}"
    raise RuntimeError(f"sshd did not start:\n{last_error}")


def _world_reachable_dir(prefix: str) -> Path:
    """A new folder in the system temporary folder that other users can enter."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


# --- fixtures (a test module that uses them names this module in its pytest_plugins) ------------


@pytest.fixture(scope="session")
def sshd() -> Iterator[SSHServer]:
    """The session's sshd, running as the current user (root in CI), started on first use."""
    reason = sshd_missing()
    if reason:
        skip_or_fail(reason)
    work = _world_reachable_dir("safehold-sshd-")
    server = start_sshd(work)
    yield server
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd_unprivileged(sshd: SSHServer) -> Iterator[SSHServer]:
    """An sshd whose logins are subject to file permissions (see the module's description)."""
    if os.geteuid() != 0:
        yield sshd
        return
    work = _world_reachable_dir("safehold-sshd-nobody-")
    server = start_sshd(work, run_as="nobody")
    yield server
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def dead_port() -> int:
    """A port of 127.0.0.1 where nothing listens."""
    return free_port()


@pytest.fixture
def ssh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty HOME (so no ~/.ssh of the developer's) and no SSH agent."""
    home = tmp_path / "ssh-home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home
