"""schedule install, remove, show: systemd timers or cron entries for the jobs of the jobs file."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from safehold.cli.common import Context
from safehold.errors import EXIT_OK, UsageError
from safehold.jobs.config import Config, load_config
from safehold.jobs.schedule import local_zone
from safehold.jobs.units import Changes, ScheduledJob, install, installed_jobs, remove


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "schedule",
        parents=[parent],
        help="install systemd timers or cron entries for the jobs' schedules",
        description="Install or remove a systemd service + timer per scheduled job (or a cron "
        "file), or show the schedules and their next runs.",
    )
    ssub = s.add_subparsers(dest="schedule_command", metavar="SUBCOMMAND", required=True)
    epilog = (
        "Without --dir: system units go to /etc/systemd/system, --user ones to "
        "~/.config/systemd/user, followed by systemctl daemon-reload and enable --now "
        "(remove: disable --now). --cron writes /etc/cron.d/safehold, or with --user the "
        "user's crontab (a block between '# BEGIN safehold' and '# END safehold'). --dir DIR "
        "only writes the files into DIR (safehold-JOB.service/.timer, or 'safehold' for cron)."
    )
    i = ssub.add_parser(
        "install",
        parents=[parent],
        help="write (and enable) a timer per scheduled job",
        epilog=epilog,
    )
    r = ssub.add_parser(
        "remove",
        parents=[parent],
        help="disable and delete what 'schedule install' wrote",
        epilog=epilog,
    )
    for p in (i, r):
        p.add_argument("jobs", nargs="*", metavar="JOB", help="default: every job")
        kind = p.add_mutually_exclusive_group()
        kind.add_argument(
            "--systemd", dest="cron", action="store_false", help="systemd units (the default)"
        )
        kind.add_argument("--cron", dest="cron", action="store_true", help="cron entries")
        p.add_argument("--user", action="store_true", help="the user's units or crontab")
        p.add_argument(
            "--dir",
            metavar="DIR",
            help="write the files into DIR; run no systemctl or crontab",
        )
    i.add_argument(
        "--exe",
        metavar="PATH",
        help="the safehold executable the units run (default: this one)",
    )
    i.set_defaults(func=cmd_install, cron=False)
    r.set_defaults(func=cmd_remove, cron=False)

    sh = ssub.add_parser(
        "show", parents=[parent], help="each job's schedule, next runs and translations"
    )
    sh.add_argument("jobs", nargs="*", metavar="JOB", help="default: every job")
    sh.add_argument("--count", type=int, default=3, metavar="N", help="next runs to show")
    sh.set_defaults(func=cmd_show)


def _config(ctx: Context) -> Config:
    return load_config(Path(ctx.args.config) if ctx.args.config else None)


def _exe(given: str | None) -> list[str]:
    """The command that runs safehold in the units: --exe, else this safehold script, else
    ``python -m safehold`` with this interpreter."""
    if given:
        path = os.path.abspath(given)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise UsageError(f"--exe {given}: not an executable file")
        return [path]
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "safehold" and os.access(argv0, os.X_OK):
        return [os.path.abspath(argv0)]
    if not argv0.endswith("__main__.py"):
        found = shutil.which("safehold")
        if found:
            return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "safehold"]


def _selected(cfg: Config, names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in cfg.jobs]
    if unknown:
        known = ", ".join(sorted(cfg.jobs)) or "none"
        raise UsageError(f"no job named {unknown[0]!r} in {cfg.path} (jobs: {known})")
    return names or sorted(cfg.jobs)


def _report(ctx: Context, changes: Changes, extra_notes: list[str]) -> None:
    notes = extra_notes + changes.notes
    if ctx.json:
        ctx.emit(
            {
                "written": [str(p) for p in changes.written],
                "removed": [str(p) for p in changes.removed],
                "commands": changes.commands,
                "notes": notes,
            }
        )
    else:
        for p in changes.written:
            ctx.out(f"wrote {p}")
        for p in changes.removed:
            ctx.out(f"removed {p}")
        for cmd in changes.commands:
            ctx.out(f"ran {' '.join(cmd)}")
    for n in notes:
        ctx.note(f"safehold: {n}")


def cmd_install(ctx: Context) -> int:
    a = ctx.args
    cfg = _config(ctx)
    notes: list[str] = []
    jobs: list[ScheduledJob] = []
    for name in _selected(cfg, a.jobs):
        job = cfg.jobs[name]
        if job.schedule is None:
            notes.append(f"job {name} has no schedule: skipped")
            continue
        jobs.append(ScheduledJob(name, job.schedule, job.random_delay_s))
    if not jobs:
        raise UsageError(f"no job to install: none has a schedule in {cfg.path}")
    target = Path(a.dir) if a.dir else None
    if not a.cron or target is not None or not a.user:
        scheduled = {n for n, j in cfg.jobs.items() if j.schedule is not None}
        for stale in installed_jobs(cron=a.cron, user=a.user, dir=target):
            if stale not in scheduled:
                notes.append(
                    f"job {stale} is installed but has no schedule in {cfg.path}: "
                    f"remove it with 'safehold schedule remove {stale}"
                    + (f" --dir {a.dir}'" if a.dir else "'")
                )
    changes = install(
        jobs,
        exe=_exe(a.exe),
        config_path=str(cfg.path.resolve()),
        cron=a.cron,
        user=a.user,
        dir=target,
    )
    _report(ctx, changes, notes)
    return EXIT_OK


def cmd_remove(ctx: Context) -> int:
    a = ctx.args
    changes = remove(a.jobs or None, cron=a.cron, user=a.user, dir=Path(a.dir) if a.dir else None)
    if not changes.written and not changes.removed and not changes.notes:
        changes.notes.append("nothing to remove")
    _report(ctx, changes, [])
    return EXIT_OK


def cmd_show(ctx: Context) -> int:
    cfg = _config(ctx)
    if ctx.args.count < 1:
        raise UsageError("--count must be at least 1")
    tz = local_zone()
    now = dt.datetime.now(tz)
    rows: list[dict[str, Any]] = []
    for name in _selected(cfg, ctx.args.jobs):
        sched = cfg.jobs[name].schedule
        if sched is None:
            rows.append({"name": name, "schedule": None})
            continue
        rows.append(
            {
                "name": name,
                "schedule": sched.text,
                "description": sched.describe(),
                "next_runs": [t.isoformat() for t in sched.runs(now, ctx.args.count, tz)],
                "oncalendar": sched.oncalendar(),
                "cron": sched.cron(),
                "random_delay_s": cfg.jobs[name].random_delay_s,
            }
        )
    if ctx.json:
        ctx.emit(rows)
        return EXIT_OK
    for row in rows:
        if row["schedule"] is None:
            ctx.out(f"{row['name']}: no schedule")
            continue
        ctx.out(f"{row['name']}: {row['schedule']} ({row['description']})")
        for t in row["next_runs"]:
            ctx.out(f"  next: {t}")
        for expr in row["oncalendar"]:
            ctx.out(f"  OnCalendar={expr}")
        ctx.out(f"  cron: {row['cron']}")
    return EXIT_OK
