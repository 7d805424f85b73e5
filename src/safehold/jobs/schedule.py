"""Job schedules: parsing, the next and previous run, and translations to cron and systemd.

Accepted forms (case-insensitive, any amount of white space between words):

* five-field cron expressions ``MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK`` with ``*``, lists
  (``1,15``), ranges (``1-5``), steps (``*/15``, ``1-30/2``, ``5/10`` = ``5-59/10``), month names
  ``jan``..``dec`` and day names ``mon``..``sun`` (``0`` and ``7`` are Sunday). As in cron, when
  both day fields are restricted (neither starts with ``*``) a day matches if *either* matches;
  otherwise both must match;
* ``@hourly``, ``@daily`` (``@midnight``), ``@weekly`` (Sunday 00:00, as in cron), ``@monthly``,
  ``@yearly`` (``@annually``);
* phrases: ``hourly`` (at :00), ``hourly :15`` or ``hourly 15``; ``daily`` (00:00), ``daily 02:30``;
  ``weekly`` (Monday 00:00), ``weekly mon 04:00``, ``weekly mon,thu 04:00``, ``weekly mon-fri``;
  ``monthly`` (day 1, 00:00), ``monthly 1 03:00``, ``monthly 1,15 03:00``, ``monthly last 23:00``.
  Times are ``HH:MM`` on a 24-hour clock. A monthly day must be 1-28 or ``last``: days 29-31 do
  not exist in every month, and rather than guess whether such a month is skipped or runs on its
  last day, the schedule says so explicitly (``monthly last``). An optional ``at``/``on`` may
  precede the time or the days (``daily at 02:30``).

Times are wall-clock times of a time zone (the daemon's local zone). Daylight saving time follows
Debian's cron, which distinguishes *fixed-time* schedules from *wildcard* ones:

* a fixed-time schedule (every phrase except ``hourly``; a cron expression whose minute and hour
  fields both name fixed values) runs once per scheduled wall time: a wall time that does not
  exist (skipped when the clocks spring forward) runs at the first instant after the gap
  (e.g. ``daily 02:30`` runs at 03:00 on the day Europe/Berlin springs forward), and one that
  occurs twice (when the clocks fall back) runs at its first occurrence only;
* a wildcard schedule (``hourly``, ``@hourly``, or a cron expression whose minute or hour field
  starts with ``*``) follows real time: a wall time in a gap does not exist, so nothing runs
  there, and a repeated hour runs again, so ``hourly`` runs every real hour.

systemd timers (see :meth:`Schedule.oncalendar`) differ at these two moments only: systemd skips a
nonexistent wall time altogether and runs a repeated wall time once even for hourly timers.
"""

from __future__ import annotations

import calendar
import datetime as dt
import difflib
import json
import os
import re
import zoneinfo
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from safehold.errors import UsageError

UTC = dt.UTC

_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # cron numbering, 0 = Sunday
_DOW_FULL = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
_DOW_TITLE = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_SYSTEMD_DOW = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")
_MONTH_NAMES = (
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
)  # fmt: skip
_PHRASE_WORDS = ("hourly", "daily", "weekly", "monthly", "last", "at", "on")
_AT_WORDS = ("@hourly", "@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually")
_VOCABULARY = frozenset(_PHRASE_WORDS + _AT_WORDS + _DOW_NAMES + _DOW_FULL + _MONTH_NAMES)

_ACCEPTED = (
    'expected a cron expression such as "30 2 * * *", @hourly, @daily, @weekly, @monthly, '
    "@yearly, or hourly [:MM], daily [HH:MM], weekly [DAYS] [HH:MM], monthly [DAY|last] [HH:MM]"
)

# Margins (hours) around an instant within which its wall-clock time may lie in any zone: UTC
# offsets stay within -12h..+14h today and within about ±16h in historical local mean time.
_MARGIN = dt.timedelta(hours=26)
_MAX_YEARS = 30  # a schedule that can run runs at least once every 8 years (29 February)


class ScheduleError(UsageError):
    """A text that is not a schedule. ``value`` is the text, ``suggestion`` a close schedule
    that parses (for a typo), or None."""

    def __init__(self, value: str, reason: str | None = None, suggestion: str | None = None):
        self.value = value
        self.suggestion = suggestion
        self.reason = reason
        quoted = json.dumps(value)
        if suggestion is not None:
            msg = f"{quoted} is not a schedule; did you mean {json.dumps(suggestion)}?"
        else:
            msg = f"{quoted} is not a schedule: {reason or _ACCEPTED}"
        super().__init__(msg)


class _Invalid(Exception):
    """Internal: why a text does not parse (None: it has no recognisable form at all)."""

    def __init__(self, reason: str | None = None):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: the sets of minutes, hours, days, months and weekdays it runs at.

    ``weekdays`` use cron numbering (0 = Sunday). ``last_day`` adds the last day of each month
    to ``days``. ``day_star``/``weekday_star`` are cron's flags for a day field starting with
    ``*``: when neither is set, a day matches if its day of month *or* its weekday matches.
    ``real_time`` marks a wildcard schedule (see the module documentation for DST)."""

    text: str
    kind: str  # "cron", "hourly", "daily", "weekly", "monthly"
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    last_day: bool = False
    day_star: bool = True
    weekday_star: bool = True
    real_time: bool = False
    fields: tuple[str, ...] = ()  # a cron expression's five fields, names replaced by numbers

    def __str__(self) -> str:
        return self.text

    # --- matching -------------------------------------------------------------------------

    def _day_matches(self, d: dt.date) -> bool:
        dom = d.day in self.days or (
            self.last_day and d.day == calendar.monthrange(d.year, d.month)[1]
        )
        dow = (d.isoweekday() % 7) in self.weekdays
        if self.day_star or self.weekday_star:
            return dom and dow
        return dom or dow

    def _walls(self, start: dt.datetime, forward: bool) -> Iterator[dt.datetime]:
        """Matching naive wall-clock times from ``start`` (a whole minute, included) onwards
        (or backwards), in order."""
        hours = sorted(self.hours, reverse=not forward)
        minutes = sorted(self.minutes, reverse=not forward)
        step = dt.timedelta(days=1 if forward else -1)
        day = start.date()
        limit_year = day.year + (_MAX_YEARS if forward else -_MAX_YEARS)
        first = True
        while dt.MINYEAR < day.year < dt.MAXYEAR:
            if (forward and day.year > limit_year) or (not forward and day.year < limit_year):
                return
            if day.month not in self.months:
                # jump to the first (last) day of the next (previous) month
                if forward:
                    day = (day.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
                else:
                    day = day.replace(day=1) - dt.timedelta(days=1)
                first = False
                continue
            if self._day_matches(day):
                for h in hours:
                    if first and (h < start.hour if forward else h > start.hour):
                        continue
                    for m in minutes:
                        if (
                            first
                            and h == start.hour
                            and (m < start.minute if forward else m > start.minute)
                        ):
                            continue
                        yield dt.datetime(day.year, day.month, day.day, h, m)
            first = False
            try:
                day = day + step
            except OverflowError:
                return

    def _instants(self, wall: dt.datetime, tz: dt.tzinfo) -> list[dt.datetime]:
        """The instants (UTC) at which wall-clock time ``wall`` in ``tz`` runs: one normally;
        none (wildcard) or the end of the gap (fixed-time) when the clocks skip it; both
        occurrences (wildcard) or the first (fixed-time) when it occurs twice."""
        a = wall.replace(tzinfo=tz)
        b = wall.replace(tzinfo=tz, fold=1)
        if a.utcoffset() == b.utcoffset():
            return [a.astimezone(UTC)]
        ua = a.astimezone(UTC)
        ub = b.astimezone(UTC)
        if ua.astimezone(tz).replace(tzinfo=None) == wall:  # it exists: it occurs twice
            first, second = sorted((ua, ub))
            return [first, second] if self.real_time else [first]
        if self.real_time:
            return []
        return [_transition(min(ua, ub), max(ua, ub), tz)]

    def _search(self, t: dt.datetime, tz: dt.tzinfo | None, forward: bool) -> dt.datetime:
        if t.tzinfo is None or t.utcoffset() is None:
            raise ValueError("the time must be timezone-aware")
        zone = tz if tz is not None else t.tzinfo
        t_utc = t.astimezone(UTC)
        naive = t_utc.replace(tzinfo=None, second=0, microsecond=0)
        start = naive - _MARGIN if forward else naive + _MARGIN
        best: dt.datetime | None = None
        for wall in self._walls(start, forward):
            if best is not None:
                best_naive = best.replace(tzinfo=None)
                if (forward and wall > best_naive + _MARGIN) or (
                    not forward and wall < best_naive - _MARGIN
                ):
                    break
            for inst in self._instants(wall, zone):
                if forward:
                    if inst > t_utc and (best is None or inst < best):
                        best = inst
                elif inst <= t_utc and (best is None or inst > best):
                    best = inst
        if best is None:
            raise UsageError(f"schedule {json.dumps(self.text)} does not run within 30 years")
        return best.astimezone(zone)

    def next_after(self, t: dt.datetime, tz: dt.tzinfo | None = None) -> dt.datetime:
        """The first run strictly after the aware datetime ``t``, in wall-clock time of ``tz``
        (default: ``t``'s zone); returned as an aware datetime in that zone.

        Compare and subtract results in UTC (``.astimezone(datetime.UTC)``): Python compares
        two datetimes that share a tzinfo by their wall-clock fields, ignoring the fold, so
        around a DST change such comparisons are wrong."""
        return self._search(t, tz, forward=True)

    def previous_before(self, t: dt.datetime, tz: dt.tzinfo | None = None) -> dt.datetime:
        """The last run at or before the aware datetime ``t`` (the daemon catches it up when it
        was missed)."""
        return self._search(t, tz, forward=False)

    def runs(self, t: dt.datetime, n: int, tz: dt.tzinfo | None = None) -> list[dt.datetime]:
        """The next ``n`` runs after ``t``."""
        out: list[dt.datetime] = []
        for _ in range(n):
            t = self.next_after(t, tz)
            out.append(t)
        return out

    # --- translations ---------------------------------------------------------------------

    def _time_text(self) -> str:
        if len(self.hours) == 1 and len(self.minutes) == 1:
            return f"{min(self.hours):02d}:{min(self.minutes):02d}"
        return ""

    def describe(self) -> str:
        """A human description, e.g. ``every Monday and Thursday at 04:00``."""
        at = self._time_text()
        if self.kind == "hourly":
            return f"every hour at :{min(self.minutes):02d}"
        if self.kind == "daily":
            return f"every day at {at}"
        if self.kind == "weekly":
            names = [_DOW_TITLE[d] for d in _monday_first(self.weekdays)]
            return f"every {_join(names)} at {at}"
        if self.kind == "monthly":
            if self.last_day:
                return f"on the last day of every month at {at}"
            days = sorted(self.days)
            word = "day" if len(days) == 1 else "days"
            return f"on {word} {_join([str(d) for d in days])} of every month at {at}"
        if self.kind == "yearly":
            month = calendar.month_name[min(self.months)]
            return f"every year on {min(self.days)} {month} at {at}"
        return f"cron {json.dumps(self.cron())}"

    def cron(self) -> str:
        """The schedule as the five fields of a cron line. A ``monthly last`` schedule becomes
        days 28-31 (cron has no "last day"); :func:`cron_guard` gives the test to prefix."""
        if self.fields:  # as written: a "*" prefix matters (DST, the either-day rule)
            return " ".join(self.fields)
        return " ".join(
            (
                _cron_list(self.minutes, 0, 59),
                _cron_list(self.hours, 0, 23),
                "28-31" if self.last_day else _cron_list(self.days, 1, 31),
                _cron_list(self.months, 1, 12),
                _cron_list(self.weekdays, 0, 6),
            )
        )

    def cron_guard(self) -> str | None:
        """A shell test a cron command must pass to run (``monthly last``: tomorrow is the 1st),
        or None. ``%`` is escaped for cron."""
        if self.last_day:
            return '[ "$(date -d tomorrow +\\%d)" = 01 ]'
        return None

    def oncalendar(self) -> list[str]:
        """systemd ``OnCalendar=`` expressions whose union is this schedule (in the system's
        local time zone; see the module documentation for how DST differs)."""
        time = f"{_sd_list(self.hours, 0, 23)}:{_sd_list(self.minutes, 0, 59)}:00"
        months = _sd_list(self.months, 1, 12)
        if self.last_day:
            dom = "~01"
        else:
            dom = "-" + _sd_list(self.days, 1, 31)
        dow = _sd_weekdays(self.weekdays)
        if self.day_star or self.weekday_star:
            prefix = f"{dow} " if dow != "*" else ""
            return [f"{prefix}*-{months}{dom} {time}"]
        # cron's either-day rule: the union of a weekday schedule and a day-of-month schedule
        by_weekday = f"{dow} *-{months}-* {time}" if dow != "*" else f"*-{months}-* {time}"
        return [by_weekday, f"*-{months}{dom} {time}"]


def _transition(lo: dt.datetime, hi: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
    """The first instant in (lo, hi] whose UTC offset in ``tz`` differs from lo's: the end of a
    gap in wall-clock time."""
    before = lo.astimezone(tz).utcoffset()
    a, b = int(lo.timestamp()), int(hi.timestamp()) + 1
    while b - a > 1:  # invariant: offset(a) == before, offset(b) != before
        mid = (a + b) // 2
        if dt.datetime.fromtimestamp(mid, tz).utcoffset() == before:
            a = mid
        else:
            b = mid
    return dt.datetime.fromtimestamp(b, UTC)


def _join(items: list[str], word: str = "and") -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {word} " + items[-1]


def _monday_first(days: Iterable[int]) -> list[int]:
    return sorted(days, key=lambda d: (d + 6) % 7)


def _runs(values: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def _cron_list(values: frozenset[int], lo: int, hi: int) -> str:
    if values == frozenset(range(lo, hi + 1)):
        return "*"
    parts = []
    for a, b in _runs(sorted(values)):
        if a == b:
            parts.append(str(a))
        elif b == a + 1:
            parts += [str(a), str(b)]
        else:
            parts.append(f"{a}-{b}")
    return ",".join(parts)


def _sd_list(values: frozenset[int], lo: int, hi: int) -> str:
    if values == frozenset(range(lo, hi + 1)):
        return "*"
    parts = []
    for a, b in _runs(sorted(values)):
        if a == b:
            parts.append(f"{a:02d}")
        elif b == a + 1:
            parts += [f"{a:02d}", f"{b:02d}"]
        else:
            parts.append(f"{a:02d}..{b:02d}")
    return ",".join(parts)


def _sd_weekdays(values: frozenset[int]) -> str:
    if values == frozenset(range(7)):
        return "*"
    order = [(d + 1) % 7 for d in range(7)]  # Mon..Sun
    idx = sorted(order.index(d) for d in values)
    parts = []
    for a, b in _runs(idx):
        if a == b:
            parts.append(_SYSTEMD_DOW[order[a]])
        elif b == a + 1:
            parts += [_SYSTEMD_DOW[order[a]], _SYSTEMD_DOW[order[b]]]
        else:
            parts.append(f"{_SYSTEMD_DOW[order[a]]}..{_SYSTEMD_DOW[order[b]]}")
    return ",".join(parts)


# --- parsing ----------------------------------------------------------------------------------

_ALL_MIN = frozenset(range(60))
_ALL_HOUR = frozenset(range(24))
_ALL_DOM = frozenset(range(1, 32))
_ALL_MONTH = frozenset(range(1, 13))
_ALL_DOW = frozenset(range(7))
_TIME_RE = re.compile(r"^(\d{1,2}):(\d{2})$")
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # the most each month can have


def _parse_time(tok: str) -> tuple[int, int]:
    m = _TIME_RE.match(tok)
    if not m:
        raise _Invalid(f"{json.dumps(tok)} is not a time (expected HH:MM, 24-hour)")
    h, mi = int(m.group(1)), int(m.group(2))
    if h > 23:
        raise _Invalid(f"hour {h} is out of range (00-23)")
    if mi > 59:
        raise _Invalid(f"minute {mi} is out of range (00-59)")
    return h, mi


def _day_name(tok: str) -> int:
    if tok in _DOW_NAMES:
        return _DOW_NAMES.index(tok)
    if tok in _DOW_FULL:
        return _DOW_FULL.index(tok)
    raise _Invalid(f"{json.dumps(tok)} is not a day of the week (mon, tue, ... sun)")


def _parse_weekdays(tok: str) -> frozenset[int]:
    out: set[int] = set()
    for part in tok.split(","):
        a, sep, b = part.partition("-")
        if not sep:
            out.add(_day_name(a))
            continue
        ia, ib = (_day_name(a) + 6) % 7, (_day_name(b) + 6) % 7  # Monday = 0
        if ib < ia:
            raise _Invalid(f"the day range {part} goes backwards (weeks start on Monday)")
        out.update((i + 1) % 7 for i in range(ia, ib + 1))
    return frozenset(out)


def _parse_monthdays(tok: str) -> tuple[frozenset[int], bool]:
    if tok == "last":
        return frozenset(), True
    out: set[int] = set()
    for part in tok.split(","):
        a, sep, b = part.partition("-")
        try:
            lo = int(a)
            hi = int(b) if sep else lo
        except ValueError:
            raise _Invalid(
                f'{json.dumps(part)} is not a day of the month (1-28 or "last")'
            ) from None
        for d in (lo, hi):
            if not 1 <= d <= 28:
                if 29 <= d <= 31:
                    raise _Invalid(
                        f'day {d} does not exist in every month; use a day from 1 to 28 or "last"'
                    )
                raise _Invalid(f'day {d} is out of range (1-28 or "last")')
        if hi < lo:
            raise _Invalid(f"the day range {part} goes backwards")
        out.update(range(lo, hi + 1))
    return frozenset(out), False


def _phrase(words: list[str], text: str) -> Schedule:
    words = [w for w in words if w not in ("at", "on")]
    kind, args = words[0], words[1:]
    if kind == "hourly":
        minute = 0
        if len(args) > 1:
            raise _Invalid("hourly takes at most a minute (hourly :15)")
        if args:
            m = re.match(r"^:?(\d{1,2})$", args[0])
            if not m:
                raise _Invalid(f"{json.dumps(args[0])} is not a minute (hourly :15)")
            minute = int(m.group(1))
            if minute > 59:
                raise _Invalid(f"minute {minute} is out of range (00-59)")
        return Schedule(
            text, "hourly", frozenset({minute}), _ALL_HOUR, _ALL_DOM, _ALL_MONTH, _ALL_DOW,
            real_time=True,
        )  # fmt: skip
    h = mi = 0
    if args and ":" in args[-1]:
        h, mi = _parse_time(args[-1])
        args = args[:-1]
    if kind == "daily":
        if args:
            raise _Invalid("daily takes at most a time (daily 02:30)")
        return Schedule(
            text, "daily", frozenset({mi}), frozenset({h}), _ALL_DOM, _ALL_MONTH, _ALL_DOW
        )
    if kind == "weekly":
        if len(args) > 1:
            raise _Invalid("weekly takes days and a time (weekly mon,thu 04:00)")
        weekdays = _parse_weekdays(args[0]) if args else frozenset({1})
        return Schedule(
            text, "weekly", frozenset({mi}), frozenset({h}), _ALL_DOM, _ALL_MONTH, weekdays,
            weekday_star=False,
        )  # fmt: skip
    if kind == "monthly":
        if len(args) > 1:
            raise _Invalid("monthly takes a day and a time (monthly 1 03:00)")
        days, last = _parse_monthdays(args[0]) if args else (frozenset({1}), False)
        return Schedule(
            text, "monthly", frozenset({mi}), frozenset({h}), days, _ALL_MONTH, _ALL_DOW,
            last_day=last, day_star=False,
        )  # fmt: skip
    raise _Invalid(None)


def _cron_value(tok: str, lo: int, hi: int, names: tuple[str, ...], what: str) -> int:
    if tok in names:
        return names.index(tok) + lo  # month names count from 1, day names from 0 (Sunday)
    if not tok.isdigit():
        raise _Invalid(f"{json.dumps(tok)} is not a valid {what}")
    v = int(tok)
    if not lo <= v <= hi:
        raise _Invalid(f"{what} {v} is out of range ({lo}-{hi})")
    return v


def _cron_field(
    text: str, lo: int, hi: int, what: str, names: tuple[str, ...] = ()
) -> frozenset[int]:
    out: set[int] = set()
    if not text:
        raise _Invalid(f"empty {what} field")
    for part in text.split(","):
        rng, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise _Invalid(f"{json.dumps(part)}: the step must be a positive number")
            step = int(step_text)
        if rng == "*":
            a, b = lo, hi
        else:
            first, dash, last = rng.partition("-")
            a = _cron_value(first, lo, hi, names, what)
            if dash:
                b = _cron_value(last, lo, hi, names, what)
                if b < a:
                    raise _Invalid(f"the {what} range {rng} goes backwards")
            else:
                if slash:
                    raise _Invalid(f"{json.dumps(part)}: a step needs a range or * (like */15)")
                b = a
        out.update(range(a, b + 1, step))
    return frozenset(out)


_AT_ALIASES = {
    "@hourly": "hourly",
    "@daily": "daily",
    "@midnight": "daily",
    "@weekly": "0 0 * * 0",
    "@monthly": "monthly",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}


def _cron(fields: list[str], text: str) -> Schedule:
    minute, hour, dom, month, dow = fields
    minutes = _cron_field(minute, 0, 59, "minute")
    hours = _cron_field(hour, 0, 23, "hour")
    days = _cron_field(dom, 1, 31, "day of month")
    months = _cron_field(month, 1, 12, "month", _MONTH_NAMES)
    weekdays = frozenset(d % 7 for d in _cron_field(dow, 0, 7, "day of week", _DOW_NAMES))
    day_star, weekday_star = dom.startswith("*"), dow.startswith("*")
    # when both must match, some month must have one of the days
    exists = any(d <= _MONTH_DAYS[m - 1] for m in months for d in days)
    if (day_star or weekday_star) and not exists:
        names = [calendar.month_name[m] for m in sorted(months)]
        which = names[0] if len(names) == 1 else "none of " + _join(names, "or")
        has = "has no" if len(names) == 1 else "has"
        raise _Invalid(f"it never runs ({which} {has} day {min(days)})")
    return Schedule(
        text,
        "cron",
        minutes,
        hours,
        days,
        months,
        weekdays,
        day_star=day_star,
        weekday_star=weekday_star,
        real_time=minute.startswith("*") or hour.startswith("*"),
        fields=(
            minute,
            hour,
            dom,
            _numbered(month, _MONTH_NAMES, 1),
            _numbered(dow, _DOW_NAMES, 0),
        ),
    )


def _numbered(field: str, names: tuple[str, ...], first: int) -> str:
    """A cron field with its names replaced by numbers (Debian's cron takes no name ranges)."""
    return re.sub("[a-z]+", lambda m: str(names.index(m.group(0)) + first), field)


def _parse(text: str) -> Schedule:
    words = text.lower().split()
    if not words:
        raise _Invalid("it is empty")
    if words[0] in _AT_ALIASES:
        if len(words) > 1:
            raise _Invalid(f"{words[0]} takes no arguments")
        alias = _AT_ALIASES[words[0]].split()
        sched = _phrase(alias, text) if len(alias) == 1 else _cron(alias, text)
        if words[0] in ("@yearly", "@annually"):
            return replace(sched, kind="yearly")
        if words[0] == "@weekly":
            return replace(sched, kind="weekly")
        return sched
    if words[0] in ("hourly", "daily", "weekly", "monthly"):
        return _phrase(words, text)
    if len(words) == 5 and not any(w in ("at", "on", "last") for w in words):
        return _cron(words, text)
    raise _Invalid(None)


def _fix_word(word: str) -> str:
    m = re.match(r"^(\d{1,2})[.h](\d{2})$", word)
    if m:
        return f"{m.group(1)}:{m.group(2)}"

    def fix(match: re.Match[str]) -> str:
        w = match.group(0)
        if w in _VOCABULARY:
            return w
        close = difflib.get_close_matches(w, _VOCABULARY, n=1, cutoff=0.6)
        return close[0] if close else w

    return re.sub(r"@?[a-z]+", fix, word)


def _suggest(text: str) -> str | None:
    words = text.lower().split()
    fixed = " ".join(_fix_word(w) for w in words)
    if fixed == " ".join(words):
        return None
    try:
        _parse(fixed)
    except _Invalid:
        return None
    return fixed


def parse_schedule(text: str) -> Schedule:
    """Parse a schedule (see the module documentation); a :class:`ScheduleError` (a
    UsageError) says why not, with a suggestion for a typo."""
    stripped = " ".join(text.split())
    try:
        return _parse(stripped)
    except _Invalid as e:
        raise ScheduleError(text, e.reason, _suggest(stripped)) from None


_DELAY_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_delay(text: str) -> float:
    """A delay in seconds: ``90s``, ``30m``, ``2h``, ``1h30m``, ``1d``; a bare number is
    seconds."""
    s = "".join(text.lower().split())
    try:
        value = float(s)
    except ValueError:
        parts = _DELAY_RE.findall(s)
        if not s or "".join(n + u for n, u in parts) != s:
            raise UsageError(
                f"{json.dumps(text)} is not a delay (expected e.g. 90s, 30m or 1h30m)"
            ) from None
        value = sum(float(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)
    if not value >= 0 or value == float("inf"):
        raise UsageError(f"{json.dumps(text)} is not a delay (expected e.g. 90s, 30m or 1h30m)")
    return value


def local_zone() -> dt.tzinfo:
    """The local time zone with its rules (DST included): ``$TZ`` if it names a zone, else
    ``/etc/localtime``. (``datetime.now().astimezone().tzinfo`` is only today's fixed offset:
    a time computed with it across a DST change is an hour off.)"""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            pass
    try:
        with open("/etc/localtime", "rb") as f:
            return zoneinfo.ZoneInfo.from_file(f, key="localtime")
    except (OSError, ValueError):
        tz = dt.datetime.now().astimezone().tzinfo
        return tz if tz is not None else dt.UTC
