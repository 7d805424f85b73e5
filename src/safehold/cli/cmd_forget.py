"""forget."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from safehold.cli.common import Context, open_repo
from safehold.errors import EXIT_OK, UsageError
from safehold.ops.forget import ForgetOptions, forget, plan_forget
from safehold.policy import Policy
from safehold.units import parse_duration


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    f = sub.add_parser("forget", parents=[parent], help="remove snapshots by id or by policy")
    f.add_argument("snapshots", nargs="*", metavar="SNAP")
    for unit in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        f.add_argument(f"--keep-{unit}", type=int, default=0, metavar="N")
    f.add_argument("--keep-within", metavar="DURATION", help="e.g. 1y2m3d4h")
    f.add_argument("--keep-tag", action="append", default=[], metavar="TAG")
    f.add_argument("--group-by", default="host,paths", metavar="host,paths,tags")
    f.add_argument("--host", metavar="HOST")
    f.add_argument("--tag", action="append", default=[], metavar="TAG")
    f.add_argument("--path", action="append", default=[], metavar="PATH")
    f.add_argument("--dry-run", "-n", action="store_true", help="show the plan, remove nothing")
    f.add_argument(
        "--allow-empty",
        action="store_true",
        help="allow a policy to remove every snapshot of a group",
    )
    f.set_defaults(func=cmd_forget)


def _policy(a: argparse.Namespace) -> Policy:
    counts = {
        u: getattr(a, f"keep_{u}")
        for u in ("last", "hourly", "daily", "weekly", "monthly", "yearly")
    }
    if any(v < 0 for v in counts.values()):
        raise UsageError("--keep-* counts must not be negative")
    group_by = tuple(g.strip() for g in a.group_by.split(",") if g.strip())
    bad = [g for g in group_by if g not in ("host", "paths", "tags")]
    if bad:
        raise UsageError(f"cannot group by {bad[0]!r} (host, paths, tags)")
    return Policy(
        **counts,
        within=parse_duration(a.keep_within) if a.keep_within else None,
        tags=tuple(a.keep_tag),
        group_by=group_by,
    )


def cmd_forget(ctx: Context) -> int:
    a = ctx.args
    policy = _policy(a)
    repo = open_repo(ctx)
    try:
        lock = None if a.dry_run else repo.lock(exclusive=True)
        try:
            plan = plan_forget(
                repo,
                ForgetOptions(
                    snapshots=a.snapshots,
                    policy=None if policy.empty() else policy,
                    host=a.host,
                    tags=a.tag,
                    paths=a.path,
                    allow_empty=a.allow_empty,
                ),
            )
            removed = [] if a.dry_run else forget(repo, plan)
        finally:
            if lock is not None:
                lock.release()
    finally:
        repo.close()
    rows = sorted(plan.keep + plan.remove, key=lambda s: (s.time_ns, s.id))
    removing = {s.id for s in plan.remove}
    if ctx.json:
        ctx.emit(
            {
                "type": "forget",
                "dry_run": a.dry_run,
                "snapshots": [
                    {
                        "id": s.id,
                        "time": s.time_ns,
                        "host": s.host,
                        "paths": s.paths,
                        "action": "remove" if s.id in removing else "keep",
                        "reasons": plan.reasons.get(s.id, []),
                    }
                    for s in rows
                ],
                "future": [s.id for s in plan.future],
                "removed": removed,
            }
        )
        return EXIT_OK
    for s in plan.future:
        ctx.note(f"warning: snapshot {s.id[:8]} is dated in the future; it counts for nothing")
    for s in rows:
        t = dt.datetime.fromtimestamp(s.time_ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")
        action = "remove" if s.id in removing else "keep  "
        why = ", ".join(plan.reasons.get(s.id, []))
        ctx.out(f"{action} {s.id[:8]}  {t}  {s.host:12}  {', '.join(s.paths)}  {why}")
    verb = "would remove" if a.dry_run else "removed"
    ctx.out(
        f"{verb} {len(plan.remove)} snapshots, kept {len(plan.keep)}"
        + ("; run prune (not yet available) to free their data" if removed else "")
    )
    return EXIT_OK
