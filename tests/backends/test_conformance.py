"""Runs the conformance suite against every backend (and the fault-tolerant wrapper stack).

A new backend adds a parameter to the ``backend`` fixture. The fault-injection seeds are fixed
(the base seed is in the test id, each test's own seed is printed); set SAFEHOLD_FAULT_SEED to
try others.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from safehold.backends import (
    Backend,
    FaultInjectingBackend,
    LocalBackend,
    MemoryBackend,
    RetryingBackend,
)

from .conformance import BackendConformance

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


@pytest.fixture(params=["local", "memory", f"faulty-local-seed{FAULT_SEED}"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    faulty: FaultInjectingBackend | None = None
    if request.param == "local":
        b: Backend = LocalBackend(tmp_path / "repo")
        b.create()
    elif request.param == "memory":
        b = MemoryBackend()
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
