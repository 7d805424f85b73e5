"""Retention as a pure function: table-driven, with calendar edge cases."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import pytest

from safehold.policy import Policy, apply_policy, subtract
from safehold.units import Duration

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")


@dataclass
class Snap:
    id: str
    time_ns: int
    host: str = "h"
    paths: list[str] = field(default_factory=lambda: ["/data"])
    tags: list[str] = field(default_factory=list)


def snap(when: str, tz: dt.tzinfo = UTC, **kw: object) -> Snap:
    t = dt.datetime.fromisoformat(when).replace(tzinfo=tz)
    return Snap(id=when, time_ns=int(t.timestamp() * 1e9), **kw)  # type: ignore[arg-type]


def kept(
    snaps: list[Snap], policy: Policy, now: str = "2030-01-01T00:00", tz: dt.tzinfo = UTC
) -> list[str]:
    res = apply_policy(snaps, policy, now=dt.datetime.fromisoformat(now).replace(tzinfo=tz), tz=tz)
    assert {s.id for s in res.keep} | {s.id for s in res.remove} == {s.id for s in snaps}
    assert not {s.id for s in res.keep} & {s.id for s in res.remove}
    return sorted(s.id for s in res.keep)


DAYS = [snap(f"2024-01-{d:02d}T{h:02d}:00") for d in range(1, 11) for h in (9, 21)]

CASES = [
    ("last 3", DAYS, Policy(last=3), ["2024-01-09T21:00", "2024-01-10T09:00", "2024-01-10T21:00"]),
    (
        "daily 3: newest of each day",
        DAYS,
        Policy(daily=3),
        ["2024-01-08T21:00", "2024-01-09T21:00", "2024-01-10T21:00"],
    ),
    (
        "last 1 + daily 2 overlap",
        DAYS,
        Policy(last=1, daily=2),
        ["2024-01-09T21:00", "2024-01-10T21:00"],
    ),
    ("hourly 2", DAYS, Policy(hourly=2), ["2024-01-10T09:00", "2024-01-10T21:00"]),
    # empty buckets do not count: daily 3 over days with gaps keeps 3 snapshots, not 3 days back
    (
        "daily with gaps",
        [
            snap("2024-03-01T10:00"),
            snap("2024-03-05T10:00"),
            snap("2024-03-20T10:00"),
            snap("2024-03-21T10:00"),
        ],
        Policy(daily=3),
        ["2024-03-05T10:00", "2024-03-20T10:00", "2024-03-21T10:00"],
    ),
    # month ends: Jan 31 and Feb 29 (leap year) are different months, Mar 1 another
    (
        "monthly at month ends, leap year",
        [
            snap("2024-01-31T23:59"),
            snap("2024-02-29T00:00"),
            snap("2024-02-29T23:00"),
            snap("2024-03-01T00:00"),
        ],
        Policy(monthly=3),
        ["2024-01-31T23:59", "2024-02-29T23:00", "2024-03-01T00:00"],
    ),
    # ISO weeks: 2020-12-31 and 2021-01-03 are both in week 53 of 2020
    (
        "weekly across new year",
        [snap("2020-12-28T12:00"), snap("2021-01-03T12:00"), snap("2021-01-04T12:00")],
        Policy(weekly=2),
        ["2021-01-03T12:00", "2021-01-04T12:00"],
    ),
    (
        "yearly",
        [snap("2022-06-01T00:00"), snap("2022-12-31T23:00"), snap("2023-01-01T00:00")],
        Policy(yearly=5),
        ["2022-12-31T23:00", "2023-01-01T00:00"],
    ),
    (
        "tag",
        [*DAYS[:4], snap("2023-05-05T05:00", tags=["keep"])],
        Policy(last=1, tags=("keep",)),
        ["2023-05-05T05:00", "2024-01-02T21:00"],
    ),
]


@pytest.mark.parametrize(("name", "snaps", "policy", "want"), CASES, ids=[c[0] for c in CASES])
def test_policy_table(name: str, snaps: list[Snap], policy: Policy, want: list[str]) -> None:
    assert kept(snaps, policy) == want


def test_dst_days_are_calendar_days() -> None:
    # Europe/Berlin: 2024-03-31 has 23 hours, 2024-10-27 has 25; each is still one day
    snaps = [
        snap(t, BERLIN)
        for t in (
            "2024-03-30T23:30",
            "2024-03-31T01:30",
            "2024-03-31T03:30",
            "2024-03-31T23:30",
            "2024-10-27T02:30",
            "2024-10-27T23:30",
        )
    ]
    assert kept(snaps, Policy(daily=3), tz=BERLIN) == [
        "2024-03-30T23:30",
        "2024-03-31T23:30",
        "2024-10-27T23:30",
    ]
    # hours across the spring-forward gap: 01:30 and 03:30 are one real hour apart, two buckets
    assert kept(snaps[1:3], Policy(hourly=2), tz=BERLIN) == ["2024-03-31T01:30", "2024-03-31T03:30"]


def test_within_counts_back_from_the_newest_with_calendar_months() -> None:
    snaps = [
        snap("2024-01-31T00:00"),
        snap("2024-02-28T00:00"),
        snap("2024-02-29T00:00"),
        snap("2024-03-31T00:00"),
    ]
    # one month back from March 31 is February 29 (clamped), which is kept
    assert kept(snaps, Policy(within=Duration(months=1))) == [
        "2024-02-29T00:00",
        "2024-03-31T00:00",
    ]
    assert subtract(dt.datetime(2024, 2, 29, tzinfo=UTC), Duration(years=1)) == dt.datetime(
        2023, 2, 28, tzinfo=UTC
    )
    assert subtract(dt.datetime(2024, 3, 1, 5, tzinfo=UTC), Duration(days=1, hours=6)) == (
        dt.datetime(2024, 2, 28, 23, tzinfo=UTC)
    )


def test_future_snapshots_are_reported_and_push_nothing_out() -> None:
    real = [snap("2024-01-01T00:00"), snap("2024-01-02T00:00")]
    bogus = [snap("2099-01-01T00:00"), snap("2099-01-02T00:00")]
    res = apply_policy(
        real + bogus,
        Policy(last=2, within=Duration(days=2)),
        now=dt.datetime(2024, 1, 3, tzinfo=UTC),
    )
    assert sorted(s.id for s in res.future) == sorted(s.id for s in bogus)
    assert {s.id for s in res.keep} == {s.id for s in real + bogus}
    assert "future" in res.reasons["2099-01-01T00:00"][0]
    assert res.reasons["2024-01-02T00:00"][0] == "last 1/2"


def test_groups_are_separate() -> None:
    snaps = [
        snap("2024-01-01T00:00", host="a"),
        snap("2024-01-02T00:00", host="a"),
        snap("2024-01-01T01:00", host="b"),
    ]
    assert kept(snaps, Policy(last=1)) == ["2024-01-01T01:00", "2024-01-02T00:00"]
    assert kept(snaps, Policy(last=1, group_by=())) == ["2024-01-02T00:00"]


def test_empty_policy_and_reasons() -> None:
    assert Policy().empty() and not Policy(last=1).empty()
    res = apply_policy(DAYS, Policy(daily=1), now=dt.datetime(2030, 1, 1, tzinfo=UTC))
    assert len(res.keep) == 1 and len(res.remove) == len(DAYS) - 1
    assert res.reasons[res.keep[0].id] == ["daily 1/1"]
    assert all(res.reasons[s.id] == [] for s in res.remove)
