"""Repository locks: leases with a wall-clock expiry, refreshed while the process runs.

A lock is ``locks/<random id>`` holding JSON (docs/format.md §12). It is stale when its lease has
expired by the reader's wall clock, or at once when it was provably taken by a process that no
longer exists: same host, same boot, same PID namespace, and no process with that PID and that
start time. Shared locks (backup, forget, prune) coexist; an exclusive lock excludes every other
lock; the maintenance operations (``op`` "prune" and "forget") exclude each other.

Commands that only read (check, restore, ls, ...) are never refused by a lock: a reader either
takes no lock, or stores one without looking at the others (:func:`reader_lock`), so that a prune
plan made meanwhile waits for it (docs/format.md §15.2, step 2) while it reads.

The holder measures its own lease with a clock that keeps counting during suspend: once a refresh
comes later than the lease allows, other clients may have judged the lock stale and stopped
waiting for it, so the lock is *lost* for good and the holder must commit nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

from safehold.backends.base import Backend
from safehold.clock import REAL_CLOCK, Clock
from safehold.errors import Locked, NotFound, SafeholdError, UsageError
from safehold.ids import is_hex_id, lock_name, name_to_id

LEASE_SECONDS = 300.0
REFRESH_SECONDS = 60.0
RETRY_SECONDS = 10.0
"""How soon a failed refresh is tried again."""
COMMIT_MARGIN = LEASE_SECONDS - REFRESH_SECONDS
"""A writer commits only if its lock was written less than this long ago (so the lease still has
a refresh period to run while the commit is stored)."""
SKEW_SECONDS = 30.0
"""How far clients' clocks may disagree; the lease is judged lost this much before it ends."""

MAINTENANCE_OPS = frozenset({"prune", "forget"})
"""Operations that exclude each other (but not backups)."""


@cache
def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@cache
def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot, or None if there is none (or
    it cannot be told)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(b")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _process_gone(pid: int, start: int) -> bool:
    """True only if provably no process ``pid`` started at ``start`` exists (in our namespace)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    got = process_start(pid)
    return got is not None and got != start


@dataclass(frozen=True, slots=True)
class LockInfo:
    lock_id: str
    host: str
    pid: int
    user: str
    time: float
    expires: float
    exclusive: bool
    op: str = ""
    boot_id: str = ""
    pidns: str = ""
    start: int = 0

    def stale(self, now: float | None = None) -> bool:
        now = REAL_CLOCK.time() if now is None else now
        if self.expires < now:
            return True
        if self.expires > now + LEASE_SECONDS + SKEW_SECONDS:
            return True  # no honest lease ends this far ahead: garbage, or a hostile lock
        # the process can be judged dead only where its pid means the same process as ours would:
        # same host, same boot, same PID namespace (containers sharing a host name do not)
        if (
            self.host == socket.gethostname()
            and self.boot_id
            and self.boot_id == _boot_id()
            and self.pidns
            and self.pidns == _pid_namespace()
            and self.start
        ):
            return _process_gone(self.pid, self.start)
        return False

    def conflicts_with(self, exclusive: bool, op: str) -> bool:
        if exclusive or self.exclusive:
            return True
        if op and op == self.op:
            return True
        return op in MAINTENANCE_OPS and self.op in MAINTENANCE_OPS

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        if self.op:
            kind += f" {self.op}"
        try:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))
        except (ValueError, OverflowError, OSError):
            when = f"time {self.time!r} (not a real time)"
        return (
            f"{kind} lock {self.lock_id[:8]} by {self.user}@{self.host} pid {self.pid} since {when}"
        )


def _parse(lock_id: str, data: bytes) -> LockInfo | None:
    try:
        obj: dict[str, Any] = json.loads(data)
        return LockInfo(
            lock_id,
            str(obj["host"]),
            int(obj["pid"]),
            str(obj.get("user", "")),
            float(obj["time"]),
            float(obj["expires"]),
            bool(obj["exclusive"]),
            str(obj.get("op", "")),
            str(obj.get("boot_id", "")),
            str(obj.get("pidns", "")),
            int(obj.get("start", 0)),
        )
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):
        return None


def list_locks(backend: Backend) -> list[LockInfo]:
    out = []
    for info in backend.list("locks/"):
        lock_id = name_to_id(info.name)
        if not is_hex_id(lock_id):
            continue
        try:
            data = backend.load(info.name)
        except NotFound:
            continue
        parsed = _parse(lock_id, data)
        if parsed is None:
            # stores are atomic, so an unparseable lock is garbage, never one being written
            parsed = LockInfo(lock_id, "?", 0, "?", 0.0, 0.0, False)
        out.append(parsed)
    return out


class RepositoryLock:
    """A held lock; refreshed by a timer until :meth:`release`."""

    def __init__(
        self, backend: Backend, exclusive: bool, op: str = "", clock: Clock = REAL_CLOCK
    ) -> None:
        self.backend = backend
        self.exclusive = exclusive
        self.op = op
        self.clock = clock
        self.lock_id = secrets.token_hex(32)
        self.started = clock.time()
        self._cancel: Any = None
        self._mutex = threading.Lock()
        self.refresh_error: BaseException | None = None
        # when the lock was last written, by both clocks: the lease runs from there
        self.refreshed_wall = 0.0
        self.refreshed_elapsed = 0.0
        self.lost: str | None = None  # set once the lease may have lapsed; never cleared
        self.released = False

    def _payload(self, now: float) -> bytes:
        try:
            user = os.getlogin()
        except OSError:
            user = str(os.getuid())
        return json.dumps(
            {
                "v": 1,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "user": user,
                "time": self.started,
                "refreshed": now,
                "expires": now + LEASE_SECONDS,
                "exclusive": self.exclusive,
                "op": self.op,
                "boot_id": _boot_id(),
                "pidns": _pid_namespace(),
                "start": process_start(os.getpid()) or 0,
            }
        ).encode()

    def acquire(self, retry_s: float = 0.0) -> None:
        """Take the lock; wait up to ``retry_s`` seconds for conflicting locks to go away."""
        deadline = self.clock.elapsed() + retry_s
        delay = 0.5
        while True:
            try:
                self._acquire_once()
                return
            except Locked:
                left = deadline - self.clock.elapsed()
                if left <= 0:
                    raise
                self.clock.sleep(min(delay, left))
                delay = min(delay * 2, 30.0)

    def hold(self) -> None:
        """Store the lock without looking at other locks, and keep refreshing it: for readers,
        which no lock may block. Prune plans wait for it like for any other lock."""
        self.started = self.clock.time()
        self.released = False
        self._write()
        self._cancel = self.clock.every(self.refresh, REFRESH_SECONDS)

    def _write(self) -> None:
        wall, elapsed = self.clock.time(), self.clock.elapsed()
        self.backend.store(lock_name(self.lock_id), self._payload(wall), overwrite=True)
        self.refreshed_wall, self.refreshed_elapsed = wall, elapsed

    def _acquire_once(self) -> None:
        conflicts = self._conflicts()
        if conflicts:
            raise Locked(f"repository is locked: {conflicts[0].describe()}")
        self.started = self.clock.time()
        self.released = False
        self._write()
        self._cancel = self.clock.every(self.refresh, REFRESH_SECONDS)  # the lease runs now
        # someone may have locked at the same moment: check again, back off if we clash
        try:
            conflicts = self._conflicts()
        except BaseException:
            self.release()
            raise
        if conflicts:
            self.release()
            raise Locked(f"repository is locked: {conflicts[0].describe()}")

    def _conflicts(self) -> list[LockInfo]:
        now = self.clock.time()
        return [
            lk
            for lk in list_locks(self.backend)
            if lk.lock_id != self.lock_id
            and not lk.stale(now)
            and lk.conflicts_with(self.exclusive, self.op)
        ]

    def age(self) -> float:
        """Seconds since the lock was last written, by whichever clock says more."""
        return max(
            self.clock.time() - self.refreshed_wall, self.clock.elapsed() - self.refreshed_elapsed
        )

    def refresh(self) -> float:
        """Write the lock again; returns when to refresh next. A refresh that comes too late
        (suspend, a stalled process, failing storage) marks the lock lost for good."""
        with self._mutex:
            if self.released:
                return REFRESH_SECONDS
            gap = self.age()
            if gap > LEASE_SECONDS - SKEW_SECONDS and self.lost is None:
                self.lost = f"not refreshed for {gap:.0f}s"
            try:
                self._write()
                self.refresh_error = None
                return REFRESH_SECONDS
            except SafeholdError as e:
                self.refresh_error = e
                return RETRY_SECONDS

    def check(self) -> None:
        """Raise Locked unless the lease is provably still held, with a refresh period to spare:
        a client that cannot prove it must not commit."""
        age = self.age()
        if self.lost is not None or age > COMMIT_MARGIN:
            why = self.lost or f"not refreshed for {age:.0f}s"
            if self.refresh_error is not None:
                why += f": {self.refresh_error}"
            raise Locked(
                f"lost the repository lock ({why}); nothing was committed, and what was "
                "stored is reused by the next run"
            )

    def held_until_now(self) -> bool:
        """Whether the lease has provably not lapsed at any moment up to now (for a writer that
        has just committed: was the lock still valid while the commit was stored?)."""
        return self.lost is None and self.age() < LEASE_SECONDS - SKEW_SECONDS

    def release(self) -> None:
        with self._mutex:
            self.released = True
        if self._cancel is not None:
            self._cancel()
        with contextlib.suppress(SafeholdError):
            self.backend.delete(lock_name(self.lock_id))


def remove_stale_locks(backend: Backend, clock: Clock = REAL_CLOCK) -> list[LockInfo]:
    """Remove the locks that are provably dead or expired; returns them."""
    removed = []
    now = clock.time()
    for lock in list_locks(backend):
        if lock.stale(now):
            with contextlib.suppress(NotFound):
                backend.delete(lock_name(lock.lock_id))
            removed.append(lock)
    return removed


def reader_lock(backend: Backend, clock: Clock = REAL_CLOCK) -> RepositoryLock | None:
    """A shared lock for a command that only reads (check, restore): stored at once whatever
    other locks exist, foreign exclusive ones included, so that a prune plan made while the
    reader runs waits for it before deleting. None if the storage refuses to store it (a
    read-only mount or credentials): the reader then goes on without, as it must still cope
    with a prune that finishes while it reads."""
    lock = RepositoryLock(backend, False, "", clock)
    try:
        lock.hold()
    except SafeholdError:
        lock.release()
        return None
    return lock


def find_lock(backend: Backend, prefix: str) -> LockInfo:
    """The one lock whose id starts with ``prefix`` (UsageError if none, or several, do)."""
    want = prefix.strip().lower()
    if not want or any(c not in "0123456789abcdef" for c in want):
        raise UsageError(f"{prefix!r} is not a lock id (hexadecimal, as 'unlock' lists them)")
    found = [lk for lk in list_locks(backend) if lk.lock_id.startswith(want)]
    if not found:
        raise UsageError(f"there is no lock with id {want!r}")
    if len(found) > 1:
        raise UsageError(f"lock id prefix {want!r} matches more than one lock: use more digits")
    return found[0]


def remove_lock(backend: Backend, lock_id: str) -> bool:
    """Delete one lock, whoever holds it (``unlock --force``); False if it was gone already.
    A holder that is still running finds its lock gone at its next refresh, which stores it
    again, so only a lock whose holder is really gone stays removed."""
    try:
        backend.delete(lock_name(lock_id))
    except NotFound:
        return False
    return True
