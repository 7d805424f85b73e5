"""Schedules: parsing, errors with suggestions, next/previous runs across DST changes, month
ends and leap years, and the translations to cron and to systemd OnCalendar (checked against
the real ``systemd-analyze calendar``)."""

from __future__ import annotations

import calendar
import datetime as dt
import os
import re
import shutil
import subprocess
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safehold.errors import UsageError
from safehold.jobs.schedule import Schedule, ScheduleError, parse_delay, parse_schedule
from tests.support.tools import skip_or_fail

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
ZONES = {"UTC": UTC, "Europe/Berlin": BERLIN, "America/New_York": NEW_YORK,
         "Australia/Lord_Howe": LORD_HOWE}  # fmt: skip


def utc(t: dt.datetime) -> dt.datetime:
    return t.astimezone(UTC)


def at(text: str) -> dt.datetime:
    """An aware datetime from ISO text with its offset (the offset picks the fold)."""
    t = dt.datetime.fromisoformat(text)
    assert t.tzinfo is not None
    return t


# --- parsing ---------------------------------------------------------------------------------

PARSES = [
    # text, describe(), cron(), oncalendar()
    ("hourly", "every hour at :00", "0 * * * *", ["*-*-* *:00:00"]),
    ("hourly :15", "every hour at :15", "15 * * * *", ["*-*-* *:15:00"]),
    ("hourly 15", "every hour at :15", "15 * * * *", ["*-*-* *:15:00"]),
    ("daily", "every day at 00:00", "0 0 * * *", ["*-*-* 00:00:00"]),
    ("  DAILY   02:30 ", "every day at 02:30", "30 2 * * *", ["*-*-* 02:30:00"]),
    ("daily at 2:05", "every day at 02:05", "5 2 * * *", ["*-*-* 02:05:00"]),
    ("weekly", "every Monday at 00:00", "0 0 * * 1", ["Mon *-*-* 00:00:00"]),
    ("weekly mon 04:00", "every Monday at 04:00", "0 4 * * 1", ["Mon *-*-* 04:00:00"]),
    (
        "weekly Mon,Thu 04:00",
        "every Monday and Thursday at 04:00",
        "0 4 * * 1,4",
        ["Mon,Thu *-*-* 04:00:00"],
    ),
    (
        "weekly sun,mon-wed 23:59",
        "every Monday, Tuesday, Wednesday and Sunday at 23:59",
        "59 23 * * 0-3",
        ["Mon..Wed,Sun *-*-* 23:59:00"],
    ),
    ("weekly saturday", "every Saturday at 00:00", "0 0 * * 6", ["Sat *-*-* 00:00:00"]),
    ("monthly", "on day 1 of every month at 00:00", "0 0 1 * *", ["*-*-01 00:00:00"]),
    ("monthly 1 03:00", "on day 1 of every month at 03:00", "0 3 1 * *", ["*-*-01 03:00:00"]),
    (
        "monthly 1,15 03:00",
        "on days 1 and 15 of every month at 03:00",
        "0 3 1,15 * *",
        ["*-*-01,15 03:00:00"],
    ),
    (
        "monthly last 23:00",
        "on the last day of every month at 23:00",
        "0 23 28-31 * *",
        ["*-*~01 23:00:00"],
    ),
    ("@hourly", "every hour at :00", "0 * * * *", ["*-*-* *:00:00"]),
    ("@daily", "every day at 00:00", "0 0 * * *", ["*-*-* 00:00:00"]),
    ("@midnight", "every day at 00:00", "0 0 * * *", ["*-*-* 00:00:00"]),
    ("@weekly", "every Sunday at 00:00", "0 0 * * 0", ["Sun *-*-* 00:00:00"]),
    ("@monthly", "on day 1 of every month at 00:00", "0 0 1 * *", ["*-*-01 00:00:00"]),
    ("@YEARLY", "every year on 1 January at 00:00", "0 0 1 1 *", ["*-01-01 00:00:00"]),
    ("@annually", "every year on 1 January at 00:00", "0 0 1 1 *", ["*-01-01 00:00:00"]),
    (
        "*/15 * * * *",
        'cron "*/15 * * * *"',
        "*/15 * * * *",
        ["*-*-* *:00,15,30,45:00"],
    ),
    (
        "0 9-17/4 * JAN-mar mon-FRI",
        'cron "0 9-17/4 * 1-3 1-5"',
        "0 9-17/4 * 1-3 1-5",
        ["Mon..Fri *-01..03-* 09,13,17:00:00"],
    ),
    # cron's either-day rule: two OnCalendar expressions
    ("0 0 13 * fri", 'cron "0 0 13 * 5"', "0 0 13 * 5", ["Fri *-*-* 00:00:00", "*-*-13 00:00:00"]),
    # a day field starting with * makes both fields count
    ("0 0 */10 * 7", 'cron "0 0 */10 * 7"', "0 0 */10 * 7", ["Sun *-*-01,11,21,31 00:00:00"]),
    ("5 4 * * sun", 'cron "5 4 * * 0"', "5 4 * * 0", ["Sun *-*-* 04:05:00"]),
    ("0 0 29 2 *", 'cron "0 0 29 2 *"', "0 0 29 2 *", ["*-02-29 00:00:00"]),
    ("0 0 30,31 2,4 *", 'cron "0 0 30,31 2,4 *"', "0 0 30,31 2,4 *", ["*-02,04-30,31 00:00:00"]),
]


@pytest.mark.parametrize(("text", "describe", "cron", "oncalendar"), PARSES)
def test_parse(text: str, describe: str, cron: str, oncalendar: list[str]) -> None:
    s = parse_schedule(text)
    assert s.text == " ".join(text.split())  # white space collapsed
    assert s.describe() == describe
    assert s.cron() == cron
    assert s.oncalendar() == oncalendar


def test_cron_translation_reparses_to_the_same_schedule() -> None:
    for text, *_ in PARSES:
        s = parse_schedule(text)
        if s.last_day:
            continue
        c = parse_schedule(s.cron())
        for f in ("minutes", "hours", "days", "months", "weekdays", "day_star", "weekday_star",
                  "real_time"):  # fmt: skip
            assert getattr(c, f) == getattr(s, f), (text, f)


ACCEPTED = (
    'expected a cron expression such as "30 2 * * *", @hourly, @daily, @weekly, @monthly, '
    "@yearly, or hourly [:MM], daily [HH:MM], weekly [DAYS] [HH:MM], monthly [DAY|last] [HH:MM]"
)
ERRORS = [
    ("dayly 02:00", '"dayly 02:00" is not a schedule; did you mean "daily 02:00"?'),
    ("Dayly  02:00", '"Dayly  02:00" is not a schedule; did you mean "daily 02:00"?'),
    ("hourley", '"hourley" is not a schedule; did you mean "hourly"?'),
    ("wekly mon 04:00", '"wekly mon 04:00" is not a schedule; did you mean "weekly mon 04:00"?'),
    (
        "weekly mnday 04:00",
        '"weekly mnday 04:00" is not a schedule; did you mean "weekly monday 04:00"?',
    ),
    ("monthy 1 03:00", '"monthy 1 03:00" is not a schedule; did you mean "monthly 1 03:00"?'),
    (
        "monthly lst 23:00",
        '"monthly lst 23:00" is not a schedule; did you mean "monthly last 23:00"?',
    ),
    ("@dayly", '"@dayly" is not a schedule; did you mean "@daily"?'),
    ("daily 02.30", '"daily 02.30" is not a schedule; did you mean "daily 02:30"?'),
    ("0 3 * * tues", '"0 3 * * tues" is not a schedule; did you mean "0 3 * * tue"?'),
    ("0 3 1 janu *", '"0 3 1 janu *" is not a schedule; did you mean "0 3 1 jan *"?'),
    ("every day", '"every day" is not a schedule: ' + ACCEPTED),
    ("", '"" is not a schedule: it is empty'),
    ("daily 25:00", '"daily 25:00" is not a schedule: hour 25 is out of range (00-23)'),
    ("daily 02:60", '"daily 02:60" is not a schedule: minute 60 is out of range (00-59)'),
    (
        "daily 02:30 mon",
        '"daily 02:30 mon" is not a schedule: daily takes at most a time (daily 02:30)',
    ),
    ("hourly :75", '"hourly :75" is not a schedule: minute 75 is out of range (00-59)'),
    (
        "monthly 31 03:00",
        '"monthly 31 03:00" is not a schedule: day 31 does not exist in every month; '
        'use a day from 1 to 28 or "last"',
    ),
    (
        "monthly 29",
        '"monthly 29" is not a schedule: day 29 does not exist in every month; '
        'use a day from 1 to 28 or "last"',
    ),
    ("monthly 0", '"monthly 0" is not a schedule: day 0 is out of range (1-28 or "last")'),
    (
        "weekly fri-mon",
        '"weekly fri-mon" is not a schedule: the day range fri-mon goes backwards '
        "(weeks start on Monday)",
    ),
    ("@daily 02:00", '"@daily 02:00" is not a schedule: @daily takes no arguments'),
    ("61 * * * *", '"61 * * * *" is not a schedule: minute 61 is out of range (0-59)'),
    ("0 24 * * *", '"0 24 * * *" is not a schedule: hour 24 is out of range (0-23)'),
    ("0 0 0 * *", '"0 0 0 * *" is not a schedule: day of month 0 is out of range (1-31)'),
    ("0 0 * 13 *", '"0 0 * 13 *" is not a schedule: month 13 is out of range (1-12)'),
    ("0 0 * * 8", '"0 0 * * 8" is not a schedule: day of week 8 is out of range (0-7)'),
    ("*/0 * * * *", '"*/0 * * * *" is not a schedule: "*/0": the step must be a positive number'),
    (
        "5/10 * * * *",
        '"5/10 * * * *" is not a schedule: "5/10": a step needs a range or * (like */15)',
    ),
    ("30-10 * * * *", '"30-10 * * * *" is not a schedule: the minute range 30-10 goes backwards'),
    ("0 0 31 2 *", '"0 0 31 2 *" is not a schedule: it never runs (February has no day 31)'),
    (
        "0 0 31 4,6 *",
        '"0 0 31 4,6 *" is not a schedule: it never runs (none of April or June has day 31)',
    ),
    ("0 0 30 2 */2", '"0 0 30 2 */2" is not a schedule: it never runs (February has no day 30)'),
    ("0 0 * *", '"0 0 * *" is not a schedule: ' + ACCEPTED),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ScheduleError) as info:
        parse_schedule(text)
    assert str(info.value) == message
    assert isinstance(info.value, UsageError)
    assert info.value.value == text
    suggestion = re.search(r'did you mean "(.*)"\?$', message)
    assert info.value.suggestion == (suggestion.group(1) if suggestion else None)
    if info.value.suggestion is not None:
        parse_schedule(info.value.suggestion)  # a suggestion always parses


def test_either_day_rule_when_both_fields_are_restricted() -> None:
    # "0 0 31 2 mon": February has no 31st, but Mondays in February match (either rule)
    s = parse_schedule("0 0 31 2 mon")
    assert s.next_after(at("2024-01-01T00:00+00:00")) == at("2024-02-05T00:00+00:00")


# --- next_after: DST, month ends, leap years, weekdays, steps, the either-day rule -----------

NEXT = [
    # schedule, zone, after, the runs that follow (ISO with offsets)
    # Europe/Berlin springs forward on 2024-03-31 at 02:00 CET -> 03:00 CEST
    ("daily 02:30", BERLIN, "2024-03-30T12:00+01:00",
     ["2024-03-31T03:00+02:00", "2024-04-01T02:30+02:00"]),
    ("daily 02:00", BERLIN, "2024-03-30T12:00+01:00", ["2024-03-31T03:00+02:00"]),
    ("daily 03:00", BERLIN, "2024-03-30T12:00+01:00",
     ["2024-03-31T03:00+02:00", "2024-04-01T03:00+02:00"]),
    ("daily 01:59", BERLIN, "2024-03-30T12:00+01:00", ["2024-03-31T01:59+01:00"]),
    ("0,30 2 * * *", BERLIN, "2024-03-31T01:00+01:00",  # both run once, after the gap
     ["2024-03-31T03:00+02:00", "2024-04-01T02:00+02:00", "2024-04-01T02:30+02:00"]),
    ("weekly sun 02:15", BERLIN, "2024-03-25T00:00+01:00",
     ["2024-03-31T03:00+02:00", "2024-04-07T02:15+02:00"]),
    ("hourly :30", BERLIN, "2024-03-31T01:00+01:00",  # wildcard: 02:30 does not exist
     ["2024-03-31T01:30+01:00", "2024-03-31T03:30+02:00"]),
    ("*/20 2 * * *", BERLIN, "2024-03-30T12:00+01:00",  # wildcard minute: skips the day
     ["2024-04-01T02:00+02:00"]),
    # Europe/Berlin falls back on 2024-10-27 at 03:00 CEST -> 02:00 CET
    ("daily 02:30", BERLIN, "2024-10-26T12:00+02:00",
     ["2024-10-27T02:30+02:00", "2024-10-28T02:30+01:00"]),
    ("daily 02:30", BERLIN, "2024-10-27T02:10+01:00", ["2024-10-28T02:30+01:00"]),
    ("20 2 * * *", BERLIN, "2024-10-27T02:41+02:00", ["2024-10-28T02:20+01:00"]),
    ("hourly :30", BERLIN, "2024-10-27T01:00+02:00",  # each real hour
     ["2024-10-27T01:30+02:00", "2024-10-27T02:30+02:00", "2024-10-27T02:30+01:00",
      "2024-10-27T03:30+01:00"]),
    ("*/20 2 * * *", BERLIN, "2024-10-27T02:41+02:00",
     ["2024-10-27T02:00+01:00", "2024-10-27T02:20+01:00", "2024-10-27T02:40+01:00",
      "2024-10-28T02:00+01:00"]),
    # America/New_York: 2024-03-10 02:00 EST -> 03:00 EDT; 2024-11-03 02:00 EDT -> 01:00 EST
    ("daily 02:30", NEW_YORK, "2024-03-09T12:00-05:00",
     ["2024-03-10T03:00-04:00", "2024-03-11T02:30-04:00"]),
    ("hourly", NEW_YORK, "2024-03-10T00:30-05:00",
     ["2024-03-10T01:00-05:00", "2024-03-10T03:00-04:00"]),
    ("daily 01:30", NEW_YORK, "2024-11-02T12:00-04:00",
     ["2024-11-03T01:30-04:00", "2024-11-04T01:30-05:00"]),
    ("daily 01:30", NEW_YORK, "2024-11-03T01:31-04:00", ["2024-11-04T01:30-05:00"]),
    ("0 2 * * *", NEW_YORK, "2024-11-02T12:00-04:00", ["2024-11-03T02:00-05:00"]),
    ("hourly :30", NEW_YORK, "2024-11-03T00:00-04:00",
     ["2024-11-03T00:30-04:00", "2024-11-03T01:30-04:00", "2024-11-03T01:30-05:00",
      "2024-11-03T02:30-05:00"]),
    # Australia/Lord_Howe shifts by 30 minutes: 2024-10-06 02:00 +10:30 -> 02:30 +11:00,
    # 2024-04-07 02:00 +11:00 -> 01:30 +10:30
    ("daily 02:15", LORD_HOWE, "2024-10-05T12:00+10:30",
     ["2024-10-06T02:30+11:00", "2024-10-07T02:15+11:00"]),
    ("daily 02:30", LORD_HOWE, "2024-10-05T12:00+10:30", ["2024-10-06T02:30+11:00"]),
    ("hourly :15", LORD_HOWE, "2024-10-06T01:00+10:30",
     ["2024-10-06T01:15+10:30", "2024-10-06T03:15+11:00"]),
    ("hourly :45", LORD_HOWE, "2024-04-07T01:00+11:00",
     ["2024-04-07T01:45+11:00", "2024-04-07T01:45+10:30", "2024-04-07T02:45+10:30"]),
    ("daily 01:45", LORD_HOWE, "2024-04-07T01:00+11:00",
     ["2024-04-07T01:45+11:00", "2024-04-08T01:45+10:30"]),
    # month ends and leap years
    ("monthly last 23:00", UTC, "2024-02-01T00:00+00:00",
     ["2024-02-29T23:00+00:00", "2024-03-31T23:00+00:00", "2024-04-30T23:00+00:00"]),
    ("monthly last 23:00", UTC, "2023-02-01T00:00+00:00", ["2023-02-28T23:00+00:00"]),
    ("monthly last 23:00", BERLIN, "2024-03-30T00:00+01:00",
     ["2024-03-31T23:00+02:00", "2024-04-30T23:00+02:00"]),
    ("monthly 1 03:00", UTC, "2024-12-31T12:00+00:00", ["2025-01-01T03:00+00:00"]),
    ("monthly 28", UTC, "2024-02-28T00:00+00:00",
     ["2024-03-28T00:00+00:00", "2024-04-28T00:00+00:00"]),
    ("0 0 31 * *", UTC, "2024-04-01T00:00+00:00",
     ["2024-05-31T00:00+00:00", "2024-07-31T00:00+00:00", "2024-08-31T00:00+00:00"]),
    ("0 0 29 2 *", UTC, "2024-03-01T00:00+00:00", ["2028-02-29T00:00+00:00"]),
    ("0 0 29 2 *", UTC, "2096-03-01T00:00+00:00", ["2104-02-29T00:00+00:00"]),  # 2100 is not
    ("0 0 30,31 2,4 *", UTC, "2024-01-01T00:00+00:00", ["2024-04-30T00:00+00:00"]),
    ("@yearly", BERLIN, "2024-06-01T00:00+02:00", ["2025-01-01T00:00+01:00"]),
    # weekdays
    ("weekly mon,thu 04:00", UTC, "2024-06-03T04:00+00:00",
     ["2024-06-06T04:00+00:00", "2024-06-10T04:00+00:00"]),
    ("weekly mon-fri 06:00", UTC, "2024-06-07T07:00+00:00", ["2024-06-10T06:00+00:00"]),
    ("weekly sun", UTC, "2024-06-08T10:00+00:00", ["2024-06-09T00:00+00:00"]),
    ("0 0 * * 7", UTC, "2024-06-08T10:00+00:00", ["2024-06-09T00:00+00:00"]),
    ("0 0 * * 0", UTC, "2024-06-08T10:00+00:00", ["2024-06-09T00:00+00:00"]),
    ("@weekly", UTC, "2024-06-08T10:00+00:00", ["2024-06-09T00:00+00:00"]),
    ("weekly", UTC, "2024-06-08T10:00+00:00", ["2024-06-10T00:00+00:00"]),
    # steps
    ("*/15 * * * *", UTC, "2024-06-01T12:07+00:00",
     ["2024-06-01T12:15+00:00", "2024-06-01T12:30+00:00"]),
    ("1-5/2 * * * *", UTC, "2024-06-01T12:03+00:00",
     ["2024-06-01T12:05+00:00", "2024-06-01T13:01+00:00"]),
    ("0 */6 * * *", UTC, "2024-06-01T07:00+00:00", ["2024-06-01T12:00+00:00"]),
    ("0 9-17/4 * * *", UTC, "2024-06-01T09:00+00:00",
     ["2024-06-01T13:00+00:00", "2024-06-01T17:00+00:00", "2024-06-02T09:00+00:00"]),
    ("0 0 1 */3 *", UTC, "2024-01-01T00:00+00:00", ["2024-04-01T00:00+00:00"]),
    # the either-day rule: the 13th or a Friday; a "*"-prefixed field: both
    ("0 0 13 * fri", UTC, "2024-12-01T00:00+00:00",
     ["2024-12-06T00:00+00:00", "2024-12-13T00:00+00:00", "2024-12-20T00:00+00:00"]),
    ("0 0 13 * fri", UTC, "2024-11-09T00:00+00:00", ["2024-11-13T00:00+00:00"]),
    ("0 0 */2 * fri", UTC, "2024-12-01T00:00+00:00",
     ["2024-12-13T00:00+00:00", "2024-12-27T00:00+00:00"]),
    ("0 0 13 * *", UTC, "2024-12-01T00:00+00:00", ["2024-12-13T00:00+00:00"]),
    ("0 0 13 * */1", UTC, "2024-12-01T00:00+00:00", ["2024-12-13T00:00+00:00"]),
    # strictly after
    ("daily 02:30", UTC, "2024-06-01T02:30+00:00", ["2024-06-02T02:30+00:00"]),
    ("daily 02:30", UTC, "2024-06-01T02:29:59.999999+00:00", ["2024-06-01T02:30+00:00"]),
]  # fmt: skip


@pytest.mark.parametrize(("text", "zone", "after", "expected"), NEXT)
def test_next_after(text: str, zone: dt.tzinfo, after: str, expected: list[str]) -> None:
    s = parse_schedule(text)
    t = at(after).astimezone(zone)
    got = s.runs(t, len(expected))
    assert [g.isoformat() for g in got] == [at(e).isoformat() for e in expected]
    for g in got:
        assert g.tzinfo is zone
        # a run is its own previous run, and nothing runs between two runs (arithmetic and
        # comparisons in UTC: within one zone Python compares wall times and ignores the fold)
        assert utc(s.previous_before(g)) == utc(g)
    for a, b in zip([t, *got], got):
        assert utc(s.previous_before(utc(b) - dt.timedelta(microseconds=1), zone)) <= utc(a)


def test_next_after_in_another_zone() -> None:
    s = parse_schedule("daily 02:30")
    got = s.next_after(at("2024-03-30T12:00+00:00"), BERLIN)
    assert got == at("2024-03-31T03:00+02:00")
    assert got.tzinfo is BERLIN


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        parse_schedule("daily").next_after(dt.datetime(2024, 1, 1))


PREVIOUS = [
    ("daily 02:30", UTC, "2024-06-01T02:30+00:00", "2024-06-01T02:30+00:00"),
    ("daily 02:30", UTC, "2024-06-01T02:29+00:00", "2024-05-31T02:30+00:00"),
    ("daily 02:30", BERLIN, "2024-03-31T03:30+02:00", "2024-03-31T03:00+02:00"),
    ("daily 02:30", BERLIN, "2024-03-31T01:59+01:00",
     "2024-03-30T02:30+01:00"),
    ("daily 02:30", BERLIN, "2024-10-27T02:40+01:00", "2024-10-27T02:30+02:00"),
    ("hourly :30", BERLIN, "2024-10-27T02:40+01:00", "2024-10-27T02:30+01:00"),
    ("hourly :30", BERLIN, "2024-10-27T02:20+01:00", "2024-10-27T02:30+02:00"),
    ("monthly last 23:00", UTC, "2024-03-15T00:00+00:00", "2024-02-29T23:00+00:00"),
    ("0 0 29 2 *", UTC, "2104-02-28T00:00+00:00", "2096-02-29T00:00+00:00"),
    ("weekly mon,thu 04:00", UTC, "2024-06-06T03:59+00:00", "2024-06-03T04:00+00:00"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "zone", "t", "expected"), PREVIOUS)
def test_previous_before(text: str, zone: dt.tzinfo, t: str, expected: str) -> None:
    got = parse_schedule(text).previous_before(at(t).astimezone(zone))
    assert got.isoformat() == at(expected).isoformat()


def test_rare_schedules_terminate_quickly() -> None:
    import time

    start = time.monotonic()
    s = parse_schedule("0 0 29 2 1")  # Feb 29 or a Monday (either rule): frequent
    s.next_after(at("2024-01-01T00:00+00:00"))
    t = at("2001-01-01T00:00+00:00")
    for _ in range(10):  # 29 February: every 4 (or 8) years
        t = parse_schedule("59 23 29 2 *").next_after(t, BERLIN)
        assert (t.month, t.day, t.hour, t.minute) == (2, 29, 23, 59)
    assert t.year == 2040
    assert time.monotonic() - start < 5


# --- properties ------------------------------------------------------------------------------

instants = st.datetimes(
    min_value=dt.datetime(1990, 1, 1), max_value=dt.datetime(2060, 1, 1), timezones=st.just(UTC)
)
zones = st.sampled_from(list(ZONES.values()))
times = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.integers(0, 59))
day_names = st.lists(
    st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]), min_size=1, max_size=4
).map(lambda ds: ",".join(dict.fromkeys(ds)))
phrases = st.one_of(
    st.integers(0, 59).map(lambda m: f"hourly :{m:02d}"),
    times.map(lambda t: f"daily {t}"),
    st.builds(lambda d, t: f"weekly {d} {t}", day_names, times),
    st.builds(
        lambda ds, t: f"monthly {','.join(map(str, sorted(set(ds))))} {t}",
        st.lists(st.integers(1, 28), min_size=1, max_size=3),
        times,
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(phrases, instants, zones)
def test_phrases_run_exactly_as_their_cron_translation(
    phrase: str, t: dt.datetime, zone: dt.tzinfo
) -> None:
    s = parse_schedule(phrase)
    c = parse_schedule(s.cron())
    t = t.astimezone(zone)
    assert s.next_after(t) == c.next_after(t)
    assert s.previous_before(t) == c.previous_before(t)


def _field(text: str, lo: int, hi: int) -> set[int]:
    """An independent reading of one cron field (numbers only)."""
    out: set[int] = set()
    for part in text.split(","):
        rng, _, step = part.partition("/")
        a, b = (lo, hi) if rng == "*" else (int(rng.split("-")[0]), int(rng.split("-")[-1]))
        out |= set(range(a, b + 1, int(step or 1)))
    return out


def _reference_matches(expr: str, t: dt.datetime) -> bool:
    """Cron matching as crontab(5) describes it, for a UTC wall time."""
    m, h, dom, mon, dow = expr.split()
    dows = {d % 7 for d in _field(dow, 0, 7)}
    dom_ok = t.day in _field(dom, 1, 31)
    dow_ok = t.isoweekday() % 7 in dows
    day_ok = (dom_ok and dow_ok) if dom.startswith("*") or dow.startswith("*") else dom_ok or dow_ok
    return (
        t.minute in _field(m, 0, 59)
        and t.hour in _field(h, 0, 23)
        and t.month in _field(mon, 1, 12)
        and day_ok
    )


def _cron_part(lo: int, hi: int) -> st.SearchStrategy[str]:
    single = st.integers(lo, hi).map(str)
    rng = st.tuples(st.integers(lo, hi), st.integers(lo, hi)).map(lambda ab: f"{min(ab)}-{max(ab)}")
    stepped = st.tuples(rng, st.integers(1, 7)).map(lambda rs: f"{rs[0]}/{rs[1]}")
    lst = st.lists(st.one_of(single, rng, stepped), min_size=1, max_size=3).map(",".join)
    return st.one_of(st.just("*"), st.integers(2, 9).map(lambda s: f"*/{s}"), lst)


cron_exprs = st.builds(
    lambda *f: " ".join(f),
    _cron_part(0, 59),
    _cron_part(0, 23),
    _cron_part(1, 31),
    _cron_part(1, 12),
    _cron_part(0, 7),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cron_exprs, instants)
def test_cron_next_after_matches_a_reference_scan(expr: str, t: dt.datetime) -> None:
    try:
        s = parse_schedule(expr)
    except ScheduleError as e:
        assert "never runs" in str(e)
        return
    got = s.next_after(t)
    assert got > t
    assert _reference_matches(expr, got.replace(tzinfo=None)), (expr, got)
    # no matching minute between t and got (scan up to 3 days)
    probe = t.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    limit = min(got, t + dt.timedelta(days=3))
    while probe < limit:
        assert not _reference_matches(expr, probe.replace(tzinfo=None)), (expr, probe)
        probe += dt.timedelta(minutes=1)
    prev = s.previous_before(t)
    assert prev <= t and _reference_matches(expr, prev.replace(tzinfo=None))
    assert s.next_after(prev) > t


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(phrases, cron_exprs), instants, zones)
def test_next_and_previous_agree(text: str, t: dt.datetime, zone: dt.tzinfo) -> None:
    try:
        s = parse_schedule(text)
    except ScheduleError:
        return
    nxt = utc(s.next_after(t, zone))
    prev = utc(s.previous_before(t, zone))
    assert prev <= t < nxt
    assert utc(s.previous_before(nxt - dt.timedelta(microseconds=1), zone)) == prev
    assert utc(s.previous_before(nxt, zone)) == nxt
    after_prev = utc(s.next_after(prev, zone))
    assert after_prev == nxt or after_prev <= t


def test_monthly_last_runs_on_each_last_day() -> None:
    s = parse_schedule("monthly last 23:00")
    t = at("2023-12-31T23:00+01:00").astimezone(BERLIN)
    for run in s.runs(t, 24):
        assert run.day == calendar.monthrange(run.year, run.month)[1]
        assert (run.hour, run.minute) == (23, 0)


# --- systemd OnCalendar ---------------------------------------------------------------------

SYSTEMD_CASES = [
    # schedule, zones to compare in (wall times avoid the hours the clocks change)
    ("hourly :15", ["UTC", "Europe/Berlin", "Australia/Lord_Howe"]),
    ("daily 04:30", ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]),
    ("daily", ["UTC", "America/New_York"]),
    ("weekly mon,thu 04:00", ["UTC", "Europe/Berlin"]),
    ("weekly sun,mon-wed 23:59", ["UTC", "America/New_York"]),
    ("monthly 1,15 03:30", ["UTC", "America/New_York"]),
    ("monthly last 23:00", ["UTC", "Europe/Berlin"]),
    ("@yearly", ["UTC", "Europe/Berlin"]),
    ("@weekly", ["UTC"]),
    ("*/15 * * * *", ["UTC", "America/New_York"]),
    ("0 9-17/4 * jan-mar mon-fri", ["UTC", "Europe/Berlin"]),
    ("0 0 13 * fri", ["UTC", "Europe/Berlin"]),
    ("0 12 */10 * 7", ["UTC"]),
    ("0 0 29 2 *", ["UTC"]),
    ("0 0 30,31 2,4 *", ["UTC"]),
    ("5 4 1-7 */2 1", ["UTC", "America/New_York"]),
    ("0,30 2 * * *", ["UTC"]),
]
BASES = ["2024-01-15T10:07:00+00:00", "2024-06-10T00:00:00+00:00", "2027-02-20T22:00:00+00:00"]


def _systemd_elapses(expr: str, zone: str, base: dt.datetime, n: int) -> list[dt.datetime]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        skip_or_fail("systemd-analyze not installed (Debian package systemd)")
        raise AssertionError("unreachable")
    proc = subprocess.run(
        [tool, "calendar", f"--iterations={n}", f"--base-time=@{int(base.timestamp())}", expr],
        env={**os.environ, "TZ": zone},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    utc = re.findall(r"\(in UTC\): \w+ (\S+ \S+) UTC", proc.stdout)
    if not utc:  # TZ=UTC: the elapse lines are UTC already
        utc = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\S+ \S+) UTC", proc.stdout)
    assert len(utc) == n, proc.stdout
    return [dt.datetime.fromisoformat(u).replace(tzinfo=UTC) for u in utc]


@pytest.mark.parametrize(("text", "zones"), SYSTEMD_CASES)
def test_oncalendar_matches_systemd(text: str, zones: list[str]) -> None:
    s = parse_schedule(text)
    n = 5
    for zone in zones:
        for base_text in BASES:
            base = at(base_text)
            union: set[dt.datetime] = set()
            for expr in s.oncalendar():
                union.update(_systemd_elapses(expr, zone, base, n))
            theirs = sorted(union)[:n]
            ours = [r.astimezone(UTC) for r in s.runs(base, n, ZONES[zone])]
            assert ours == theirs, (text, zone, base_text, s.oncalendar())


def test_systemd_skips_a_nonexistent_time_where_safehold_runs_after_the_gap() -> None:
    """The documented difference: systemd drops 02:30 on the day Berlin springs forward."""
    s = parse_schedule("daily 02:30")
    base = at("2024-03-30T12:00+01:00")
    theirs = _systemd_elapses(s.oncalendar()[0], "Europe/Berlin", base, 1)
    assert theirs == [at("2024-04-01T00:30+00:00")]
    assert s.next_after(base, BERLIN) == at("2024-03-31T03:00+02:00")


# --- delays ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30m", 1800), ("90s", 90), ("1h30m", 5400), ("2h", 7200), ("0", 0), ("45", 45),
     (" 1H 30M ", 5400), ("1.5h", 5400), ("1d", 86400)],
)  # fmt: skip
def test_parse_delay(text: str, seconds: float) -> None:
    assert parse_delay(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "30x", "-5m", "1h-30m", "nan", "inf", "30 minutes"])
def test_parse_delay_errors(text: str) -> None:
    with pytest.raises(UsageError, match=r"is not a delay \(expected e.g. 90s, 30m or 1h30m\)"):
        parse_delay(text)


def test_schedule_is_hashable_and_comparable() -> None:
    assert parse_schedule("daily 02:30") == parse_schedule("daily 02:30")
    assert isinstance(hash(parse_schedule("daily")), int)
    assert isinstance(parse_schedule("daily"), Schedule)
