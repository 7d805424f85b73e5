"""Forget: remove snapshots by id or by retention policy. Plan first, then execute.

Forgetting deletes snapshot objects only; the data they alone referenced stays until prune
(docs/format.md §15.2). It is safe beside running backups: a backup never depends on another
client's snapshot object except to read its parent, and reads it before it starts.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from safehold.errors import NotFound, SnapshotNotFound, UsageError
from safehold.events import Event, EventSink, ignore_events
from safehold.format.snapshot import Snapshot
from safehold.ids import snapshot_name
from safehold.policy import Policy, PolicyResult, apply_policy
from safehold.repository.locks import RepositoryLock
from safehold.repository.repo import Repository, filter_snapshots


@dataclass
class ForgetOptions:
    snapshots: list[str] = field(default_factory=list)  # ids or unique prefixes
    policy: Policy | None = None
    host: str | None = None
    tags: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    allow_empty: bool = False


@dataclass
class ForgetPlan:
    keep: list[Snapshot]
    remove: list[Snapshot]
    reasons: dict[str, list[str]]
    future: list[Snapshot]
    groups: dict[tuple[str, ...], list[Snapshot]]


def plan_forget(
    repo: Repository, opts: ForgetOptions, *, now: dt.datetime | None = None
) -> ForgetPlan:
    """Decide what to remove; changes nothing. Refuses ambiguous or destructive requests."""
    have_policy = opts.policy is not None and not opts.policy.empty()
    if opts.snapshots and have_policy:
        raise UsageError("give snapshot ids or --keep-* options, not both")
    if not opts.snapshots and not have_policy:
        raise UsageError(
            "nothing to forget: name snapshots or give a policy (--keep-last, --keep-daily, ...)"
        )
    snaps = repo.snapshots()
    if opts.snapshots:
        chosen: dict[str, Snapshot] = {}
        for spec in opts.snapshots:
            if spec == "latest":
                raise UsageError("forget takes snapshot ids, not 'latest'")
            try:
                s = repo.find_snapshot(spec, snapshots=snaps)
            except SnapshotNotFound:
                s = _damaged_snapshot(repo, spec)
            chosen[s.id] = s
        remove = sorted(chosen.values(), key=lambda s: (s.time_ns, s.id))
        keep = [s for s in snaps if s.id not in chosen]
        reasons: dict[str, list[str]] = {s.id: ["named"] for s in remove}
        return ForgetPlan(keep, remove, reasons, [], {})
    assert opts.policy is not None
    selected = filter_snapshots(snaps, host=opts.host, tags=opts.tags, paths=opts.paths)
    now = now or dt.datetime.now().astimezone()
    res: PolicyResult = apply_policy(selected, opts.policy, now=now)
    removed = {s.id for s in res.remove}
    if not opts.allow_empty:
        for key, members in res.groups.items():
            if all(m.id in removed for m in members):
                raise UsageError(
                    f"the policy would remove every snapshot of group {' '.join(key)}; "
                    "nothing was removed (add --allow-empty to really do that)"
                )
    return ForgetPlan(
        keep=[s for s in snaps if s.id not in removed],
        remove=list(res.remove),  # type: ignore[arg-type]
        reasons=res.reasons,
        future=list(res.future),  # type: ignore[arg-type]
        groups=res.groups,  # type: ignore[arg-type]
    )


def _damaged_snapshot(repo: Repository, spec: str) -> Snapshot:
    """A snapshot object that cannot be read, named by its id or a unique prefix of it: it can be
    forgotten like any other (then prune can run again)."""
    found = [
        name.split("/", 1)[1]
        for name in repo.bad_snapshots
        if spec and name.split("/", 1)[1].startswith(spec.lower())
    ]
    if len(found) != 1:
        raise SnapshotNotFound(f"no snapshot with id {spec!r}")
    return Snapshot(time_ns=0, host="(damaged)", user="", paths=[], tree=bytes(32), id=found[0])


def forget(
    repo: Repository,
    plan: ForgetPlan,
    *,
    events: EventSink = ignore_events,
    lock: RepositoryLock | None = None,
) -> list[str]:
    """Delete the snapshot objects the plan removes; returns their ids. Holds a forget lock
    (``lock``, or one it takes): backups run beside it, prune and other forgets do not."""
    held = repo.lock(op="forget") if lock is None else lock
    try:
        return _forget(repo, plan, events)
    finally:
        if lock is None:
            held.release()


def _forget(repo: Repository, plan: ForgetPlan, events: EventSink) -> list[str]:
    removed = []
    for s in plan.remove:
        try:
            repo.backend.delete(snapshot_name(s.id))
        except NotFound:
            pass  # removed meanwhile by someone else: the end state is the same
        repo.bad_snapshots.pop(snapshot_name(s.id), None)
        removed.append(s.id)
        events(Event("info", f"removed snapshot {s.id[:8]}", {"snapshot": s.id}))
    return removed
