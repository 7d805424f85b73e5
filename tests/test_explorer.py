"""The schedule explorer (tests/sim/explorer.py): backups, forget and prune interleaved at every
backend call, with crashes, suspends past the lease and lagging listings. No schedule may lose a
committed snapshot, leave damage or make a backup fail; and each bug of issue 7, put back on
purpose, must be found within the budget. Seeds are printed; a failure replays by its seed:
``python bench/explore.py --seed N``."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import pytest

from tests.sim.explorer import World, explore, make_world
from tests.sim.inject import INJECTIONS

SCHEDULES = int(os.environ.get("SAFEHOLD_EXPLORE", "5000"))
BUDGET = 3000
"""Schedules within which each re-injected bug must be found."""

_world: World | None = None


def _worker(seeds: list[int]) -> tuple[int, list[str]]:
    global _world
    if _world is None:
        _world = make_world(Path(tempfile.mkdtemp(prefix="safehold-sim-")))
    ran, failures = explore(seeds, _world)
    return ran, [f.report() for f in failures]


@pytest.mark.slow
def test_explore_schedules() -> None:
    start = int(os.environ.get("SAFEHOLD_EXPLORE_START", "0"))
    seeds = list(range(start, start + SCHEDULES))
    print(f"exploring seeds {seeds[0]}..{seeds[-1]}")
    t0 = time.monotonic()
    procs = min(2, os.cpu_count() or 1)
    chunks = [seeds[i::procs] for i in range(procs)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(procs) as pool:
        results = pool.map(_worker, chunks)
    ran = sum(r for r, _ in results)
    failures = [f for _, fs in results for f in fs]
    print(f"{ran} schedules in {time.monotonic() - t0:.0f}s, {len(failures)} failures")
    assert ran == SCHEDULES
    assert not failures, "\n\n".join(failures[:3])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return make_world(tmp_path_factory.mktemp("sim"))


@pytest.mark.slow
@pytest.mark.parametrize("bug", INJECTIONS)
def test_explorer_finds_each_reinjected_bug(bug: str, world: World) -> None:
    """With listings consistent, so that each is found for its own sake, not for lagging."""
    ran, failures = explore(range(BUDGET), world, inject=bug, stop_at_first=True, consistent=True)
    assert failures, f"the explorer did not find {bug} in {ran} schedules"
    print(f"{bug}: found by seed {failures[0].seed} after {ran} schedules")
