"""A schedule explorer: deterministic simulation of clients sharing one repository.

Backups, forgets and prunes run as tasks, each in its own thread with its own ``Repository`` over
a memory backend, but only one runs at a time: every backend call is a scheduling point, where a
seeded scheduler picks which task goes next. The scheduler also moves a virtual clock, may crash
a task at a point (it stops dead, as under SIGKILL: its lock stays, nothing in its ``finally``
blocks reaches storage), may suspend one task across its lock's lease (the others run and refresh
meanwhile), and may make listings lag (objects stored or deleted recently may be missing from,
or still in, a listing).

After every schedule, with the clock moved far past every lease: prune runs until no plan is
left, then every snapshot present must restore exactly the tree it was taken of, ``check
--read-data`` must be clean, and every backup that was neither crashed nor suspended must have
committed. A failure names its seed; ``run_schedule(seed)`` replays the same interleaving.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safehold.backends.base import ObjectInfo
from safehold.backends.memory import MemoryBackend
from safehold.clock import Clock
from safehold.crypto import KdfParams
from safehold.errors import Locked, SafeholdError
from safehold.ops.backup import BackupOptions, backup
from safehold.ops.check import CheckOptions, check
from safehold.ops.copy import CopyOptions, CopyResult, copy_snapshots
from safehold.ops.forget import ForgetOptions, forget, plan_forget
from safehold.ops.prune import DEFAULT_GRACE_S, PruneOptions, prune
from safehold.repository.locks import LEASE_SECONDS
from safehold.repository.repo import InitOptions, Repository

START = 1_900_000_000.0


class SimCrash(BaseException):
    """Raised in a task at the point where the scheduler kills it."""


class VirtualClock(Clock):
    """Time moves only when the scheduler says so. Timers belong to the task that set them and
    fire in that task's own thread, at its scheduling points."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.wall = START
        self.boot = 1000.0
        self.suspended: dict[str, float] = {}  # task -> time it spent suspended

    def time(self) -> float:
        return self.wall

    def elapsed(self) -> float:
        return self.boot

    def monotonic(self) -> float:
        """A clock that stops while the calling task is suspended (CLOCK_MONOTONIC on Linux):
        only the re-injected bug uses it."""
        return self.boot - self.suspended.get(self.sim.current_task() or "", 0.0)

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.boot += seconds

    def every(self, fn: Callable[[], float], first: float) -> Callable[[], None]:
        task = self.sim.current_task()
        timer = [self.boot + first, fn, True]
        if task is not None:
            self.sim.timers.setdefault(task, []).append(timer)

        def cancel() -> None:
            timer[2] = False

        return cancel


class SimBackend:
    """One task's view of the shared memory backend: every call is a scheduling point."""

    def __init__(self, sim: Sim, task: str) -> None:
        self.sim = sim
        self.task = task
        self.inner = sim.storage
        self.consistent_listing = sim.lag == 0.0

    @property
    def location(self) -> str:
        return "memory://sim"

    def create(self) -> None:
        pass

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self.sim.point(self.task, "list", prefix)
        items = list(self.inner.list(prefix))
        if self.sim.lag:
            items = self.sim.lagging(prefix, items)
        return iter(items)

    def load(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.sim.point(self.task, "load", name)
        return self.inner.load(name, offset, length)

    def store(self, name: str, data: bytes | memoryview, *, overwrite: bool = False) -> None:
        self.sim.point(self.task, "store", name)
        self.inner.store(name, data, overwrite=overwrite)
        self.sim.born[name] = self.sim.clock.wall

    def delete(self, name: str) -> None:
        self.sim.point(self.task, "delete", name)
        size = len(self.inner.load(name)) if self.sim.lag else 0
        self.inner.delete(name)
        self.sim.died[name] = (self.sim.clock.wall, size)

    def stat(self, name: str) -> ObjectInfo:
        self.sim.point(self.task, "stat", name)
        return self.inner.stat(name)

    def close(self) -> None:
        pass


@dataclass
class Task:
    name: str
    fn: Callable[[Repository], Any]
    thread: threading.Thread | None = None
    done: bool = False
    crashed: bool = False
    suspended: bool = False
    error: BaseException | None = None
    error_text: str = ""
    result: Any = None
    crash_at: int | None = None  # crash at this many scheduling points
    points: int = 0
    stores: int = 0


@dataclass
class World:
    """What every schedule starts from: a repository with snapshots, and the source trees."""

    objects: dict[str, bytes]
    repo_args: tuple[Any, ...]
    sources: dict[str, Path]
    digests: dict[str, dict[str, str]]  # source name -> relative path -> sha256
    first: str  # the snapshot the forget task removes
    copy_objects: dict[str, bytes] = field(default_factory=dict)  # the copy task's source
    copy_args: tuple[Any, ...] = ()


class Sim:
    def __init__(
        self, seed: int, world: World, *, inject: str = "", consistent: bool = False
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.world = world
        self.inject = inject
        self.storage = MemoryBackend("sim")
        self.storage._objects = dict(world.objects)
        self.clock = VirtualClock(self)
        self.lag = self.rng.choice([0.0, 0.0, 0.0, 45.0])
        if consistent:
            self.lag = 0.0
        self.born: dict[str, float] = {}
        self.died: dict[str, tuple[float, int]] = {}
        self.timers: dict[str, list[list[Any]]] = {}
        self.tasks: dict[str, Task] = {}
        self.cv = threading.Condition()
        self.turn: str | None = None
        self.at_point: set[str] = set()
        self._local = threading.local()
        self.trace: list[str] = []
        self.in_timer = False
        self.asleep: dict[str, float] = {}  # task -> when it wakes up (boot clock)

    # --- the tasks' side ---------------------------------------------------------------------

    def current_task(self) -> str | None:
        return getattr(self._local, "task", None)

    def point(self, task: str, op: str, name: str) -> None:
        t = self.tasks[task]
        if t.crashed:
            raise SimCrash(task)
        if self.in_timer or self.current_task() != task:
            return  # a timer run by the scheduler, or an unscheduled call: no point
        with self.cv:
            self.at_point.add(task)
            self.cv.notify_all()
            while self.turn != task:
                self.cv.wait()
            self.turn = None
            self.at_point.discard(task)
        t.points += 1
        self.trace.append(f"{task}:{op}:{name[:12]}")
        if op == "store" and self.suspend_point is not None and self.suspend_point[0] == task:
            t.stores += 1
            if t.stores == self.suspend_point[1]:
                self._suspend(task)  # right after this store, from its next point on
        if t.crash_at is not None and t.points >= t.crash_at:
            t.crashed = True
            self.timers.pop(task, None)
            raise SimCrash(task)
        self._fire_timers(task)

    def _fire_timers(self, task: str) -> None:
        for timer in list(self.timers.get(task, [])):
            while timer[2] and timer[0] <= self.clock.boot:
                self.in_timer = True
                try:
                    timer[0] = self.clock.boot + timer[1]()
                finally:
                    self.in_timer = False

    def lagging(self, prefix: str, items: list[ObjectInfo]) -> list[ObjectInfo]:
        """A listing that may miss recent stores and still show recent deletes."""
        now = self.clock.wall
        out = [
            i
            for i in items
            if not (now - self.born.get(i.name, -1e18) < self.lag and self.rng.random() < 0.5)
        ]
        names = {i.name for i in items}
        for name, (when, size) in sorted(self.died.items()):
            recent = name.startswith(prefix) and name not in names and now - when < self.lag
            if recent and self.rng.random() < 0.5:
                out.append(ObjectInfo(name, size))
        return out

    # --- the scheduler -----------------------------------------------------------------------

    def add(self, name: str, fn: Callable[[Repository], Any]) -> Task:
        t = Task(name, fn)
        self.tasks[name] = t
        return t

    def _run_task(self, t: Task) -> None:
        self._local.task = t.name
        try:
            repo = self.client(t.name)
            t.result = t.fn(repo)
        except SimCrash:
            t.crashed = True
        except BaseException as e:
            t.error = e
            t.error_text = "".join(traceback.format_exception(e))
        finally:
            with self.cv:
                t.done = True
                self.timers.pop(t.name, None)
                self.cv.notify_all()

    def client(self, task: str) -> Repository:
        repo = Repository(SimBackend(self, task), *self.world.repo_args)
        repo.clock = self.clock
        repo.threads = 1
        return repo

    def run(self, max_steps: int = 20_000) -> None:
        for t in self.tasks.values():
            t.thread = threading.Thread(target=self._run_task, args=(t,), daemon=True)
        with self.cv:
            for t in self.tasks.values():
                assert t.thread is not None
                t.thread.start()
            steps = 0
            while True:
                self.cv.wait_for(
                    lambda: (
                        all(t.done or t.name in self.at_point for t in self.tasks.values())
                        and self.turn is None
                    )
                )
                ready = sorted(n for n in self.at_point if not self.tasks[n].done)
                if not ready:
                    break
                steps += 1
                if steps > max_steps:
                    raise AssertionError(f"seed {self.seed}: no progress after {max_steps} steps")
                self.clock.advance(self.rng.choice([0.0, 0.5, 2.0, 10.0]))
                if self.suspend_at is not None and steps == self.suspend_at[1]:
                    self._suspend(self.suspend_at[0])
                awake = [n for n in ready if self.asleep.get(n, 0.0) <= self.clock.boot]
                if not awake:  # only sleepers left: time passes until the first wakes up
                    self.clock.advance(min(self.asleep[n] for n in ready) - self.clock.boot)
                    awake = [n for n in ready if self.asleep.get(n, 0.0) <= self.clock.boot]
                nxt = self.rng.choice(awake)
                self.turn = nxt
                self.cv.notify_all()
        for t in self.tasks.values():
            assert t.thread is not None
            t.thread.join(30)

    suspend_at: tuple[str, int] | None = None  # (task, at this scheduler step)
    suspend_point: tuple[str, int] | None = None  # (task, after its own n-th store)

    def _suspend(self, task: str) -> None:
        """``task`` sleeps through more than a lease (a laptop's lid closed) while the others
        run on; it is not scheduled, and its timers do not fire, until it wakes up."""
        t = self.tasks[task]
        if t.done:
            return
        t.suspended = True
        length = LEASE_SECONDS + self.rng.choice([30.0, 300.0, DEFAULT_GRACE_S + 100])
        self.asleep[task] = self.clock.boot + length
        late = self.tasks.get("prune-late")
        if late is not None and not late.done:
            # the adversary's prune: it runs while the sleeper's lease has lapsed, before the
            # sleeper wakes up to commit
            self.asleep["prune-late"] = self.asleep[task] - 1.0
        self.clock.suspended[task] = self.clock.suspended.get(task, 0.0) + length
        self.trace.append(f"-- {task} suspended {length:.0f}s")


# --- the world -----------------------------------------------------------------------------


def _write_tree(root: Path, files: dict[str, bytes]) -> dict[str, str]:
    digests = {}
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        digests[rel] = hashlib.sha256(data).hexdigest()
    return digests


def make_world(base: Path) -> World:
    """A repository with two snapshots, and the trees the tasks back up. The backups share data
    with the snapshot that forget removes, so they deduplicate against packs prune condemns."""
    rnd = random.Random(1234)

    def blob(n: int) -> bytes:
        return rnd.randbytes(n)

    x, y, shared = blob(30_000), blob(40_000), blob(25_000)
    trees = {
        "old": {"x.bin": x, "y.bin": y, "sub/shared.bin": shared},
        "keep": {"shared.bin": shared, "k.bin": blob(20_000)},
        "b1": {"x.bin": x, "w.bin": blob(15_000), "d/e/y.bin": y},
        "b2": {"y.bin": y, "v.bin": blob(12_000), "s.bin": shared},
    }
    sources, digests = {}, {}
    for name, files in trees.items():
        sources[name] = base / name
        digests[name] = _write_tree(base / name, files)
    storage = MemoryBackend("world")
    repo = Repository.init(
        storage,
        b"pw",
        InitOptions(chunk_avg=1 << 16, pack_size=1 << 20, kdf=KdfParams(1, 1024, 1)),
    )
    first = backup(repo, BackupOptions(paths=[str(sources["old"])], workers=0)).snapshot
    backup(repo, BackupOptions(paths=[str(sources["keep"])], workers=0))
    assert first is not None
    objects = {k: v for k, v in storage._objects.items() if not k.startswith("locks/")}
    # the copy task's source: a repository that chunks like this one (so blobs are copied by
    # id and deduplicate against packs prune condemns), holding the data of the forgotten
    # snapshot and of another tree
    src_storage = MemoryBackend("copy-source")
    src = Repository.init(
        src_storage,
        b"pw2",
        InitOptions(pack_size=1 << 20, kdf=KdfParams(1, 1024, 1), chunker_from=repo),
    )
    backup(src, BackupOptions(paths=[str(sources["old"])], workers=0))
    backup(src, BackupOptions(paths=[str(sources["b2"])], workers=0))
    return World(
        objects=objects,
        repo_args=(repo.config, repo.secrets, repo.key_id),
        sources=sources,
        digests=digests,
        first=first.id,
        copy_objects={k: v for k, v in src_storage._objects.items() if k[:6] != "locks/"},
        copy_args=(src.config, src.secrets, src.key_id),
    )


# --- one schedule ----------------------------------------------------------------------------


@dataclass
class Outcome:
    seed: int
    ok: bool
    problems: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    shape: str = ""

    def report(self) -> str:
        tail = "\n  ".join(self.trace[-60:])
        return f"seed {self.seed} ({self.shape}): " + "; ".join(self.problems) + f"\n  {tail}"


def _backup_task(world: World, source: str) -> Callable[[Repository], Any]:
    def run(repo: Repository) -> Any:
        opts = BackupOptions(paths=[str(world.sources[source])], workers=0, index_flush_packs=1)
        return backup(repo, opts, progress_interval=1e9)

    return run


def _forget_task(world: World, then_prune: bool) -> Callable[[Repository], Any]:
    def run(repo: Repository) -> Any:
        plan = plan_forget(repo, ForgetOptions(snapshots=[world.first[:12]]))
        forget(repo, plan)
        if then_prune:
            return prune(repo, PruneOptions(max_unused=0.0))
        return None

    return run


def _copy_task(world: World) -> Callable[[Repository], Any]:
    """``copy`` into the shared repository from a repository of its own (not scheduled)."""

    def run(repo: Repository) -> Any:
        storage = MemoryBackend("copy-source")
        storage._objects = dict(world.copy_objects)
        src = Repository(storage, *world.copy_args)
        src.threads = 1
        return copy_snapshots(src, repo, CopyOptions(index_flush_packs=1))

    return run


def _prune_task(times: int, max_unused: float) -> Callable[[Repository], Any]:
    def run(repo: Repository) -> Any:
        out = None
        for _ in range(times):
            out = prune(repo, PruneOptions(max_unused=max_unused))
        return out

    return run


def _digest_snapshot(repo: Repository, tree: bytes, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for node in repo.read_tree(tree):
        name = prefix + os.fsdecode(node.name)
        if node.type == "dir" and node.subtree is not None:
            out |= _digest_snapshot(repo, node.subtree, name + "/")
        elif node.type == "file":
            h = hashlib.sha256()
            for c in node.content or []:
                h.update(repo.read_blob(c))
            out[name] = h.hexdigest()
    return out


def run_schedule(seed: int, world: World, *, inject: str = "", consistent: bool = False) -> Outcome:
    """One schedule; ``consistent`` rules out lagging listings."""
    from tests.sim.inject import injected

    with injected(inject):
        return _run_schedule(seed, world, inject, consistent)


def _run_schedule(seed: int, world: World, inject: str, consistent: bool) -> Outcome:
    sim = Sim(seed, world, inject=inject, consistent=consistent)
    rng = sim.rng
    sim.add("backup1", _backup_task(world, "b1"))
    forget_then_prune = rng.random() < 0.3
    sim.add("forget", _forget_task(world, forget_then_prune))
    if not forget_then_prune or rng.random() < 0.5:
        sim.add("prune", _prune_task(rng.choice([1, 2]), rng.choice([0.0, 0.0, 0.5])))
    if rng.random() < 0.7:
        # sometimes the same source as backup1: its parent may then be committed meanwhile
        sim.add("backup2", _backup_task(world, rng.choice(["b2", "b2", "b1"])))
    if rng.random() < 0.5:
        sim.add("copy", _copy_task(world))
    # who is suspended past its lease, if anyone: a copy makes few calls, so it is suspended
    # right after one of its stores (packs, index objects, lock refreshes) rather than at a step
    victim: str | None = None
    if "copy" in sim.tasks and rng.random() < 0.4:
        victim = "copy"
    elif rng.random() < 0.35:
        victim = rng.choice(sorted(n for n in sim.tasks if n.startswith("backup")))
    if rng.random() < (0.7 if victim else 0.2):
        # a prune that waits: it runs an hour later (usually after the others), or while the
        # suspended client sleeps past its lease, before it wakes up
        sim.add("prune-late", _prune_task(2, 0.0))
        sim.asleep["prune-late"] = sim.clock.boot + 3600.0
    names = sorted(sim.tasks)
    shape = [f"tasks={','.join(names)}", f"lag={sim.lag:g}"]
    if rng.random() < 0.2:
        crashed = rng.choice(names)
        sim.tasks[crashed].crash_at = rng.randint(1, 40)
        shape.append(f"crash={crashed}@{sim.tasks[crashed].crash_at}")
    if victim == "copy":
        sim.suspend_point = (victim, rng.randint(1, 8))
        shape.append(f"suspend={victim}@store{sim.suspend_point[1]}")
    elif victim is not None:
        sim.suspend_at = (victim, rng.randint(2, 80))
        shape.append(f"suspend={victim}@{sim.suspend_at[1]}")
    out = Outcome(seed, True, shape=" ".join(shape))
    try:
        sim.run()
    except AssertionError as e:
        out.ok = False
        out.problems.append(str(e))
        out.trace = sim.trace
        return out
    # the tasks' own outcomes: a backup that was neither crashed nor suspended must commit
    committed: dict[str, str] = {}
    for t in sim.tasks.values():
        if t.error is not None:
            if t.name.startswith(("backup", "copy")):
                allowed = isinstance(t.error, Locked) and t.suspended
            else:  # maintenance may refuse (another holds the lock; a listing lagged)
                allowed = isinstance(t.error, Locked) or (
                    isinstance(t.error, SafeholdError) and sim.lag > 0
                )
            if not allowed:
                out.problems.append(f"{t.name} failed: {t.error_text.strip().splitlines()[-1]}")
        elif t.name == "copy" and not t.crashed:
            res: CopyResult = t.result
            if res.failed or len(res.copied) + len(res.skipped) != 2:
                out.problems.append(f"copy: {res.as_dict()}")
            for _src_id, dst_id in res.copied:
                committed[dst_id] = "a copy"
        elif t.name.startswith("backup") and not t.crashed:
            snap = t.result.snapshot
            committed[snap.id] = snap.paths[0]
            if t.result.warnings and not (t.suspended or sim.lag):
                # the sources do not change: a warning means the backup misread the repository
                out.problems.append(f"{t.name} warned: {t.result.warnings[0]}")
    # afterwards: every lease and grace period over, prune until no plan is left
    sim.clock.advance(10 * DEFAULT_GRACE_S)
    sim._local.task = None
    final = Repository(sim.storage, *world.repo_args)
    final.clock = sim.clock
    final.threads = 1
    try:
        for _ in range(3):
            prune(final, PruneOptions(max_unused=0.0))
            if not list(sim.storage.list("plans/")):
                break
        else:
            out.problems.append("plans left after three final prunes")
        by_path = {str(p): name for name, p in world.sources.items()}
        for snap in final.snapshots():
            source = by_path.get(snap.paths[0]) if len(snap.paths) == 1 else None
            if source is None:
                out.problems.append(f"snapshot {snap.id[:8]} of unknown paths {snap.paths}")
                continue
            if snap.id == world.first:
                forgot = sim.tasks["forget"]
                if forgot.done and not forgot.crashed and forgot.error is None:
                    out.problems.append("the forgotten snapshot is still there")
            got = _digest_snapshot(final, snap.tree)
            prefix = str(world.sources[source]).lstrip("/") + "/"
            got = {k.removeprefix(prefix): v for k, v in got.items()}
            if got != world.digests[source]:
                out.problems.append(f"snapshot {snap.id[:8]} of {source} does not restore")
            committed.pop(snap.id, None)
        for sid, path in committed.items():
            out.problems.append(f"committed snapshot {sid[:8]} of {path} is gone")
        res = check(final, CheckOptions(read_data=True, workers=1))
        if res.errors:
            out.problems.append("check: " + "; ".join(res.errors[:3]))
    except SafeholdError as e:
        out.problems.append(f"final verification failed: {e}")
    if out.problems:
        out.ok = False
        out.trace = sim.trace
    return out


def explore(
    seeds: range | list[int],
    world: World,
    *,
    inject: str = "",
    stop_at_first: bool = False,
    consistent: bool = False,
) -> tuple[int, list[Outcome]]:
    """Run the schedules; returns how many ran and the failures."""
    failures = []
    ran = 0
    for seed in seeds:
        ran += 1
        o = run_schedule(seed, world, inject=inject, consistent=consistent)
        if not o.ok:
            failures.append(o)
            if stop_at_first:
                break
    return ran, failures
