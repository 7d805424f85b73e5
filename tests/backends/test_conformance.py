"""Runs the conformance suite against every backend (and the fault-tolerant wrapper stack).

A new backend adds a parameter to the ``backend`` fixture. The fault-injection seeds are fixed
(the base seed is in the test id, each test's own seed is printed); set SAFEHOLD_FAULT_SEED to
try others. The ``s3`` parameter runs the suite against a real moto_server process (see
``s3server.py``), one fresh bucket per test, objects under a key prefix. The ``rclone``
parameter runs it against the real rclone binary (an ``rclone rcd`` per test) with a local-type
remote from a temporary config (see ``rclone_env.py``); skipped only if rclone is not installed.
The ``sftp`` parameter runs it against a real OpenSSH sshd (see ``sshserver.py``), a fresh
folder per test; skipped only if sshd is not installed. With ``CI=true`` a missing rclone or
sshd fails those tests instead.

``on_disk`` is the folder of this machine where the backend under test keeps its files, for the
backends that clean up the temporaries of interrupted stores (local, faulty-local, rclone's local
remote, the sftp server's folder); None for the others.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from safehold.backends import (
    Backend,
    FaultInjectingBackend,
    LocalBackend,
    MemoryBackend,
    RetryingBackend,
)
from safehold.backends.rclone import RcloneBackend
from safehold.backends.s3 import S3Backend
from tests.support.checks import no_sleep
from tests.support.rclone_config import NO_RCLONE, RCLONE
from tests.support.tools import fail_in_ci

from .conformance import BackendConformance, OnDisk

if TYPE_CHECKING:
    from tests.support.rclone_config import RcloneEnv

    from .s3server import MotoServer
    from .sshserver import SSHServer

# the fixtures s3_server, rclone_env and sshd
pytest_plugins = [
    "tests.backends.s3server",
    "tests.backends.rclone_env",
    "tests.backends.sshserver",
]

FAULT_SEED = int(os.environ.get("SAFEHOLD_FAULT_SEED", "1729"))
FAULT_RATE = 0.3

FILES = pytest.StashKey[Path]()
"""Where the ``backend`` fixture's backend keeps its files on this machine (if it says)."""


def faulty_local(root: Path, seed: int) -> tuple[Backend, FaultInjectingBackend]:
    """LocalBackend under random transient faults of every kind, behind a RetryingBackend.

    ``delete`` gets no random faults: after a lost answer a retried delete cannot tell whether
    the object was there, so "delete of a missing object raises NotFound" cannot hold (see
    test_wrappers for how RetryingBackend resolves that).
    """
    local = LocalBackend(root)
    local.create()
    faulty = FaultInjectingBackend(
        local,
        seed=seed,
        rate=FAULT_RATE,
        ops=frozenset({"list", "load", "store", "stat"}),
    )
    # 0.3 ** 25 makes running out of attempts practically impossible.
    return RetryingBackend(faulty, attempts=25, sleep=no_sleep), faulty


@pytest.fixture(
    params=[
        "local",
        "memory",
        f"faulty-local-seed{FAULT_SEED}",
        pytest.param("s3", marks=pytest.mark.s3),
        pytest.param("rclone", marks=pytest.mark.rclone),
        pytest.param("sftp", marks=pytest.mark.sftp),
        "serve",
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    faulty: FaultInjectingBackend | None = None
    if request.param == "local":
        b: Backend = LocalBackend(tmp_path / "repo")
        b.create()
        request.node.stash[FILES] = tmp_path / "repo"
    elif request.param == "memory":
        b = MemoryBackend()
    elif request.param == "s3":
        server: MotoServer = request.getfixturevalue("s3_server")
        b = S3Backend(server.new_bucket(), "backups/repo", endpoint_url=server.url)
        b.create()
        request.addfinalizer(server.reset)
    elif request.param == "rclone":
        fail_in_ci(NO_RCLONE if RCLONE is None else None)
        env: RcloneEnv = request.getfixturevalue("rclone_env")
        b = RcloneBackend(env.remote_path("backups/repo"))
        b.create()
        request.node.stash[FILES] = env.base / "backups" / "repo"
    elif request.param == "sftp":
        from .sshserver import sshd_missing  # a plugin: imported (and rewritten) by pytest

        fail_in_ci(sshd_missing())
        sshd: SSHServer = request.getfixturevalue("sshd")
        folder = sshd.new_dir()
        b = sshd.backend(folder)
        b.create()
        request.node.stash[FILES] = folder
    elif request.param == "serve":
        b = serve_backend(tmp_path, request)
        b.create()
    else:
        # A different but fixed seed per test, so the tests do not all see the same faults.
        seed = FAULT_SEED ^ zlib.crc32(request.node.name.encode())
        print(f"fault injection seed: {seed} (rate {FAULT_RATE})")
        b, faulty = faulty_local(tmp_path / "repo", seed)
        request.node.stash[FILES] = tmp_path / "repo"
    yield b
    b.close()
    if faulty is not None:
        print(f"faults: {dict(faulty.stats)}")


@pytest.fixture
def on_disk(backend: Backend, request: pytest.FixtureRequest) -> OnDisk | None:
    folder = request.node.stash.get(FILES, None)
    return None if folder is None else OnDisk(folder)


def serve_backend(tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    """An ssh:// backend whose "ssh" runs ``safehold serve`` locally over pipes."""
    import sys

    from safehold.backends.registry import open_backend

    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    fake = Path(__file__).resolve().parent.parent / "support" / "fake_rsh.py"
    mp.setenv("SAFEHOLD_RSH", f"{sys.executable} {fake}")
    mp.setenv("FAKE_RSH_ROOT", str(tmp_path))
    return open_backend("ssh://backup@server.invalid/~/repo")


class TestConformance(BackendConformance):
    pass
