"""config check, run, daemon, jobs: the jobs file and what it runs."""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import threading
import time
from pathlib import Path
from typing import Any

from safehold.cli.common import Context, cache_dir
from safehold.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_WARNINGS, UsageError
from safehold.jobs.config import check_config, load_config
from safehold.jobs.history import History, JobLock, rfc3339, state_dir
from safehold.jobs.schedule import local_zone

RESULT_EXIT = {"ok": EXIT_OK, "warning": EXIT_WARNINGS, "failed": EXIT_ERROR}


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    c = sub.add_parser("config", parents=[parent], help="the jobs file")
    csub = c.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    cc = csub.add_parser(
        "check",
        parents=[parent],
        help="validate the jobs file: syntax, types, schedules, names (every problem, with lines)",
    )
    cc.set_defaults(func=cmd_config_check)

    r = sub.add_parser(
        "run",
        parents=[parent],
        help="run jobs of the jobs file now (all by default)",
        description="Run jobs now: before hook, backup, forget, prune and check when due, copy "
        "and mirror, after hook. Exit status: the worst of the jobs (0 ok, 1 warnings, "
        "2 failed).",
    )
    r.add_argument("jobs", nargs="*", metavar="JOB")
    r.add_argument("--metrics-file", metavar="FILE", help="write Prometheus metrics to FILE")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser(
        "daemon",
        parents=[parent],
        help="run every job on its schedule, in the foreground",
        description="Run every scheduled job on its schedule in the foreground (for a systemd "
        "service). SIGHUP reloads the jobs file; SIGTERM stops a running job at a safe point "
        "and exits.",
    )
    d.add_argument("--metrics-file", metavar="FILE", help="write Prometheus metrics to FILE")
    d.set_defaults(func=cmd_daemon)

    j = sub.add_parser("jobs", parents=[parent], help="the jobs, their last and next runs")
    j.add_argument(
        "--check",
        action="store_true",
        help="alert for jobs that have not succeeded within their alert_if_no_success "
        "(the dead man's switch, for cron users); exit 2 if any is overdue",
    )
    jsub = j.add_subparsers(dest="jobs_command", metavar="SUBCOMMAND")
    jh = jsub.add_parser("history", parents=[parent], help="the runs of a job")
    jh.add_argument("job", metavar="JOB")
    jh.add_argument("--limit", type=int, default=20, metavar="N")
    jh.set_defaults(func=cmd_jobs_history)
    j.set_defaults(func=cmd_jobs)


def _config_path(ctx: Context) -> Path | None:
    return Path(ctx.args.config) if ctx.args.config else None


def cmd_config_check(ctx: Context) -> int:
    cfg, problems = check_config(_config_path(ctx))
    errors = [p for p in problems if p.severity == "error"]
    if ctx.json:
        ctx.emit(
            {
                "type": "config_check",
                "path": str(cfg.path),
                "ok": not errors,
                "problems": [
                    {"path": p.path, "line": p.line, "message": p.message, "severity": p.severity}
                    for p in problems
                ],
            }
        )
        return EXIT_ERROR if errors else EXIT_OK
    for p in problems:
        prefix = "error" if p.severity == "error" else "warning"
        print(f"{prefix}: {p}", flush=True)
    if errors:
        ctx.note(f"{cfg.path}: {len(errors)} errors")
        return EXIT_ERROR
    ctx.out(
        f"{cfg.path}: ok: {len(cfg.jobs)} jobs, {len(cfg.repositories)} repositories"
        + (f", {len(problems)} warnings" if problems else "")
    )
    return EXIT_OK


def cmd_run(ctx: Context) -> int:
    from safehold.jobs.runner import Runner

    a = ctx.args
    cfg = load_config(_config_path(ctx))
    stop = threading.Event()
    old = _signals(stop, None)
    try:
        runner = Runner(
            cfg,
            state_dir(cfg.state_dir),
            cache_dir=cache_dir(a),
            stop=stop,
            say=ctx.note,
            metrics_file=Path(a.metrics_file) if a.metrics_file else None,
        )
        if not cfg.jobs:
            ctx.note(f"no jobs in {cfg.path}")
        outcomes = runner.run(a.jobs or None)
    finally:
        _restore(old)
    if ctx.json:
        ctx.emit(
            {
                "type": "run",
                "jobs": [
                    {
                        "name": o.job,
                        "result": o.result,
                        "message": o.message,
                        "snapshot": o.snapshot,
                        "log": o.log_path,
                        "duration_s": round(o.duration_s, 3),
                        "alerts_failed": o.alerts_failed,
                    }
                    for o in outcomes
                ],
            }
        )
    if stop.is_set():
        ctx.note("interrupted")
        return EXIT_INTERRUPTED
    return max((o.exit_code for o in outcomes), default=EXIT_OK)


def _signals(stop: threading.Event, reload: threading.Event | None) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    old: dict[int, Any] = {}

    def on_stop(signum: int, frame: object) -> None:
        stop.set()

    def on_hup(signum: int, frame: object) -> None:
        if reload is not None:
            reload.set()

    old[signal.SIGINT] = signal.signal(signal.SIGINT, on_stop)
    old[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_stop)
    if reload is not None:
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    return old


def _restore(old: dict[int, Any]) -> None:
    for sig, handler in old.items():
        signal.signal(sig, handler)


def cmd_daemon(ctx: Context) -> int:
    from safehold.jobs.daemon import Daemon

    a = ctx.args
    stop = threading.Event()
    reload = threading.Event()
    old = _signals(stop, reload)
    try:
        cfg = load_config(_config_path(ctx))
        daemon = Daemon(
            cfg.path,
            state_dir(cfg.state_dir),
            cache_dir=cache_dir(a),
            stop=stop,
            reload=reload,
            say=lambda s: ctx.note(f"{dt.datetime.now():%Y-%m-%d %H:%M:%S} {s}"),
            metrics_file=Path(a.metrics_file) if a.metrics_file else None,
        )
        daemon.run()
    finally:
        _restore(old)
    return EXIT_OK


def _age(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    s = max(0.0, now - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def cmd_jobs(ctx: Context) -> int:
    a = ctx.args
    cfg = load_config(_config_path(ctx))
    state = state_dir(cfg.state_dir)
    now = time.time()
    if a.check:
        from safehold.jobs.runner import Runner

        overdue = Runner(cfg, state, say=ctx.note).check_overdue()
        if ctx.json:
            ctx.emit({"type": "jobs_check", "overdue": overdue})
        elif not overdue:
            watched = [n for n, j in cfg.jobs.items() if j.alert_if_no_success_s is not None]
            ctx.out(
                f"no job is overdue ({len(watched)} with alert_if_no_success)"
                if watched
                else "no job has alert_if_no_success"
            )
        return EXIT_ERROR if overdue else EXIT_OK
    rows: list[dict[str, Any]] = []
    history = History(state)
    try:
        tz = local_zone()
        for name, job in cfg.jobs.items():
            running = JobLock(state, name).running()
            if not running:
                history.close_unfinished(name, now)  # runs that were killed
            last = history.last(name)
            ok = history.last_success(name)
            nxt = (
                job.schedule.next_after(dt.datetime.fromtimestamp(now, tz)).timestamp()
                if job.schedule is not None
                else None
            )
            rows.append(
                {
                    "name": name,
                    "repository": job.repository,
                    "schedule": job.schedule.text if job.schedule is not None else None,
                    "result": last.result if last else None,
                    "last_run": rfc3339(last.started) if last else None,
                    "last_success": rfc3339(ok.ended or ok.started) if ok else None,
                    "duration_s": last.duration_s if last else None,
                    "message": last.message if last else None,
                    "next_run": rfc3339(nxt),
                    "running": running,
                    "_started": last.started if last else None,
                    "_next": nxt,
                }
            )
    finally:
        history.close()
    if ctx.json:
        ctx.emit([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
        return EXIT_OK
    if not rows:
        ctx.out(f"no jobs in {cfg.path}")
        return EXIT_OK
    ctx.out(f"{'JOB':16} {'RESULT':8} {'LAST RUN':12} {'DURATION':>9}  NEXT RUN")
    for r in rows:
        dur = "-" if r["duration_s"] is None else f"{r['duration_s']:.1f}s"
        when = (
            "-"
            if r["_next"] is None
            else dt.datetime.fromtimestamp(r["_next"]).strftime("%Y-%m-%d %H:%M")
        )
        result = r["result"] or "never"
        if r["running"]:
            result = "running"
        ctx.out(f"{r['name']:16} {result:8} {_age(r['_started'], now):12} {dur:>9}  {when}")
    return EXIT_OK


def cmd_jobs_history(ctx: Context) -> int:
    a = ctx.args
    cfg = load_config(_config_path(ctx))
    if not 1 <= a.limit <= 1_000_000:
        raise UsageError("--limit must be between 1 and 1000000")
    history = History(state_dir(cfg.state_dir))
    try:
        runs = history.runs(a.job, limit=a.limit)
        if not runs and a.job not in cfg.jobs:
            raise UsageError(f"no job named {a.job!r} in {cfg.path}, and no runs of one")
    finally:
        history.close()
    if ctx.json:
        ctx.emit([r.as_json() for r in runs])
        return EXIT_OK
    if not runs:
        ctx.out(f"job {a.job} has not run yet")
    for r in runs:
        t = dt.datetime.fromtimestamp(r.started).strftime("%Y-%m-%d %H:%M:%S")
        dur = "-" if r.duration_s is None else f"{r.duration_s:.1f}s"
        snap = (r.snapshot or "-")[:8]
        ctx.out(
            f"{t}  {r.result or 'running':8} {dur:>8}  {snap:8}  {r.trigger or '':9} "
            f"{r.message or ''}"
        )
    return EXIT_OK
