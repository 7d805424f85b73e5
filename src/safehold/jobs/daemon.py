"""The daemon: runs every scheduled job on its own schedule, in the foreground.

Jobs run one at a time, oldest due first. After sleep or downtime a job whose scheduled time
passed since it last ran (or since it first appeared) runs once, not once per missed time. The
wall clock is read again at least every ``TICK_S`` seconds, so a suspend or a clock change is
noticed. ``reload`` (set on SIGHUP) makes it read the jobs file again (a broken file is reported
and the old one kept); ``stop`` (SIGTERM) stops the running job at a safe point and returns.
The dead man's switch is checked every tick.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safehold.errors import UsageError
from safehold.jobs.config import Config, JobConfig, load_config
from safehold.jobs.history import History
from safehold.jobs.runner import Outcome, Runner
from safehold.jobs.schedule import local_zone

TICK_S = 60.0


@dataclass
class _Due:
    job: str
    at: float  # when it is due (scheduled time plus its random delay)
    scheduled: float
    catch_up: bool


class Daemon:
    def __init__(
        self,
        config_path: Path | None,
        state: Path,
        *,
        cache_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
        reload: threading.Event | None = None,
        say: Callable[[str], None] = lambda s: None,
        metrics_file: Path | None = None,
        tick_s: float = TICK_S,
        rng: random.Random | None = None,
    ) -> None:
        self.config_path = config_path
        self.state = state
        self.cache_dir = cache_dir
        self.clock = clock
        self.stop = stop or threading.Event()
        self.reload = reload or threading.Event()
        self.say = say
        self.metrics_file = metrics_file
        self.tick_s = tick_s
        self.rng = rng or random.Random()
        self.config: Config = load_config(config_path)
        self.outcomes: list[Outcome] = []
        self._next: dict[str, _Due] = {}

    def runner(self) -> Runner:
        return Runner(
            self.config,
            self.state,
            cache_dir=self.cache_dir,
            clock=self.clock,
            stop=self.stop,
            say=self.say,
            metrics_file=self.metrics_file,
        )

    def _tz(self) -> dt.tzinfo:
        return local_zone()

    def _plan(self, job: JobConfig, history: History, now: float) -> _Due | None:
        """When the job runs next: once now if a scheduled time passed since its last run (or
        its first appearance), else at its next scheduled time."""
        if job.schedule is None:
            return None
        first = history.seen(job.name, now)
        last = history.last(job.name, finished=False)
        since = max(first, last.started if last else first)
        tz = self._tz()
        now_dt = dt.datetime.fromtimestamp(now, tz)
        prev = job.schedule.previous_before(now_dt)
        if prev is not None and prev.timestamp() > since:
            return _Due(job.name, now, prev.timestamp(), True)
        nxt = job.schedule.next_after(now_dt).timestamp()
        delay = self.rng.uniform(0, job.random_delay_s) if job.random_delay_s else 0.0
        return _Due(job.name, nxt + delay, nxt, False)

    def _replan(self) -> None:
        history = History(self.state)
        try:
            now = self.clock()
            self._next = {}
            for job in self.config.jobs.values():
                due = self._plan(job, history, now)
                if due is not None:
                    self._next[job.name] = due
        finally:
            history.close()

    def _reload(self) -> None:
        self.reload.clear()
        try:
            self.config = load_config(self.config_path)
        except UsageError as e:
            self.say(f"reload failed, keeping the previous jobs: {e}")
            return
        self.say(f"reloaded {self.config.path}: {len(self.config.jobs)} jobs")
        self._replan()

    def next_runs(self) -> dict[str, float]:
        return {name: d.at for name, d in self._next.items()}

    def run(self, *, max_runs: int | None = None) -> list[Outcome]:
        """Run until ``stop`` is set (or ``max_runs`` jobs ran: for tests)."""
        self._replan()
        scheduled = sum(1 for j in self.config.jobs.values() if j.schedule is not None)
        self.say(f"daemon started: {scheduled} scheduled jobs of {len(self.config.jobs)}")
        for name, d in sorted(self._next.items(), key=lambda kv: kv[1].at):
            when = dt.datetime.fromtimestamp(d.at).strftime("%Y-%m-%d %H:%M")
            self.say(f"{name}: {'catching up now' if d.catch_up else 'next run ' + when}")
        while not self.stop.is_set():
            if self.reload.is_set():
                self._reload()
            self.runner().check_overdue()
            now = self.clock()
            due = sorted((d for d in self._next.values() if d.at <= now), key=lambda d: d.at)
            if due:
                d = due[0]
                job = self.config.jobs[d.job]
                trigger = "catch-up" if d.catch_up else "schedule"
                out = self.runner().run_job(job, trigger=trigger)
                self.outcomes.append(out)
                if self.stop.is_set():
                    break
                nxt = self._plan_after(job, self.clock())
                if nxt is not None:
                    self._next[job.name] = nxt
                if max_runs is not None and len(self.outcomes) >= max_runs:
                    break
                continue
            wait = self.tick_s
            if self._next:
                wait = min(wait, max(0.0, min(d.at for d in self._next.values()) - now))
            self._wait(wait)
        self.say("daemon stopped")
        return self.outcomes

    def _plan_after(self, job: JobConfig, now: float) -> _Due | None:
        """After a run: the next scheduled time after now (no catch-up of what passed while it
        ran: one run covers them)."""
        if job.schedule is None:
            return None
        nxt = job.schedule.next_after(dt.datetime.fromtimestamp(now, self._tz())).timestamp()
        delay = self.rng.uniform(0, job.random_delay_s) if job.random_delay_s else 0.0
        return _Due(job.name, nxt + delay, nxt, False)

    def _wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking at once on stop or reload."""
        end = time.monotonic() + seconds
        while not self.stop.is_set() and not self.reload.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            self.stop.wait(min(left, 0.5))
