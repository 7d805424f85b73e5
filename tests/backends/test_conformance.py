"""Runs the conformance suite against every backend (and the fault-tolerant wrapper stack).

A new backend adds a parameter to the ``backend`` fixture. The fault-injection seeds are fixed
(the base seed is in the test id, each test's own seed is printed); set SAFEHOLD_FAULT_SEED to
try others. The ``s3`` parameter runs the suite against a real moto_server process (see
``s3server.py``), one fresh bucket per test, objects under a key prefix.
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
from safehold.backends.s3 import S3Backend

from .conformance import BackendConformance

if TYPE_CHECKING:
    from .s3server import MotoServer

pytest_plugins = ["tests.backends.s3server"]  # the fixture s3_server

FAULT_SEED = int(os.environ.get("SAFEHOLD_FAULT_SEED", "1729"))
FAULT_RATE = 0.3


def no_sleep(seconds: float) -> None:
    pass


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
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    faulty: FaultInjectingBackend | None = None
    if request.param == "local":
        b: Backend = LocalBackend(tmp_path / "repo")
        b.create()
    elif request.param == "memory":
        b = MemoryBackend()
    elif request.param == "s3":
        server: MotoServer = request.getfixturevalue("s3_server")
        b = S3Backend(server.new_bucket(), "backups/repo", endpoint_url=server.url)
        b.create()
        request.addfinalizer(server.reset)
    else:
        # A different but fixed seed per test, so the tests do not all see the same faults.
        seed = FAULT_SEED ^ zlib.crc32(request.node.name.encode())
        print(f"fault injection seed: {seed} (rate {FAULT_RATE})")
        b, faulty = faulty_local(tmp_path / "repo", seed)
    yield b
    b.close()
    if faulty is not None:
        print(f"faults: {dict(faulty.stats)}")


class TestConformance(BackendConformance):
    pass
