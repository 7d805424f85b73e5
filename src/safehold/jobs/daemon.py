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
        config_path: Path | str | None,
        state: Path | str,
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
        self.config_path = Path(config_path) if config_path is not None else None
        self.state = Path(state)
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
        """Run until ``stop`` is set (or ``max_runs`` jobs ran: for tests). Each due job runs in
        a thread of its own, so a job that hangs delays neither the others nor the dead man's
        switch; a job never runs twice at once. A failure of the daemon's own state (the
        history database locked or its disk full) is reported and tried again next tick."""
        self._replan()
        scheduled = sum(1 for j in self.config.jobs.values() if j.schedule is not None)
        self.say(f"daemon started: {scheduled} scheduled jobs of {len(self.config.jobs)}")
        for name, d in sorted(self._next.items(), key=lambda kv: kv[1].at):
            when = dt.datetime.fromtimestamp(d.at).strftime("%Y-%m-%d %H:%M")
            self.say(f"{name}: {'catching up now' if d.catch_up else 'next run ' + when}")
        running: dict[str, threading.Thread] = {}
        done = threading.Event()  # set whenever a job's run ends
        lock = threading.Lock()

        def run_one(job: JobConfig, trigger: str) -> None:
            try:
                out = self.runner().run_job(job, trigger=trigger)
                with lock:
                    self.outcomes.append(out)
            except Exception as e:  # the history unusable, a bug: said, and tried next time
                self.say(f"{job.name}: could not run: {type(e).__name__}: {e}")
            finally:
                done.set()

        while not self.stop.is_set():
            try:
                if self.reload.is_set():
                    self._reload()
                self.runner().check_overdue(quiet=True)
            except Exception as e:
                self.say(f"daemon: {type(e).__name__}: {e} (trying again in {self.tick_s:g}s)")
            for name in [n for n, t in running.items() if not t.is_alive()]:
                del running[name]
                job = self.config.jobs.get(name)
                if job is not None:
                    nxt = self._plan_after(job, self.clock())
                    if nxt is not None:
                        self._next[name] = nxt
            with lock:
                if max_runs is not None and len(self.outcomes) >= max_runs:
                    break
            now = self.clock()
            for d in sorted(self._next.values(), key=lambda d: d.at):
                if d.at > now or d.job in running or d.job not in self.config.jobs:
                    continue
                trigger = "catch-up" if d.catch_up else "schedule"
                t = threading.Thread(
                    target=run_one,
                    args=(self.config.jobs[d.job], trigger),
                    name=f"safehold-job-{d.job}",
                )
                running[d.job] = t
                t.start()
            pending = [d.at for d in self._next.values() if d.job not in running]
            wait = self.tick_s
            if pending:
                wait = min(wait, max(0.0, min(pending) - now))
            done.clear()
            self._wait(wait, done)
        for t in running.values():  # stopped: each stops at a safe point
            t.join()
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

    def _wait(self, seconds: float, woken: threading.Event) -> None:
        """Sleep up to ``seconds``, waking at once on stop, reload or a job's end."""
        end = time.monotonic() + seconds
        while not (self.stop.is_set() or self.reload.is_set() or woken.is_set()):
            left = end - time.monotonic()
            if left <= 0:
                return
            woken.wait(min(left, 0.2))
