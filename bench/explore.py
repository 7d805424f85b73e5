"""Long mode of the schedule explorer (tests/sim/explorer.py): run many schedules, or replay one.

python bench/explore.py --schedules 1000000 [--start N] [--procs 2]
python bench/explore.py --seed N            # replay one schedule, print its trace
python bench/explore.py --inject trust-plan # how soon each re-injected bug is found
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("SAFEHOLD_KDF", "1,1024,1")

from tests.sim.explorer import World, explore, make_world, run_schedule  # noqa: E402

_world: World | None = None


def _work(args: tuple[int, int]) -> tuple[int, list[str]]:
    global _world
    if _world is None:
        _world = make_world(Path(tempfile.mkdtemp(prefix="safehold-sim-")))
    start, count = args
    ran, failures = explore(range(start, start + count), _world)
    return ran, [f.report() for f in failures]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--schedules", type=int, default=10_000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, help="replay this seed and print its trace")
    ap.add_argument("--inject", help="a re-injected bug: report how soon it is found")
    a = ap.parse_args()
    if a.seed is not None:
        world = make_world(Path(tempfile.mkdtemp(prefix="safehold-sim-")))
        o = run_schedule(a.seed, world, inject=a.inject or "")
        print(o.report() if not o.ok else f"seed {a.seed} ({o.shape}): ok")
        return 0 if o.ok else 1
    if a.inject:
        world = make_world(Path(tempfile.mkdtemp(prefix="safehold-sim-")))
        ran, f = explore(
            range(a.start, a.start + a.schedules),
            world,
            inject=a.inject,
            stop_at_first=True,
            consistent=True,
        )
        print(f"{a.inject}: " + (f"found by seed {f[0].seed} after {ran}" if f else "not found"))
        return 0
    t0 = time.monotonic()
    batch = 500
    jobs = [
        (s, min(batch, a.start + a.schedules - s))
        for s in range(a.start, a.start + a.schedules, batch)
    ]
    ran, failures = 0, []
    with multiprocessing.get_context("fork").Pool(a.procs) as pool:
        for r, f in pool.imap_unordered(_work, jobs):
            ran += r
            failures += f
            for rep in f:
                print(rep.splitlines()[0], flush=True)
            if ran % 10_000 < batch:
                rate = ran / (time.monotonic() - t0)
                print(f"{ran} schedules, {len(failures)} failures, {rate:.0f}/s", flush=True)
    print(f"{ran} schedules in {time.monotonic() - t0:.0f}s: {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
