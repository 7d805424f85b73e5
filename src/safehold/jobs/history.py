"""Run history in a local SQLite database (WAL), and the state directory around it.

The state directory (``$SAFEHOLD_STATE_DIR``, ``$XDG_STATE_HOME/safehold`` or
``~/.local/state/safehold``) holds ``history.sqlite``, the job locks (``locks/JOB.lock``, held by
the kernel with ``flock``: a crashed run leaves nothing stale) and each run's log
(``logs/JOB/<start>.log``, the newest ``LOGS_KEPT`` kept per job).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from safehold.errors import SafeholdError


class StateError(SafeholdError):
    """The state directory (history, locks, logs) cannot be used."""


LOGS_KEPT = 30
LOG_TAIL_LINES = 30

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    result TEXT,            -- ok, warning, failed; NULL while running
    exit_code INTEGER,
    trigger TEXT,           -- manual, schedule, catch-up
    message TEXT,
    snapshot TEXT,
    files_new INTEGER,
    files_changed INTEGER,
    bytes_new INTEGER,
    bytes_added INTEGER,
    repository_bytes INTEGER,
    duration_s REAL,
    log_path TEXT,
    log_tail TEXT,
    skipped INTEGER NOT NULL DEFAULT 0  -- 1: the job was already running; nothing was done
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job, started);
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_alert REAL
);
CREATE TABLE IF NOT EXISTS maintenance (
    job TEXT NOT NULL,
    kind TEXT NOT NULL,     -- prune, check
    done REAL NOT NULL,
    PRIMARY KEY (job, kind)
);
"""


def state_dir(configured: Path | None = None) -> Path:
    env = os.environ.get("SAFEHOLD_STATE_DIR")
    if env:
        path = Path(env)
    elif configured is not None:
        path = configured
    else:
        path = Path(platformdirs.user_state_dir("safehold"))
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)  # logs and history name paths and hosts: private
    return path


@dataclass
class Run:
    id: int
    job: str
    started: float
    ended: float | None = None
    result: str | None = None
    exit_code: int | None = None
    trigger: str | None = None
    message: str | None = None
    snapshot: str | None = None
    files_new: int | None = None
    files_changed: int | None = None
    bytes_new: int | None = None
    bytes_added: int | None = None
    repository_bytes: int | None = None
    duration_s: float | None = None
    log_path: str | None = None
    log_tail: list[str] = field(default_factory=list)
    skipped: bool = False

    def as_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["started"] = rfc3339(self.started)
        d["ended"] = rfc3339(self.ended)
        return d


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).astimezone().isoformat(timespec="seconds")


_FIELDS = [
    "id",
    "job",
    "started",
    "ended",
    "result",
    "exit_code",
    "trigger",
    "message",
    "snapshot",
    "files_new",
    "files_changed",
    "bytes_new",
    "bytes_added",
    "repository_bytes",
    "duration_s",
    "log_path",
    "log_tail",
    "skipped",
]


def _run(row: tuple[Any, ...]) -> Run:
    d = dict(zip(_FIELDS, row, strict=True))
    d["log_tail"] = (d["log_tail"] or "").splitlines()
    d["skipped"] = bool(d["skipped"])
    return Run(**d)


class History:
    """The run history of one state directory. Each call opens its own short transaction;
    several processes (daemon, ``run``, ``jobs``) share the database safely."""

    def __init__(self, root: Path | str) -> None:
        root = Path(root)
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = root / "history.sqlite"
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA busy_timeout=30000")
            self.db.executescript(_SCHEMA)
            cols = {row[1] for row in self.db.execute("PRAGMA table_info(runs)")}
            if "skipped" not in cols:  # a database of an earlier development version
                self.db.execute("ALTER TABLE runs ADD COLUMN skipped INTEGER NOT NULL DEFAULT 0")
        except sqlite3.Error as e:
            raise StateError(
                f"the run history {self.path} cannot be used: {e} (if it is damaged, move it "
                "away: a new one is started)"
            ) from None
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    def close(self) -> None:
        self.db.close()

    def seen(self, job: str, now: float) -> float:
        """Record the job's first appearance (if new); returns when it was first seen."""
        self.db.execute("INSERT OR IGNORE INTO jobs (job, first_seen) VALUES (?, ?)", (job, now))
        row = self.db.execute("SELECT first_seen FROM jobs WHERE job = ?", (job,)).fetchone()
        return float(row[0])

    def last_alert(self, job: str) -> float | None:
        row = self.db.execute("SELECT last_alert FROM jobs WHERE job = ?", (job,)).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def set_last_alert(self, job: str, when: float) -> None:
        self.db.execute("UPDATE jobs SET last_alert = ? WHERE job = ?", (when, job))

    def start(self, job: str, started: float, trigger: str, log_path: str | None) -> int:
        cur = self.db.execute(
            "INSERT INTO runs (job, started, trigger, log_path) VALUES (?, ?, ?, ?)",
            (job, started, trigger, log_path),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def finish(self, run_id: int, **values: Any) -> None:
        if "log_tail" in values and isinstance(values["log_tail"], list):
            values["log_tail"] = "\n".join(values["log_tail"])
        cols = ", ".join(f"{k} = ?" for k in values)
        self.db.execute(f"UPDATE runs SET {cols} WHERE id = ?", (*values.values(), run_id))

    def runs(self, job: str | None = None, limit: int = 50) -> list[Run]:
        q = f"SELECT {', '.join(_FIELDS)} FROM runs"
        args: tuple[Any, ...] = ()
        if job is not None:
            q += " WHERE job = ?"
            args = (job,)
        q += " ORDER BY started DESC, id DESC LIMIT ?"
        return [_run(r) for r in self.db.execute(q, (*args, limit))]

    def last(self, job: str, *, finished: bool = True, skipped: bool = False) -> Run | None:
        """The job's latest run: by default finished and not a skipped overlap."""
        q = f"SELECT {', '.join(_FIELDS)} FROM runs WHERE job = ?"
        if finished:
            q += " AND result IS NOT NULL"
        if not skipped:
            q += " AND skipped = 0"
        row = self.db.execute(q + " ORDER BY started DESC, id DESC LIMIT 1", (job,)).fetchone()
        return None if row is None else _run(row)

    def last_success(self, job: str) -> Run | None:
        q = (
            f"SELECT {', '.join(_FIELDS)} FROM runs WHERE job = ? AND skipped = 0 "
            "AND result IN ('ok', 'warning')"
        )
        row = self.db.execute(q + " ORDER BY started DESC LIMIT 1", (job,)).fetchone()
        return None if row is None else _run(row)

    def close_unfinished(self, job: str, now: float) -> int:
        """Mark the job's runs that never finished (killed, crashed, powered off) as failed.
        Call only while holding the job's lock: no run of it is alive then."""
        cur = self.db.execute(
            "UPDATE runs SET result = 'failed', exit_code = 2, ended = COALESCE(ended, ?), "
            "message = 'interrupted: the run ended without finishing (killed, crashed or "
            "powered off)' WHERE job = ? AND result IS NULL",
            (now, job),
        )
        return cur.rowcount

    def maintenance_done(self, job: str, kind: str) -> float | None:
        row = self.db.execute(
            "SELECT done FROM maintenance WHERE job = ? AND kind = ?", (job, kind)
        ).fetchone()
        return None if row is None else float(row[0])

    def set_maintenance_done(self, job: str, kind: str, when: float) -> None:
        self.db.execute(
            "INSERT INTO maintenance (job, kind, done) VALUES (?, ?, ?) "
            "ON CONFLICT (job, kind) DO UPDATE SET done = excluded.done",
            (job, kind, when),
        )


class JobLock:
    """A job's lock: an exclusive ``flock`` on ``locks/JOB.lock``. The kernel drops it when the
    process ends however it ends, so it never goes stale."""

    def __init__(self, root: Path, job: str) -> None:
        d = root / "locks"
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = d / f"{job}.lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def running(self) -> bool:
        """Whether a run of the job holds the lock now (a probe: takes and drops it)."""
        if self.fd is not None:
            return True
        if not self.acquire():
            return True
        self.release()
        return False

    def holder(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return "?"

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunLog:
    """One run's log file; keeps the last lines for the history and alerts."""

    def __init__(self, root: Path, job: str, started: float) -> None:
        (root / "logs").mkdir(exist_ok=True, mode=0o700)
        d = root / "logs" / job
        d.mkdir(exist_ok=True, mode=0o700)
        stamp = dt.datetime.fromtimestamp(started).strftime("%Y%m%d-%H%M%S")
        path = d / f"{stamp}.log"
        n = 1
        while path.exists():
            path = d / f"{stamp}-{n}.log"
            n += 1
        self.path = path
        self.file = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
        os.chmod(path, 0o600)
        self.tail: list[str] = []
        self.secrets: list[str] = []  # replaced by *** in every line written after they are known
        _rotate(d)

    def write(self, text: str) -> None:
        stamp = dt.datetime.now().strftime("%H:%M:%S")
        for secret in self.secrets:
            text = text.replace(secret, "***")
        for line in text.splitlines() or [""]:
            self.file.write(f"{stamp} {line}\n")
            self.tail.append(line)
        self.file.flush()
        del self.tail[:-LOG_TAIL_LINES]

    def close(self) -> None:
        self.file.close()


def _rotate(d: Path) -> None:
    logs = sorted(d.glob("*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:-LOGS_KEPT]:
        with contextlib.suppress(OSError):
            old.unlink()


@contextlib.contextmanager
def open_history(root: Path) -> Iterator[History]:
    h = History(root)
    try:
        yield h
    finally:
        h.close()
