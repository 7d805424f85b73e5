"""Repository locks: leases with an expiry, refreshed while the process runs.

A lock is ``locks/<random id>`` holding JSON (docs/format.md, "Locks"). It is stale when its
lease has expired, or at once when it was taken on this host by a process that no longer exists.
Shared locks (backup, check, restore) coexist; an exclusive lock excludes every other lock; two
locks of the same exclusive operation (``op``: "prune") exclude each other.
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
from typing import Any

from safehold.backends.base import Backend
from safehold.errors import Locked, NotFound, SafeholdError
from safehold.ids import lock_name, name_to_id

LEASE_SECONDS = 300.0
REFRESH_SECONDS = 60.0


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

    def stale(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        if self.expires < now:
            return True
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def describe(self) -> str:
        kind = "exclusive" if self.exclusive else "shared"
        if self.op:
            kind += f" {self.op}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.time))
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
        )
    except (ValueError, KeyError, TypeError):
        return None


def list_locks(backend: Backend) -> list[LockInfo]:
    out = []
    for info in backend.list("locks/"):
        lock_id = name_to_id(info.name)
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
    """A held lock; refreshed by a daemon thread until :meth:`release`."""

    def __init__(self, backend: Backend, exclusive: bool, op: str = "") -> None:
        self.backend = backend
        self.exclusive = exclusive
        self.op = op
        self.lock_id = secrets.token_hex(32)
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refresh_error: BaseException | None = None
        self.refreshed = 0.0  # monotonic time of the last successful write of the lock

    def _payload(self) -> bytes:
        try:
            user = os.getlogin()
        except OSError:
            user = str(os.getuid())
        now = time.time()
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
            }
        ).encode()

    def acquire(self, retry_s: float = 0.0) -> None:
        """Take the lock; wait up to ``retry_s`` seconds for conflicting locks to go away."""
        deadline = time.monotonic() + retry_s
        delay = 0.5
        while True:
            try:
                self._acquire_once()
                return
            except Locked:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                time.sleep(min(delay, left))
                delay = min(delay * 2, 30.0)

    def _acquire_once(self) -> None:
        conflicts = self._conflicts()
        if conflicts:
            raise Locked(f"repository is locked: {conflicts[0].describe()}")
        self.backend.store(lock_name(self.lock_id), self._payload(), overwrite=True)
        self.refreshed = time.monotonic()
        # someone may have locked at the same moment: check again, back off if we clash
        conflicts = self._conflicts()
        if conflicts:
            with contextlib.suppress(SafeholdError):
                self.backend.delete(lock_name(self.lock_id))
            raise Locked(f"repository is locked: {conflicts[0].describe()}")
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True)
        self._thread.start()

    def _conflicts(self) -> list[LockInfo]:
        out = []
        for lock in list_locks(self.backend):
            if lock.lock_id == self.lock_id or lock.stale():
                continue
            if self.exclusive or lock.exclusive or (self.op and self.op == lock.op):
                out.append(lock)
        return out

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                self.backend.store(lock_name(self.lock_id), self._payload(), overwrite=True)
                self.refreshed = time.monotonic()
                self.refresh_error = None
            except SafeholdError as e:
                self.refresh_error = e

    def check(self) -> None:
        """Raise Locked unless the lease is provably still held (its last refresh is younger
        than the lease, with a margin): a client that cannot prove it must not commit."""
        age = time.monotonic() - self.refreshed
        if age > LEASE_SECONDS - REFRESH_SECONDS:
            why = f": {self.refresh_error}" if self.refresh_error else ""
            raise Locked(
                f"lost the repository lock (not refreshed for {age:.0f}s{why}); "
                "nothing was committed, and what was stored is reused by the next run"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(SafeholdError):
            self.backend.delete(lock_name(self.lock_id))


def remove_stale_locks(backend: Backend) -> list[LockInfo]:
    """Remove the locks that are provably dead or expired; returns them."""
    removed = []
    for lock in list_locks(backend):
        if lock.stale():
            with contextlib.suppress(NotFound):
                backend.delete(lock_name(lock.lock_id))
            removed.append(lock)
    return removed
