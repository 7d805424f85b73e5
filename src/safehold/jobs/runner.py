"""Running a job: before hook, backup, forget and (when due) prune and check, copy and mirror,
after hook; then history, alerts, health-check pings and metrics.

A job's result is ``ok`` (exit 0), ``warning`` (1: e.g. files that could not be read, a run
skipped because the job was already running) or ``failed`` (2). Every step writes to the run's
log; the history keeps the log's last lines. An alert that cannot be delivered is logged and
does not change the job's result.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safehold.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_WARNINGS,
    Interrupted,
    SafeholdError,
)
from safehold.events import Event
from safehold.jobs import notify
from safehold.jobs.config import Config, JobConfig
from safehold.jobs.history import History, JobLock, RunLog
from safehold.ops import options as oo
from safehold.ops.access import open_repository
from safehold.ops.backup import backup
from safehold.ops.check import check
from safehold.ops.forget import ForgetOptions, forget, plan_forget
from safehold.ops.prune import prune
from safehold.ops.shell import run_shell
from safehold.repository.locks import reader_lock
from safehold.repository.repo import Repository
from safehold.units import format_size

RESULT_CODE = {"ok": EXIT_OK, "warning": EXIT_WARNINGS, "failed": EXIT_ERROR}
NOTIFY_KIND = {"ok": "success", "warning": "warning", "failed": "failure"}
JOB_TAG_PREFIX = "job:"


def job_tag(name: str) -> str:
    """The tag every snapshot of a job carries; retention and copies select by it."""
    return JOB_TAG_PREFIX + name


@dataclass
class Outcome:
    job: str
    result: str  # ok, warning, failed
    message: str = ""
    snapshot: str | None = None
    log_path: str | None = None
    duration_s: float = 0.0
    alerts_failed: list[str] = field(default_factory=list)
    interrupted: bool = False  # stopped by SIGTERM/SIGINT (not by its timeout): no alert

    @property
    def exit_code(self) -> int:
        return RESULT_CODE[self.result]


class _JobFailed(Exception):
    pass


class _Step:
    """The state of one run: its log, warnings, what failed first."""

    def __init__(self, log: RunLog) -> None:
        self.log = log
        self.warnings: list[str] = []
        self.failure: str | None = None
        self.values: dict[str, Any] = {}
        self.secrets: list[str] = log.secrets  # the passwords read: never in logs or alerts

    def warn(self, text: str) -> None:
        self.warnings.append(text)
        self.log.write(f"warning: {text}")

    def fail(self, text: str) -> None:
        if self.failure is None:
            self.failure = text
        self.log.write(f"error: {text}")

    def events(self, ev: Event) -> None:
        if ev.kind == "progress":
            return
        if ev.kind == "warning":
            self.warn(ev.message)
        elif ev.message:
            self.log.write(f"{ev.kind}: {ev.message}" if ev.kind != "info" else ev.message)


class Runner:
    """Runs jobs of a config. ``clock`` gives the time (injectable in tests); ``stop`` stops a
    running job at a safe point (SIGTERM); ``say`` receives one-line progress for the user."""

    def __init__(
        self,
        config: Config,
        state: Path | str,
        *,
        cache_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        stop: threading.Event | None = None,
        say: Callable[[str], None] = lambda s: None,
        metrics_file: Path | None = None,
        host: str | None = None,
    ) -> None:
        self.config = config
        self.state = Path(state)
        self.cache_dir = cache_dir
        self.clock = clock
        self.stop = stop or threading.Event()
        self.say = say
        self.metrics_file = metrics_file or config.metrics_file
        self.host = host or socket.gethostname()
        self._job_stop: threading.Event | None = None

    # -- the whole run --------------------------------------------------------------------

    def run(self, names: list[str] | None = None, *, trigger: str = "manual") -> list[Outcome]:
        from safehold.errors import UsageError

        names = names or list(self.config.jobs)
        unknown = [n for n in names if n not in self.config.jobs]
        if unknown:
            raise UsageError(
                f"no job named {unknown[0]!r} in {self.config.path} "
                f"(jobs: {', '.join(self.config.jobs) or 'none'})"
            )
        out = []
        for name in names:
            if self.stop.is_set():
                break
            out.append(self.run_job(self.config.jobs[name], trigger=trigger))
        return out

    def run_job(self, job: JobConfig, *, trigger: str = "manual") -> Outcome:
        history = History(self.state)
        try:
            return self._run_job(history, job, trigger)
        finally:
            history.close()

    def _run_job(self, history: History, job: JobConfig, trigger: str) -> Outcome:
        started = self.clock()
        history.seen(job.name, started)
        lock = JobLock(self.state, job.name)
        if not lock.acquire():
            msg = f"skipped: job {job.name} is already running (pid {lock.holder()})"
            rid = history.start(job.name, started, trigger, None)
            history.finish(
                rid,
                ended=started,
                result="warning",
                exit_code=EXIT_WARNINGS,
                message=msg,
                skipped=1,
                duration_s=0.0,
            )
            self.say(f"{job.name}: {msg}")
            out = Outcome(job.name, "warning", msg)
            self._alert(job, out, [], started, 0.0)
            return out
        history.close_unfinished(job.name, started)  # we hold the lock: none of them is alive
        log = RunLog(self.state, job.name, started)
        rid = history.start(job.name, started, trigger, str(log.path))
        step = _Step(log)
        step.secrets.extend(self._known_secrets(job))
        job_stop = threading.Event()
        self._job_stop = job_stop
        done = threading.Event()
        timed_out = threading.Event()

        def watch() -> None:
            deadline = None if job.timeout_s is None else time.monotonic() + job.timeout_s
            while not done.is_set():
                if self.stop.is_set():
                    job_stop.set()
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out.set()
                    job_stop.set()
                    return
                done.wait(0.1)

        watcher = threading.Thread(target=watch, name=f"watch-{job.name}", daemon=True)
        watcher.start()
        log.write(f"job {job.name} started ({trigger}) on {self.host}")
        if job.healthcheck:
            notify.ping(job.healthcheck, "start", log=log.write)
        try:
            self._steps(history, job, step, job_stop)
        except _JobFailed:
            pass
        except Interrupted:
            step.fail("stopped at a safe point" + ("" if timed_out.is_set() else " (a signal)"))
        except SafeholdError as e:
            step.fail(str(e))
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            step.fail(f"{e.strerror or e}{where}")
        except Exception as e:  # a bug: recorded, alerted, never silent
            step.fail(f"internal error: {type(e).__name__}: {e}")
        finally:
            done.set()
        if timed_out.is_set():
            why = f"timed out after {job.timeout_s:g}s"
            step.failure = f"{why}: {step.failure}" if step.failure else why
            step.log.write(f"error: {why}")
        result = "failed" if step.failure else "warning" if step.warnings else "ok"
        # the after hooks see the result
        hooks = job.hooks.on_failure if result == "failed" else job.hooks.after
        which = "on_failure" if result == "failed" else "after"
        for cmd in hooks:
            ok = self._hook(cmd, job, step, result, which, job_stop if result != "failed" else None)
            if not ok and result != "failed":
                result = "failed"
                # a failing after hook is the job's failure: its on_failure hooks run too
                for fcmd in job.hooks.on_failure:
                    self._hook(fcmd, job, step, result, "on_failure", None)
                break
        ended = self.clock()
        duration = max(0.0, ended - started)
        message = step.failure or (
            f"{len(step.warnings)} warnings: {step.warnings[0]}" if step.warnings else "ok"
        )
        log.write(f"job {job.name} {result}: {message} ({duration:.1f}s)")
        v = step.values
        tail = list(log.tail)  # what alerts and pings carry: the run's own lines
        out = Outcome(job.name, result, message, v.get("snapshot"), str(log.path), duration)
        out.interrupted = self.stop.is_set() and not timed_out.is_set()
        self.say(f"{job.name}: {result}: {message}")
        # alerts and pings before the log is closed: one that fails is in the run's log too
        if job.healthcheck:
            kind = "fail" if result == "failed" else "success"
            body = notify.scrub("\n".join(tail), step.secrets)
            notify.ping(job.healthcheck, kind, body=body, log=self._say_and_log(job, log))
        if out.interrupted:
            log.write("stopped by a signal (a shutdown?): no alert sent")
        else:
            out.alerts_failed = self._alert(
                job, out, tail, started, duration, step.secrets, self._say_and_log(job, log)
            )
        log.close()
        lock.release()
        history.finish(
            rid,
            ended=ended,
            result=result,
            exit_code=RESULT_CODE[result],
            message=notify.scrub(message, step.secrets),
            snapshot=v.get("snapshot"),
            files_new=v.get("files_new"),
            files_changed=v.get("files_changed"),
            bytes_new=v.get("bytes_new"),
            bytes_added=v.get("bytes_added"),
            repository_bytes=v.get("repository_bytes"),
            duration_s=duration,
            log_tail=[notify.scrub(line, step.secrets) for line in log.tail],
        )
        self.write_metrics(history)
        return out

    def _known_secrets(self, job: JobConfig) -> list[str]:
        """What must never appear in the run's log, history or alerts, known before anything
        runs: passwords in the URLs the job uses, and the passwords that can be read without
        side effects (environment variables, files). A password command's output is added
        when it is run."""
        found: list[str] = []
        names = [job.repository, *job.copy_to, *job.mirror_to]
        for name in names:
            rc = self.config.repositories.get(name)
            if rc is None:  # a mirror URL
                found += url_secrets(name)
                continue
            found += url_secrets(rc.url)
            found += [v for k, v in rc.options.items() if _SECRET_NAME.search(k) and v]
            pw: bytes | None = None
            if rc.password.env:
                pw = os.environ.get(rc.password.env, "").encode()
            elif rc.password.file:
                with contextlib.suppress(OSError), open(rc.password.file, "rb") as f:
                    pw = f.read(4096).rstrip(b"\r\n")
            if pw:
                with contextlib.suppress(UnicodeDecodeError):
                    found.append(pw.decode())
        return [s for s in dict.fromkeys(found) if len(s) >= 4]

    def _say_and_log(self, job: JobConfig, log: RunLog) -> Callable[[str], None]:
        def say(text: str) -> None:
            self.say(f"{job.name}: {text}")
            log.write(text)

        return say

    def _say_for(self, job: JobConfig) -> Callable[[str], None]:
        return lambda text: self.say(f"{job.name}: {text}")

    # -- the steps ------------------------------------------------------------------------

    def _steps(self, history: History, job: JobConfig, step: _Step, stop: threading.Event) -> None:
        for cmd in job.hooks.before:
            if not self._hook(cmd, job, step, "running", "before", stop):
                raise _JobFailed
        if job.command is None:
            for src in job.sources:
                path = os.path.expanduser(src)
                if not os.path.lexists(path):
                    step.fail(f"source {path} does not exist")
                    raise _JobFailed
                if not os.path.exists(path):  # a symlink to nothing: an unmounted disk?
                    target = os.readlink(path)
                    step.fail(f"source {path} is a symlink to {target}, which is missing")
                    raise _JobFailed
        rc = self.config.repositories[job.repository]
        repo = self._open(rc.name, step)
        try:
            self._backup(job, repo, step, stop)
            if stop.is_set():
                raise Interrupted("stopped")
            if job.retention is not None:
                self._forget(job, repo, step)
            now = self.clock()
            if job.prune is not None and self._due(history, job, "prune", job.prune.every_s, now):
                self._prune(job, repo, step)
                if step.failure is None:
                    history.set_maintenance_done(job.name, "prune", now)
            check_due = job.check is not None and self._due(
                history, job, "check", job.check.every_s, now
            )
            if check_due and self._check(job, repo, step):
                history.set_maintenance_done(job.name, "check", now)
            with contextlib.suppress(SafeholdError, OSError):
                step.values["repository_bytes"] = sum(o.size for o in repo.backend.list("data/"))
            for target in job.copy_to:
                if stop.is_set():
                    raise Interrupted("stopped")
                self._copy(job, repo, target, step, stop)
            for target in job.mirror_to:
                if stop.is_set():
                    raise Interrupted("stopped")
                self._mirror(job, repo, target, step, stop)
        finally:
            with contextlib.suppress(SafeholdError, OSError):
                repo.save_damage()
            repo.close()
        if step.failure is not None:
            raise _JobFailed

    def _host(self, job: JobConfig, step: _Step) -> str:
        """The host the job's snapshots carry (retention and copies select by it)."""
        return str(step.values.get("host") or job.backup.get("host") or self.host)

    def _open(self, name: str, step: _Step) -> Repository:
        rc = self.config.repositories[name]

        def password() -> bytes:
            pw = rc.password.get(timeout_s=PASSWORD_TIMEOUT_S, stop=self._job_stop)
            with contextlib.suppress(UnicodeDecodeError):
                if len(pw) >= 4:
                    step.secrets.append(pw.decode())
            return pw

        return open_repository(rc.spec(self.cache_dir), password=password)

    def _due(self, history: History, job: JobConfig, kind: str, every_s: float, now: float) -> bool:
        last = history.maintenance_done(job.name, kind)
        return last is None or every_s <= 0 or now - last >= every_s - 60

    def _backup(self, job: JobConfig, repo: Repository, step: _Step, stop: threading.Event) -> None:
        given = dict(job.backup)
        given["tag"] = [*oo.convert(oo.by_name(oo.BACKUP_OPTS)["tag"], given.get("tag", []))]
        given["tag"].append(job_tag(job.name))
        if job.command is not None:
            opts = oo.backup_options(
                given, stdin_command=job.command, stdin_filename=job.stdin_filename
            )
            what = f"the output of {job.command!r} as {job.stdin_filename}"
        else:
            paths = [os.path.expanduser(s) for s in job.sources]
            opts = oo.backup_options(given, paths=paths)
            what = ", ".join(paths)
        step.log.write(f"backup of {what} to {repo.backend.location}")
        res = backup(repo, opts, events=step.events, stop=stop)
        s = res.summary
        if res.snapshot is not None:
            step.values["snapshot"] = res.snapshot.id
            step.values["host"] = res.snapshot.host
        step.values.update(
            files_new=s.get("files_new"),
            files_changed=s.get("files_changed"),
            bytes_new=s.get("data_added"),
            bytes_added=s.get("data_added_stored"),
        )
        step.log.write(
            f"snapshot {res.snapshot.id[:8] if res.snapshot else '-'}: "
            f"{s.get('files_new', 0)} new, {s.get('files_changed', 0)} changed, "
            f"{s.get('files_unmodified', 0)} unmodified files; added "
            f"{format_size(s.get('data_added_stored', 0))}"
        )

    def _forget(self, job: JobConfig, repo: Repository, step: _Step) -> None:
        assert job.retention is not None
        policy, allow_empty = oo.retention_policy(job.retention)
        host = self._host(job, step)
        plan = plan_forget(
            repo,
            ForgetOptions(
                policy=policy, host=host, tags=[job_tag(job.name)], allow_empty=allow_empty
            ),
            now=dt.datetime.fromtimestamp(self.clock()).astimezone(),
        )
        removed = forget(repo, plan, events=step.events) if plan.remove else []
        mine = [k for k in plan.keep if job_tag(job.name) in k.tags and k.host == host]
        step.log.write(f"forget: kept {len(mine)}, removed {len(removed)} snapshots of the job")

    def _prune(self, job: JobConfig, repo: Repository, step: _Step) -> None:
        assert job.prune is not None
        _, res = prune(repo, oo.prune_options(job.prune.options), events=step.events)
        step.log.write(
            f"prune: deleted {res.deleted_packs} packs, freed {format_size(res.deleted_bytes)}"
            + (f"; {res.plans_waiting} plans wait" if res.plans_waiting else "")
        )
        if res.kept_unreadable or res.unreadable:
            step.warn("prune found unreadable objects (run check)")

    def _check(self, job: JobConfig, repo: Repository, step: _Step) -> bool:
        assert job.check is not None
        opts = oo.check_options(job.check.options)
        if self.cache_dir is not None:
            opts.state_file = self.cache_dir / repo.config.repo_id.hex() / "check-subset.json"
        lock = reader_lock(repo.backend, repo.clock)
        try:
            res = check(repo, opts, events=step.events, stop=self._job_stop)
        finally:
            if lock is not None:
                lock.release()
        step.log.write(
            f"check: {res.snapshots} snapshots, {res.packs} packs, read {res.packs_read}"
            + (f" ({res.coverage:.0%} of this cycle)" if opts.subset else "")
        )
        for e in res.errors:
            step.log.write(f"damage: {e}")
        if res.errors:
            step.fail(f"check found {len(res.errors)} problems: {res.errors[0]}")
            return False
        return True

    def _copy(
        self, job: JobConfig, repo: Repository, target: str, step: _Step, stop: threading.Event
    ) -> None:
        from safehold.ops.copy import CopyOptions, copy_snapshots

        try:
            dst = self._open(target, step)
        except SafeholdError as e:
            step.fail(f"copy to {target}: {e}")
            return
        try:
            host = self._host(job, step)
            res = copy_snapshots(
                repo,
                dst,
                CopyOptions(host=host, tags=[job_tag(job.name)]),
                events=step.events,
                stop=stop,
            )
            step.log.write(
                f"copy to {target}: {len(res.copied)} snapshots copied, {len(res.skipped)} "
                f"there already; added {format_size(res.data_added_stored)}"
            )
            for sid, why in res.failed.items():
                step.fail(f"copy to {target}: snapshot {sid[:8]} not copied: {why}")
        except Interrupted:
            raise
        except SafeholdError as e:
            step.fail(f"copy to {target}: {e}")
        finally:
            dst.close()

    def _mirror(
        self, job: JobConfig, repo: Repository, target: str, step: _Step, stop: threading.Event
    ) -> None:
        from safehold.backends.registry import open_backend
        from safehold.ops.mirror import MirrorOptions, mirror

        rc = self.config.repositories.get(target)
        url, options = (rc.url, rc.options) if rc is not None else (target, {})
        try:
            dst = open_backend(url, options)
            try:
                res = mirror(repo.backend, dst, MirrorOptions(), events=step.events, stop=stop)
            finally:
                dst.close()  # an rclone target runs a process of its own
            step.log.write(
                f"mirror to {notify.redact(url)}: {res.copied} objects copied "
                f"({format_size(res.bytes_copied)}), {res.skipped} there already"
            )
            for name, why in res.failed.items():
                step.fail(f"mirror to {notify.redact(url)}: {name}: {why}")
        except Interrupted:
            raise
        except SafeholdError as e:
            step.fail(f"mirror to {notify.redact(url)}: {e}")

    # -- hooks --------------------------------------------------------------------------------

    def _hook(
        self,
        cmd: str,
        job: JobConfig,
        step: _Step,
        result: str,
        which: str,
        stop: threading.Event | None,
    ) -> bool:
        env = dict(os.environ)
        env.update(
            SAFEHOLD_JOB=job.name,
            SAFEHOLD_HOOK=which,
            SAFEHOLD_RESULT=result,
            SAFEHOLD_LOG=str(step.log.path),
            SAFEHOLD_EXIT_CODE=str(RESULT_CODE.get(result, 0)),
            SAFEHOLD_MESSAGE=step.failure or "",
            SAFEHOLD_SNAPSHOT=step.values.get("snapshot") or "",
            SAFEHOLD_REPOSITORY=job.repository,
        )
        step.log.write(f"{which} hook: {cmd}")
        # while the run is being stopped (SIGTERM), hooks get a short time: the service manager
        # kills the daemon soon after
        limit = STOPPING_HOOK_TIMEOUT_S if self.stop.is_set() else HOOK_TIMEOUT_S
        try:
            r = run_shell(cmd, env=env, stop=stop, timeout_s=limit)
        except OSError as e:
            step.fail(f"the {which} hook {cmd!r} could not start: /bin/sh: {e}")
            return False
        for line in r.out.decode("utf-8", "replace").splitlines()[-50:]:
            step.log.write(f"  | {line}")
        if r.code == 0:
            return True
        why = f"timed out after {limit:.0f}s" if r.timed_out else r.status()
        step.fail(f"the {which} hook {cmd!r} {why}")
        return False

    # -- alerts and metrics -------------------------------------------------------------------

    def _alert(
        self,
        job: JobConfig,
        out: Outcome,
        tail: list[str],
        started: float,
        duration: float,
        secrets: list[str] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> list[str]:
        if not job.notify or NOTIFY_KIND[out.result] not in job.notify_on:
            return []
        msg = notify.Message(
            job=job.name,
            host=self.host,
            result=out.result,
            summary=out.message,
            log_tail=list(tail),
            log_path=out.log_path,
            started=dt.datetime.fromtimestamp(started).astimezone(),
            duration_s=duration,
            extra={"secrets": list(secrets or [])},
        )
        return notify.send(job.notify, msg, log=say or self._say_for(job))

    def check_overdue(self, names: list[str] | None = None, *, quiet: bool = False) -> list[str]:
        """The dead man's switch: alert for each job that has not succeeded within its
        ``alert_if_no_success`` (timed from its first appearance if it never succeeded).
        Returns the overdue jobs' names (alerted now or earlier in this silence)."""
        history = History(self.state)
        overdue = []
        try:
            now = self.clock()
            for name, job in self.config.jobs.items():
                if names and name not in names:
                    continue
                limit = job.alert_if_no_success_s
                if limit is None:
                    continue
                first = history.seen(name, now)
                last_ok = history.last_success(name)
                last_ok_ts = None if last_ok is None else (last_ok.ended or last_ok.started)
                since = last_ok_ts if last_ok_ts is not None else first
                if now - since < limit:
                    continue
                overdue.append(name)
                never = last_ok_ts is None
                when = dt.datetime.fromtimestamp(since).strftime("%Y-%m-%d %H:%M")
                what = "has never succeeded" if never else f"has not succeeded since {when}"
                summary = f"job {name} {what} (limit {_hours(limit)})"
                if not quiet:
                    self.say(f"{name}: {summary}")
                last_alert = history.last_alert(name)

                def at(ts: float | None) -> dt.datetime | None:
                    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)

                due = notify.overdue(
                    at(now) or dt.datetime.now(dt.UTC),
                    at(first) or dt.datetime.now(dt.UTC),
                    at(last_ok_ts),
                    limit,
                    at(last_alert),
                )
                if not due:
                    continue
                last = history.last(name)
                msg = notify.Message(
                    job=name,
                    host=self.host,
                    result="no-success",
                    summary=summary,
                    log_tail=last.log_tail if last else [],
                    log_path=last.log_path if last else None,
                    started=None,
                    duration_s=None,
                    extra={},
                )
                if quiet:
                    self.say(f"{name}: {summary}")
                failed = notify.send(job.notify, msg, log=self._say_for(job)) if job.notify else []
                if len(failed) < len(job.notify) or not job.notify:
                    history.set_last_alert(name, now)  # delivered somewhere: once per silence
                # else: delivered nowhere; tried again next time
        finally:
            history.close()
        return overdue

    def write_metrics(self, history: History | None = None) -> None:
        if self.metrics_file is None:
            return
        own = history is None
        h = history or History(self.state)
        try:
            rows = []
            for name in self.config.jobs:
                last = h.last(name)
                ok = h.last_success(name)
                rows.append(
                    notify.JobMetrics(
                        job=name,
                        last_success_ts=None if ok is None else (ok.ended or ok.started),
                        last_run_ts=None if last is None else last.started,
                        last_result=None if last is None else last.result,
                        duration_s=None if last is None else last.duration_s,
                        bytes_added=None if last is None else last.bytes_added,
                        repository_bytes=None if last is None else last.repository_bytes,
                        files_new=None if last is None else last.files_new,
                    )
                )
            try:
                notify.write_metrics(self.metrics_file, rows)
            except OSError as e:
                self.say(f"cannot write the metrics file {self.metrics_file}: {e.strerror or e}")
        finally:
            if own:
                h.close()


HOOK_TIMEOUT_S = 6 * 3600.0
PASSWORD_TIMEOUT_S = 120.0
"""A password command that has not answered by then waits for a prompt nobody sees."""
STOPPING_HOOK_TIMEOUT_S = 30.0


def _hours(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:g}s"
    if seconds % 86400 == 0:
        return f"{seconds / 86400:.0f}d"
    if seconds % 3600 == 0:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 60:.0f}m"


_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)


def url_secrets(url: str) -> list[str]:
    """The secrets inside a repository or mirror URL: the password of ``scheme://user:pw@host``,
    secret query values, and the secret parameters of an rclone connection string
    (``rclone::s3,secret_access_key=...:bucket``)."""
    found: list[str] = []
    m = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/@?#]*)@", url)
    if m and ":" in m.group(1):
        pw = m.group(1).split(":", 1)[1]
        found += [pw, urllib.parse.unquote(pw)]
    for name, value in re.findall(r"[,?&;]([A-Za-z0-9_.-]+)=([^,:&;#]+)", url):
        if _SECRET_NAME.search(name):
            found += [value, urllib.parse.unquote(value).strip("'\"")]
    return [s for s in found if s]
