"""Retention: which snapshots a policy keeps, as a pure function (no I/O, no clock of its own).

``apply_policy(snapshots, policy, now=...)`` returns the snapshots to keep, those to remove, and
for each snapshot the reasons it is kept (empty for the removed ones). It works like restic's
``forget``: snapshots are grouped (by host and paths unless told otherwise); within a group, newest
first, each ``keep_*`` rule keeps the newest snapshot of each of its most recent N time buckets
that hold a snapshot (empty buckets do not count). Buckets are calendar hours, days, ISO weeks,
months and years in the given time zone, so DST changes, month ends and leap years fall out of
the calendar rather than out of arithmetic on seconds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from safehold.units import Duration

FUTURE_SLACK = dt.timedelta(days=1)
"""Snapshots dated further than this after ``now`` are suspect: reported, never the newest."""


class SnapshotLike(Protocol):
    """What the policy needs of a snapshot (format.snapshot.Snapshot has it)."""

    @property
    def id(self) -> str: ...
    @property
    def time_ns(self) -> int: ...
    @property
    def host(self) -> str: ...
    @property
    def paths(self) -> list[str]: ...
    @property
    def tags(self) -> list[str]: ...


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None
    tags: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ("host", "paths")

    def empty(self) -> bool:
        """True when no rule keeps anything (forget refuses such a policy)."""
        return not (
            self.last
            or self.hourly
            or self.daily
            or self.weekly
            or self.monthly
            or self.yearly
            or self.within
            or self.tags
        )


@dataclass
class PolicyResult:
    keep: list[SnapshotLike] = field(default_factory=list)
    remove: list[SnapshotLike] = field(default_factory=list)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    future: list[SnapshotLike] = field(default_factory=list)
    groups: dict[tuple[str, ...], list[SnapshotLike]] = field(default_factory=dict)


def group_key(snap: SnapshotLike, group_by: Sequence[str]) -> tuple[str, ...]:
    key = []
    for g in group_by:
        if g == "host":
            key.append(f"host={snap.host}")
        elif g == "paths":
            key.append("paths=" + ",".join(sorted(snap.paths)))
        elif g == "tags":
            key.append("tags=" + ",".join(sorted(snap.tags)))
        else:
            raise ValueError(f"cannot group by {g!r} (host, paths, tags)")
    return tuple(key)


def _local(snap: SnapshotLike, tz: dt.tzinfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(snap.time_ns / 1e9, tz)


Bucket = Callable[[dt.datetime], tuple[int, ...]]

_BUCKETS: list[tuple[str, Bucket]] = [
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: t.isocalendar()[:2]),
    ("monthly", lambda t: (t.year, t.month)),
    ("yearly", lambda t: (t.year,)),
]


def subtract(t: dt.datetime, d: Duration) -> dt.datetime:
    """``t`` minus a calendar duration: years and months by the calendar (the day clamped to the
    month's end), then days and hours."""
    month0 = t.month - 1 - d.months
    year = t.year - d.years + month0 // 12
    month = month0 % 12 + 1
    day = min(t.day, _days_in_month(year, month))
    return t.replace(year=year, month=month, day=day) - dt.timedelta(days=d.days, hours=d.hours)


def _days_in_month(year: int, month: int) -> int:
    nxt = dt.date(year + month // 12, month % 12 + 1, 1)
    return (nxt - dt.timedelta(days=1)).day


def apply_policy(
    snapshots: Sequence[SnapshotLike],
    policy: Policy,
    *,
    now: dt.datetime,
    tz: dt.tzinfo | None = None,
) -> PolicyResult:
    """Split ``snapshots`` into keep and remove by ``policy``; pure and deterministic."""
    tz = tz or now.tzinfo or dt.UTC
    res = PolicyResult()
    for snap in snapshots:
        res.groups.setdefault(group_key(snap, policy.group_by), []).append(snap)
    limit = now + FUTURE_SLACK
    for snaps in res.groups.values():
        ordered = sorted(snaps, key=lambda s: (s.time_ns, s.id), reverse=True)
        future = [s for s in ordered if _local(s, tz) > limit]
        res.future.extend(future)
        current = [s for s in ordered if _local(s, tz) <= limit]
        newest = _local(current[0], tz) if current else None
        counts = {name: getattr(policy, name) for name, _ in _BUCKETS}
        last_bucket: dict[str, tuple[int, ...] | None] = {name: None for name, _ in _BUCKETS}
        kept_last = 0
        for snap in future:
            res.reasons[snap.id] = ["dated in the future: kept, and not counted as the newest"]
        for snap in current:
            t = _local(snap, tz)
            why: list[str] = []
            if kept_last < policy.last:
                kept_last += 1
                why.append(f"last {kept_last}/{policy.last}")
            for name, bucket in _BUCKETS:
                if counts[name] <= 0:
                    continue
                b = bucket(t)
                if b != last_bucket[name]:
                    last_bucket[name] = b
                    counts[name] -= 1
                    why.append(
                        f"{name} {getattr(policy, name) - counts[name]}/{getattr(policy, name)}"
                    )
            if (
                policy.within is not None
                and newest is not None
                and t >= subtract(newest, policy.within)
            ):
                why.append("within " + _duration_text(policy.within) + " of the newest")
            matched = [tag for tag in policy.tags if tag in snap.tags]
            if matched:
                why.append("tag " + ",".join(matched))
            res.reasons[snap.id] = why
        for snap in ordered:
            (res.keep if res.reasons[snap.id] else res.remove).append(snap)
    res.keep.sort(key=lambda s: (s.time_ns, s.id))
    res.remove.sort(key=lambda s: (s.time_ns, s.id))
    return res


def _duration_text(d: Duration) -> str:
    parts = [(d.years, "y"), (d.months, "m"), (d.days, "d"), (d.hours, "h")]
    return "".join(f"{n}{u}" for n, u in parts if n) or "0h"
