"""forget and prune."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from safehold.cli.common import Context, add_option_arguments, given_options, open_repo
from safehold.errors import EXIT_OK, UsageError
from safehold.ops import options as oo
from safehold.ops.forget import ForgetOptions, forget, plan_forget
from safehold.ops.prune import DEFAULT_GRACE_S, PruneOptions, prune
from safehold.policy import Policy
from safehold.units import format_size


def add_parsers(sub: Any, parent: argparse.ArgumentParser) -> None:
    f = sub.add_parser("forget", parents=[parent], help="remove snapshots by id or by policy")
    f.add_argument("snapshots", nargs="*", metavar="SNAP")
    add_option_arguments(f, oo.RETENTION_OPTS)
    f.add_argument("--host", metavar="HOST")
    f.add_argument("--tag", action="append", default=[], metavar="TAG")
    f.add_argument("--path", action="append", default=[], metavar="PATH")
    f.add_argument("--dry-run", "-n", action="store_true", help="show the plan, remove nothing")
    f.add_argument("--prune", action="store_true", help="prune afterwards")
    _prune_options(f)
    f.set_defaults(func=cmd_forget)

    p = sub.add_parser("prune", parents=[parent], help="free the data no snapshot uses")
    p.add_argument("--dry-run", "-n", action="store_true", help="show the plan, change nothing")
    _prune_options(p)
    p.set_defaults(func=cmd_prune)


def _prune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-unused",
        default="5%",
        metavar="N%",
        help="unused space left in partly used packs (default 5%%)",
    )
    p.add_argument(
        "--grace-minutes",
        type=float,
        default=None,
        metavar="M",
        help="also wait this long after condemning packs before deleting them (default: 0 "
        f"where listings are consistent, {DEFAULT_GRACE_S / 60:.0f} where they may lag, as on "
        "many rclone remotes); backups running meanwhile are always waited for",
    )


def _prune_opts(a: argparse.Namespace, dry_run: bool) -> PruneOptions:
    if a.grace_minutes is not None and a.grace_minutes < 0:
        raise UsageError("--grace-minutes must not be negative")
    given: dict[str, Any] = {"max_unused": a.max_unused}
    if a.grace_minutes is not None:
        given["grace_minutes"] = a.grace_minutes
    return oo.prune_options(given, dry_run=dry_run)


def _policy(a: argparse.Namespace) -> tuple[Policy, bool]:
    """The policy from the --keep-* options, through the table the jobs file uses too."""
    return oo.retention_policy(given_options(a, oo.RETENTION_OPTS))


def cmd_forget(ctx: Context) -> int:
    a = ctx.args
    policy, allow_empty = _policy(a)
    repo = open_repo(ctx)
    try:
        # forget deletes snapshot objects only: backups run beside it; prune and other forgets
        # do not
        lock = None if a.dry_run else repo.lock(op="forget")
        try:
            plan = plan_forget(
                repo,
                ForgetOptions(
                    snapshots=a.snapshots,
                    policy=None if policy.empty() else policy,
                    host=a.host,
                    tags=a.tag,
                    paths=a.path,
                    allow_empty=allow_empty,
                ),
            )
            removed = [] if a.dry_run or lock is None else forget(repo, plan, lock=lock)
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
        return cmd_prune(ctx) if a.prune and not a.dry_run else EXIT_OK
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
        + ("; prune frees their data" if removed and not a.prune else "")
    )
    return cmd_prune(ctx) if a.prune and not a.dry_run else EXIT_OK


def cmd_prune(ctx: Context) -> int:
    a = ctx.args
    opts = _prune_opts(a, a.dry_run)
    repo = open_repo(ctx)
    try:
        plan, res = prune(repo, opts)
    finally:
        repo.close()
    st = plan.stats
    warn = bool(res.not_deleted or res.kept_unreadable or res.unreadable or res.stray)
    if ctx.json:
        ctx.emit(
            {
                "type": "prune",
                "dry_run": opts.dry_run,
                **st,
                "plan": res.plan_id,
                "condemned_packs": res.condemned_packs,
                "condemned_bytes": res.condemned_bytes,
                "repacked_blobs": res.repacked_blobs,
                "deleted_packs": res.deleted_packs,
                "deleted_bytes": res.deleted_bytes,
                "deleted_indexes": res.deleted_indexes,
                "plans_finished": res.plans_finished,
                "plans_waiting": res.plans_waiting,
                "waiting": res.waiting,
                "waiting_bytes": res.waiting_bytes,
                "rescued_packs": res.rescued_packs,
                "kept_unreadable": res.kept_unreadable,
                "not_deleted": res.not_deleted,
                "stray": res.stray,
                "unreadable": res.unreadable,
                "temporaries_removed": len(res.temporaries_removed),
            }
        )
        return 1 if warn and not opts.dry_run else EXIT_OK
    ctx.out(
        f"repository: {st['packs']} packs, {format_size(st['bytes'])}; "
        f"used {format_size(st['used_bytes'])}"
    )
    if opts.dry_run:
        ctx.out(
            f"would condemn {st['packs_to_delete']} unused packs and rewrite "
            f"{st['packs_to_repack']} ({format_size(st['bytes_to_repack'])}), freeing about "
            f"{format_size(st['bytes_freed'])}"
        )
        ctx.out("dry run: nothing was changed")
        return EXIT_OK
    earlier = [p for p in res.plans_finished if p != res.plan_id]
    if earlier:
        ctx.out(f"finished {len(earlier)} earlier plans")
    if res.plan_id:
        done = "; deleted at once" if res.plan_id in res.plans_finished else ""
        ctx.out(
            f"condemned {res.condemned_packs} packs ({format_size(res.condemned_bytes)})"
            + (f", rewrote {res.repacked_blobs} blobs" if res.repacked_blobs else "")
            + f" (plan {res.plan_id[:8]}{done})"
        )
    elif not earlier:
        ctx.out("nothing to prune")
    ctx.out(f"deleted {res.deleted_packs} packs, freed {format_size(res.deleted_bytes)}")
    if res.rescued_packs:
        ctx.out(f"kept {res.rescued_packs} condemned packs that new snapshots use")
    if res.plans_waiting:
        ctx.out(
            f"{format_size(res.waiting_bytes)} in {res.plans_waiting} plans becomes deletable "
            "later; run prune again then:"
        )
        for line in res.waiting:
            ctx.out(f"  {line}")
    if res.temporaries_removed:
        ctx.out(f"removed {len(res.temporaries_removed)} temporary files of interrupted stores")
    for name in res.stray:
        ctx.note(f"warning: {name} is not a pack; left alone")
    for line in res.unreadable:
        ctx.note(f"warning: {line} (ignored; nothing it names was deleted)")
    for pid in res.kept_unreadable:
        ctx.note(f"warning: condemned pack {pid[:16]} cannot be read; kept (run check)")
    if res.not_deleted:
        ctx.note(
            f"warning: {len(res.not_deleted)} objects could not be deleted (append-only or "
            f"versioned storage?), e.g. {res.not_deleted[0]}"
        )
    return 1 if warn else EXIT_OK
