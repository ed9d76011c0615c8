"""When is a backup policy due? Pure schedule evaluation.

No I/O and no clock: every function takes ``now`` (or ``after``) explicitly. Datetimes going in must be
timezone-aware; datetimes coming out are aware and in UTC. Wall-clock forms (daily, weekly, monthly, cron,
windows) are computed in the schedule's IANA time zone. The semantics are documented in ``docs/schedules.md``;
the short version:

* Daylight saving time: a wall-clock time that does not exist (spring forward) fires once, at the first
  instant after the gap (02:30 becomes 03:00); a wall-clock time that exists twice (fall back) fires once, at
  its first occurrence. Cron expressions whose minute or hour field starts with ``*`` follow Vixie cron
  instead: they fire at every real occurrence and skip times inside a gap.
* Monthly on day 29-31 runs on the month's last day in shorter months (never skips a month).
* Missed fire times (daemon down, window closed) collapse into one run.
* Jitter is a deterministic offset in ``[0, jitter)`` from a hash of a caller-supplied key.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import Final, Literal, TypeAlias
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from reconciler.rules.durations import format_duration

__all__ = [
    "LAST",
    "After",
    "Cron",
    "CronSpec",
    "Daily",
    "Due",
    "Every",
    "Manual",
    "Monthly",
    "NotDue",
    "Once",
    "Schedule",
    "ScheduleError",
    "ScheduleSpec",
    "Weekly",
    "Window",
    "default_rpo",
    "describe",
    "due",
    "in_window",
    "jitter_offset",
    "next_due",
    "next_fire",
    "next_window_open",
    "parse_cron",
    "previous_fire",
]

UTC: Final = timezone.utc

LAST: Final = "last"
"""``Monthly(day=LAST, ...)``: the last day of every month."""

DAY_NAMES: Final = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
"""Python weekday numbering, used by ``Weekly.days`` and ``Window.days``: Monday = 0 ... Sunday = 6."""

# Searching forward/backward for a fire time. The rarest accepted cron day is 29 February on one weekday
# ('0 0 29 2 */7': day-of-month restricted, day-of-week starting with '*', so both must match), which recurs
# after at most 40 years in the Gregorian calendar; every other accepted expression fires more often.
_SEARCH_DAYS: Final = 366 * 41
_MISSED_CAP: Final = 1000


class ScheduleError(ValueError):
    """An invalid schedule (bad cron expression, unknown time zone, out-of-range value ...)."""


# --------------------------------------------------------------------------------------------------
# Schedule forms
# --------------------------------------------------------------------------------------------------


def _require_aware(value: datetime, what: str) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ScheduleError(f"{what} must be timezone-aware, got naive {value.isoformat()}")


def _require_wall_time(value: time, what: str) -> None:
    if not isinstance(value, time):
        raise ScheduleError(f"{what} must be a datetime.time, got {type(value).__name__}")
    if value.tzinfo is not None:
        raise ScheduleError(f"{what} must be a wall-clock time without tzinfo (the schedule has a time zone)")


def _check_days(days: frozenset[int], what: str) -> None:
    if not isinstance(days, frozenset):
        raise ScheduleError(f"{what} must be a frozenset of weekday numbers (Mon=0 ... Sun=6)")
    if not days:
        raise ScheduleError(f"{what} must name at least one day")
    for day in days:
        if isinstance(day, bool) or not isinstance(day, int) or not 0 <= day <= 6:
            raise ScheduleError(f"{what}: {day!r} is not a weekday number (Mon=0 ... Sun=6)")


@dataclass(frozen=True, slots=True)
class Once:
    """Run once, at ``at`` (an aware datetime). Due from ``at`` until the first run starts."""

    at: datetime

    def __post_init__(self) -> None:
        _require_aware(self.at, "one-time schedule 'at'")


@dataclass(frozen=True, slots=True)
class Every:
    """Run every ``interval`` (at least one minute), measured from the start of the previous run."""

    interval: timedelta

    def __post_init__(self) -> None:
        if not isinstance(self.interval, timedelta) or self.interval < timedelta(minutes=1):
            raise ScheduleError(
                f"periodic schedule interval must be at least 1 minute, got {_spoken(self.interval)}"
            )


@dataclass(frozen=True, slots=True)
class Daily:
    """Run every day at the wall-clock time ``at`` in the schedule's time zone."""

    at: time

    def __post_init__(self) -> None:
        _require_wall_time(self.at, "daily schedule 'at'")


@dataclass(frozen=True, slots=True)
class Weekly:
    """Run on ``days`` (Mon=0 ... Sun=6) at the wall-clock time ``at``."""

    days: frozenset[int]
    at: time

    def __post_init__(self) -> None:
        _check_days(self.days, "weekly schedule 'days'")
        _require_wall_time(self.at, "weekly schedule 'at'")


@dataclass(frozen=True, slots=True)
class Monthly:
    """Run on day ``day`` (1-31) of every month, or on its last day (``LAST``), at ``at``.

    A day that a month does not have (31 in April, 29-31 in February) means that month's last day: a monthly
    backup never silently skips a month. (Use a cron expression for "only months that have a 31st".)
    """

    day: int | Literal["last"]
    at: time

    def __post_init__(self) -> None:
        if self.day != LAST and (
            isinstance(self.day, bool) or not isinstance(self.day, int) or not 1 <= self.day <= 31
        ):
            raise ScheduleError(f"monthly schedule 'day' must be 1-31 or {LAST!r}, got {self.day!r}")
        _require_wall_time(self.at, "monthly schedule 'at'")


@dataclass(frozen=True, slots=True)
class CronSpec:
    """A parsed 5-field cron expression. Day-of-week uses cron numbering here: Sunday = 0 ... Saturday = 6."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days_of_month: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]
    dom_restricted: bool
    """Day-of-month field does not start with ``*`` (Vixie rule)."""
    dow_restricted: bool
    """Day-of-week field does not start with ``*`` (Vixie rule)."""
    fixed_time: bool
    """Neither minute nor hour starts with ``*``: DST gaps shift the run, repeated times run once."""
    times: tuple[time, ...]
    """Every (hour, minute) of a matching day, sorted."""

    def matches_date(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom_ok = day.day in self.days_of_month
        dow_ok = (day.weekday() + 1) % 7 in self.days_of_week
        if self.dom_restricted and self.dow_restricted:
            return dom_ok or dow_ok  # Vixie: both restricted -> either matches
        return dom_ok and dow_ok


@dataclass(frozen=True, slots=True)
class Cron:
    """A 5-field cron expression (Vixie semantics), evaluated in the schedule's time zone."""

    expression: str
    parsed: CronSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parsed", parse_cron(self.expression))


@dataclass(frozen=True, slots=True)
class After:
    """Run after policy ``policy`` has succeeded (once per upstream success)."""

    policy: str

    def __post_init__(self) -> None:
        if not isinstance(self.policy, str) or not self.policy:
            raise ScheduleError("'after' schedule needs the name of a policy")


@dataclass(frozen=True, slots=True)
class Manual:
    """Never due: runs only when started by hand."""


ScheduleSpec: TypeAlias = Once | Every | Daily | Weekly | Monthly | Cron | After | Manual
_Calendar: TypeAlias = Daily | Weekly | Monthly | Cron


@dataclass(frozen=True, slots=True)
class Window:
    """Allowed start window in the schedule's time zone: no run starts outside it.

    ``start`` is inclusive, ``end`` exclusive. ``end <= start`` means the window crosses midnight
    (22:00-06:00). ``days`` (Mon=0 ... Sun=6), if given, are the days on which the window *opens*: a Friday
    22:00-06:00 window runs until Saturday 06:00.
    """

    start: time
    end: time
    days: frozenset[int] | None = None

    def __post_init__(self) -> None:
        _require_wall_time(self.start, "window 'start'")
        _require_wall_time(self.end, "window 'end'")
        if self.start == self.end:
            raise ScheduleError(
                f"window start and end are both {_fmt_time(self.start)}: a window must have a length "
                "(omit the window to allow any time)"
            )
        if self.days is not None:
            _check_days(self.days, "window 'days'")

    @property
    def crosses_midnight(self) -> bool:
        return self.end < self.start


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule form plus where and when it may start."""

    spec: ScheduleSpec
    timezone: str = "UTC"
    window: Window | None = None
    jitter: timedelta = timedelta(0)

    def __post_init__(self) -> None:
        if not isinstance(self.spec, Once | Every | Daily | Weekly | Monthly | Cron | After | Manual):
            raise ScheduleError(f"unknown schedule form {type(self.spec).__name__}")
        _load_zone(self.timezone)
        if not isinstance(self.jitter, timedelta) or self.jitter < timedelta(0):
            raise ScheduleError(f"jitter must be a non-negative duration, got {_spoken(self.jitter)}")

    @property
    def zone(self) -> ZoneInfo:
        return _load_zone(self.timezone)


def _spoken(value: object) -> str:
    """A duration as the user writes it (``30s``, ``-1m``), never a Python repr."""
    if isinstance(value, timedelta):
        return "-" + format_duration(-value) if value < timedelta(0) else format_duration(value)
    return repr(value)


def _load_zone(name: str) -> ZoneInfo:
    if not isinstance(name, str) or not name:
        raise ScheduleError(f"time zone must be an IANA name such as 'Europe/Berlin', got {name!r}")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"unknown time zone {name!r}: expected an IANA name such as 'Europe/Berlin' or 'UTC'"
        ) from None


# --------------------------------------------------------------------------------------------------
# Cron parsing
# --------------------------------------------------------------------------------------------------

_MONTH_NAMES: Final = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1
    )
}
_DOW_NAMES: Final = {
    name: number for number, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))
}
# (name, lowest, highest, highest for '*', names)
_FIELDS: Final[tuple[tuple[str, int, int, int, Mapping[str, int] | None], ...]] = (
    ("minute", 0, 59, 59, None),
    ("hour", 0, 23, 23, None),
    ("day-of-month", 1, 31, 31, None),
    ("month", 1, 12, 12, _MONTH_NAMES),
    ("day-of-week", 0, 7, 6, _DOW_NAMES),
)
_SHORTCUTS: Final = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MAX_MONTH_DAYS: Final = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_NUMBER = re.compile(r"[0-9]+")


def parse_cron(expression: str) -> CronSpec:
    """Parse a 5-field cron expression (minute hour day-of-month month day-of-week).

    Supports ``*``, lists (``1,15``), ranges (``1-5``), steps (``*/15``, ``0-30/10``), month and weekday
    names (``jan``, ``mon-fri``, case-insensitive), ``7`` as Sunday, and the shortcuts ``@hourly``,
    ``@daily``/``@midnight``, ``@weekly``, ``@monthly``, ``@yearly``/``@annually``. Raises
    :class:`ScheduleError` naming the field and the bad token.
    """
    if not isinstance(expression, str):
        raise ScheduleError(f"cron expression must be a string, got {type(expression).__name__}")
    text = expression.strip()
    prefix = f"cron expression {expression!r}"
    if not text:
        raise ScheduleError(
            "cron expression is empty: expected 5 fields 'minute hour day-of-month month day-of-week', "
            "e.g. '0 2 * * *'"
        )
    if text.startswith("@"):
        replacement = _SHORTCUTS.get(text.lower())
        if replacement is None:
            raise ScheduleError(
                f"{prefix}: unknown shortcut {text!r}; known: {', '.join(_SHORTCUTS)} "
                "(@reboot is not supported)"
            )
        text = replacement
    parts = text.split()
    if len(parts) != 5:
        hint = " (seconds and year fields are not supported)" if len(parts) in (6, 7) else ""
        raise ScheduleError(
            f"{prefix}: expected 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(parts)}{hint}"
        )
    values = [
        _parse_field(prefix, part, name, low, high, star_high, names)
        for part, (name, low, high, star_high, names) in zip(parts, _FIELDS, strict=True)
    ]
    minutes, hours, doms, months, dows = values
    dows = frozenset(0 if d == 7 else d for d in dows)
    dom_restricted = not parts[2].startswith("*")
    dow_restricted = not parts[4].startswith("*")
    if (
        dom_restricted
        and not dow_restricted
        and not any(d <= _MAX_MONTH_DAYS[m - 1] for d in doms for m in months)
    ):
        raise ScheduleError(
            f"{prefix}: day-of-month {','.join(map(str, sorted(doms)))} never occurs in month "
            f"{','.join(map(str, sorted(months)))}, so the schedule would never run"
        )
    times = tuple(time(h, m) for h in sorted(hours) for m in sorted(minutes))
    return CronSpec(
        expression=expression,
        minutes=minutes,
        hours=hours,
        days_of_month=doms,
        months=months,
        days_of_week=dows,
        dom_restricted=dom_restricted,
        dow_restricted=dow_restricted,
        fixed_time=not parts[0].startswith("*") and not parts[1].startswith("*"),
        times=times,
    )


def _step(item: str, step_text: str, fail: Callable[[str], ScheduleError]) -> int:
    """The ``/step`` of a cron field's ``item``: a number of at least 1."""
    if not _NUMBER.fullmatch(step_text):
        raise fail(f"step {step_text!r} in {item!r} is not a number")
    step = int(step_text)
    if step == 0:
        raise fail(f"step in {item!r} must be at least 1")
    return step


def _parse_field(
    prefix: str, text: str, name: str, low: int, high: int, star_high: int, names: Mapping[str, int] | None
) -> frozenset[int]:
    def fail(message: str) -> ScheduleError:
        return ScheduleError(f"{prefix}: {name} field {text!r}: {message}")

    def value(token: str) -> int:
        if _NUMBER.fullmatch(token):
            number = int(token)
            if not low <= number <= high:
                raise fail(f"{number} is out of range {low}-{high}")
            return number
        if names is not None and token.lower() in names:
            return names[token.lower()]
        if token == "":
            raise fail("missing value")
        if names is not None:
            examples = ", ".join(list(names)[:3])
            raise fail(f"{token!r} is neither a number {low}-{high} nor a name ({examples}, ...)")
        raise fail(f"{token!r} is not a number {low}-{high}")

    result: set[int] = set()
    for item in text.split(","):
        if item == "":
            raise fail("empty item in list")
        base, slash, step_text = item.partition("/")
        step = _step(item, step_text, fail) if slash else 1
        if base == "*":
            start, end = low, star_high
        elif "-" in base:
            first, _, last = base.partition("-")
            start, end = value(first), value(last)
            if start > end:
                raise fail(f"range {base!r} is reversed ({start} comes after {end})")
        else:
            start = end = value(base)
            if slash:
                raise fail(
                    f"a step needs a range or '*', e.g. '*/{step}' or '{base}-{high}/{step}', not {item!r}"
                )
        result.update(range(start, end + 1, step))
    return frozenset(result)


# --------------------------------------------------------------------------------------------------
# Wall clock <-> UTC
# --------------------------------------------------------------------------------------------------


def _to_utc(local: datetime, zone: ZoneInfo, fixed_time: bool) -> list[datetime]:
    """UTC instants at which the naive wall-clock time ``local`` fires.

    fixed_time: gap -> [end of gap]; repeated -> [first occurrence].
    otherwise (Vixie wildcard jobs): gap -> []; repeated -> [both occurrences].
    """
    first = local.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = local.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == local:
        if first == second or fixed_time:
            return [first]
        return sorted({first, second})
    if not fixed_time:
        return []
    # `local` falls in a gap: find the transition instant (first instant whose wall time is past `local`).
    low, high = int(min(first, second).timestamp()), int(max(first, second).timestamp())
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).replace(tzinfo=None) > local:
            high = middle
        else:
            low = middle
    return [datetime.fromtimestamp(high, UTC)]


def _utc(value: datetime, what: str) -> datetime:
    _require_aware(value, what)
    return value.astimezone(UTC)


# --------------------------------------------------------------------------------------------------
# Fire times
# --------------------------------------------------------------------------------------------------


def _times_on(spec: _Calendar, day: date) -> tuple[time, ...]:
    if isinstance(spec, Daily):
        return (spec.at,)
    if isinstance(spec, Weekly):
        return (spec.at,) if day.weekday() in spec.days else ()
    if isinstance(spec, Monthly):
        last = calendar.monthrange(day.year, day.month)[1]
        target = last if spec.day == LAST else min(int(spec.day), last)
        return (spec.at,) if day.day == target else ()
    return spec.parsed.times if spec.parsed.matches_date(day) else ()


@functools.lru_cache(maxsize=8192)
def _fires_on(spec: _Calendar, zone: ZoneInfo, day: date) -> tuple[datetime, ...]:
    """The UTC fire instants of wall-clock day ``day``, sorted. Cached: a plan asks the same few days
    of the same few schedules for every VM (100 hosts x 50 VMs), and the answer depends on nothing else
    (specs, zones and dates are immutable values)."""
    times = _times_on(spec, day)
    if not times:
        return ()
    offset = datetime.combine(day, time(0), tzinfo=zone).utcoffset()
    if (
        offset is not None
        and offset == datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone).utcoffset()
    ):
        # No offset change during this day (the common case): plain arithmetic.
        return tuple(datetime.combine(day, at, tzinfo=UTC) - offset for at in times)
    fixed = spec.parsed.fixed_time if isinstance(spec, Cron) else True
    out: set[datetime] = set()
    for at in times:
        out.update(_to_utc(datetime.combine(day, at), zone, fixed))
    return tuple(sorted(out))


def _days(start: date, step: int) -> Iterator[date]:
    day = start
    for _ in range(_SEARCH_DAYS):
        yield day
        try:
            day += timedelta(days=step)
        except OverflowError:
            return


@functools.lru_cache(maxsize=4096)
def _next_calendar(spec: _Calendar, zone: ZoneInfo, after: datetime) -> datetime | None:
    best: datetime | None = None
    lookahead = 0
    for day in _days(after.astimezone(zone).date() - timedelta(days=1), +1):
        for instant in _fires_on(spec, zone, day):
            if instant > after:
                best = instant if best is None else min(best, instant)
                break
        if best is not None:
            lookahead += 1
            if lookahead > 1:  # one more day, in case a DST shift reordered instants around midnight
                break
    return best


@functools.lru_cache(maxsize=4096)
def _previous_calendar(spec: _Calendar, zone: ZoneInfo, now: datetime) -> datetime | None:
    best: datetime | None = None
    lookbehind = 0
    for day in _days(now.astimezone(zone).date() + timedelta(days=1), -1):
        for instant in reversed(_fires_on(spec, zone, day)):
            if instant <= now:
                best = instant if best is None else max(best, instant)
                break
        if best is not None:
            lookbehind += 1
            if lookbehind > 1:
                break
    return best


def next_fire(
    schedule: Schedule, after: datetime, *, last_started: datetime | None = None
) -> datetime | None:
    """The first nominal fire time strictly after ``after`` (UTC), ignoring window, jitter and history.

    ``None`` when the schedule has no such time: a past one-time run, ``After``, ``Manual``, and ``Every``
    without ``last_started`` (a periodic schedule's fire times are counted from its last start).
    """
    after = _utc(after, "after")
    spec = schedule.spec
    if isinstance(spec, Once):
        at = spec.at.astimezone(UTC)
        return at if at > after else None
    if isinstance(spec, Every):
        if last_started is None:
            return None
        start = _utc(last_started, "last_started")
        if start + spec.interval > after:
            return start + spec.interval
        return start + ((after - start) // spec.interval + 1) * spec.interval
    if isinstance(spec, After | Manual):
        return None
    return _next_calendar(spec, schedule.zone, after)


def previous_fire(
    schedule: Schedule, now: datetime, *, last_started: datetime | None = None
) -> datetime | None:
    """The latest nominal fire time at or before ``now`` (UTC), ignoring window, jitter and history.

    ``None`` when there is none (a one-time run still in the future, ``After``, ``Manual``, ``Every`` without
    ``last_started`` or whose first interval has not elapsed).
    """
    now = _utc(now, "now")
    spec = schedule.spec
    if isinstance(spec, Once):
        at = spec.at.astimezone(UTC)
        return at if at <= now else None
    if isinstance(spec, Every):
        if last_started is None:
            return None
        start = _utc(last_started, "last_started")
        if start + spec.interval > now:
            return None
        return start + ((now - start) // spec.interval) * spec.interval
    if isinstance(spec, After | Manual):
        return None
    return _previous_calendar(spec, schedule.zone, now)


def _count_fires(schedule: Schedule, low: datetime, high: datetime, cap: int) -> int:
    """Number of nominal fire times in (low, high], counting at most ``cap`` (calendar forms and Once)."""
    spec = schedule.spec
    if not isinstance(spec, Daily | Weekly | Monthly | Cron):
        return 1
    zone = schedule.zone
    last_day = high.astimezone(zone).date() + timedelta(days=1)
    count = 0
    for day in _days(low.astimezone(zone).date() - timedelta(days=1), +1):
        if day > last_day or count >= cap:
            break
        count += sum(1 for instant in _fires_on(spec, zone, day) if low < instant <= high)
    return min(count, cap)


# --------------------------------------------------------------------------------------------------
# Windows and jitter
# --------------------------------------------------------------------------------------------------


def in_window(schedule: Schedule, instant: datetime) -> bool:
    """Whether a run may start at ``instant`` (always true without a window)."""
    window = schedule.window
    if window is None:
        return True
    local = _utc(instant, "instant").astimezone(schedule.zone)
    wall = local.time().replace(tzinfo=None)
    today = local.date()

    def opens_on(day: date) -> bool:
        return window.days is None or day.weekday() in window.days

    if not window.crosses_midnight:
        return window.start <= wall < window.end and opens_on(today)
    if wall >= window.start:
        return opens_on(today)
    return wall < window.end and opens_on(today - timedelta(days=1))


def next_window_open(schedule: Schedule, instant: datetime) -> datetime | None:
    """The first instant at or after ``instant`` at which a run may start (``instant`` itself if allowed)."""
    instant = _utc(instant, "instant")
    window = schedule.window
    if window is None or in_window(schedule, instant):
        return instant
    zone = schedule.zone
    start_day = instant.astimezone(zone).date() - timedelta(days=1)
    best: datetime | None = None
    for offset in range(10):
        day = start_day + timedelta(days=offset)
        # A window opens where the wall clock passes its start: at every real occurrence of the start time
        # (a fall-back overlap passes it twice) or where a DST jump carries the wall clock into the window
        # (a start inside a spring-forward gap; a fall-back jump back into it).
        candidates = _to_utc(datetime.combine(day, window.start), zone, False) + _transitions_on(day, zone)
        for candidate in candidates:
            if candidate > instant and in_window(schedule, candidate):
                best = candidate if best is None else min(best, candidate)
        if best is not None and offset >= 2:
            break
    return best


def _transitions_on(day: date, zone: ZoneInfo) -> list[datetime]:
    """The UTC instant at which ``zone``'s offset changes during wall-clock day ``day`` (at most one)."""
    low = datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)
    high = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone).astimezone(UTC)
    if low.astimezone(zone).utcoffset() == high.astimezone(zone).utcoffset():
        return []
    lo, hi = int(low.timestamp()), int(high.timestamp())
    while hi - lo > 1:
        middle = (lo + hi) // 2
        if datetime.fromtimestamp(middle, zone).utcoffset() == low.astimezone(zone).utcoffset():
            lo = middle
        else:
            hi = middle
    return [datetime.fromtimestamp(hi, UTC)]


def jitter_offset(schedule: Schedule, jitter_key: str) -> timedelta:
    """Deterministic start delay in ``[0, jitter)``, whole seconds, from a SHA-256 hash of ``jitter_key``.

    The same key (say ``"nightly/web01"``) always gets the same offset, so a VM keeps its place in the
    spread-out start order from one run to the next.
    """
    if schedule.jitter <= timedelta(0):
        return timedelta(0)
    digest = hashlib.sha256(jitter_key.encode("utf-8")).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return timedelta(seconds=int(fraction * schedule.jitter.total_seconds()))


# --------------------------------------------------------------------------------------------------
# Due?
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Due:
    """A run should start now. ``missed`` fire times (>= 1) collapse into this one run."""

    due_since: datetime
    """The earliest fire time not yet covered by a run: since when the policy has been due."""
    fire: datetime
    """The latest fire time at or before now: the one this run stands for."""
    missed: int
    reason: str


@dataclass(frozen=True, slots=True)
class NotDue:
    """No run now. ``next_due`` is when ``due`` will next say yes if nothing changes (``None``: never, or
    it depends on an event such as another policy succeeding)."""

    reason: str
    next_due: datetime | None


def due(
    schedule: Schedule,
    now: datetime,
    last_started: datetime | None = None,
    last_succeeded_upstream: Mapping[str, datetime] | None = None,
    *,
    jitter_key: str | None = None,
) -> Due | NotDue:
    """Whether a run of ``schedule`` should start at ``now``.

    ``last_started``: when the previous run (of this policy, for this VM) started, ``None`` if it never ran.
    ``last_succeeded_upstream``: policy name -> time of its last success, for ``After`` schedules.
    ``jitter_key``: a stable key such as ``"<policy>/<vm>"``; required when the schedule has jitter.

    Rules: a fire time counts as covered once a run started at or after it; all uncovered fire times up to
    now collapse into one run; with no history at all the latest fire time is due (the first backup does not
    wait a full period); a run never starts outside the window.
    """
    now = _utc(now, "now")
    last = _utc(last_started, "last_started") if last_started is not None else None
    spec = schedule.spec
    if schedule.jitter > timedelta(0) and jitter_key is None and not isinstance(spec, Every | Manual):
        raise ValueError(
            "schedule has jitter: pass jitter_key (e.g. '<policy>/<vm>') so the offset is stable"
        )
    offset = jitter_offset(schedule, jitter_key or "") if not isinstance(spec, Every) else timedelta(0)
    jitter_note = f", jitter +{format_duration(offset)}" if offset else ""
    what = _spec_text(spec, schedule.timezone)

    if isinstance(spec, Manual):
        return NotDue("manual schedule: runs only when started by hand", None)

    if isinstance(spec, After):
        upstream = (last_succeeded_upstream or {}).get(spec.policy)
        if upstream is None:
            return NotDue(f"waiting for policy {spec.policy!r} to succeed (no success recorded yet)", None)
        upstream = _utc(upstream, f"last success of {spec.policy!r}")
        if last is not None and upstream <= last:
            return NotDue(
                f"waiting for policy {spec.policy!r} to succeed again: its last success "
                f"({_fmt(upstream, schedule)}) is not newer than this policy's last start "
                f"({_fmt(last, schedule)})",
                None,
            )
        ready = upstream + offset
        if ready > now:
            return _not_yet(
                schedule,
                ready,
                f"policy {spec.policy!r} succeeded at {_fmt(upstream, schedule)}{jitter_note}",
            )
        head = f"due since {_fmt(upstream, schedule)} ({what}{jitter_note})"
        return _in_window_or_wait(schedule, now, Due(upstream, upstream, 1, head))

    if isinstance(spec, Every):
        if last is None:
            return _in_window_or_wait(schedule, now, Due(now, now, 1, f"first run ({what})"))
        first = last + spec.interval
        if first > now:
            return _not_yet(schedule, first, f"{what} from the last start at {_fmt(last, schedule)}")
        missed = (now - last) // spec.interval
        latest = last + missed * spec.interval
        return _in_window_or_wait(
            schedule, now, Due(first, latest, missed, _due_text(first, missed, what, "", schedule))
        )

    # Once and the calendar forms: a nominal fire F becomes effective at F + offset.
    latest_fire = previous_fire(schedule, now - offset)
    if latest_fire is None or (last is not None and latest_fire <= last):
        floor = now - offset if last is None else max(last, now - offset)
        upcoming = next_fire(schedule, floor)
        if upcoming is None:
            if isinstance(spec, Once) and last is not None:
                return NotDue(f"one-time run already started at {_fmt(last, schedule)}", None)
            return NotDue(f"no future run ({what})", None)
        return _not_yet(schedule, upcoming + offset, f"{what}{jitter_note}")
    if last is None:
        return _in_window_or_wait(
            schedule,
            now,
            Due(
                latest_fire,
                latest_fire,
                1,
                f"first run; due since {_fmt(latest_fire, schedule)} ({what}{jitter_note})",
            ),
        )
    earliest = next_fire(schedule, last) or latest_fire
    missed = max(1, _count_fires(schedule, last, latest_fire, _MISSED_CAP))
    return _in_window_or_wait(
        schedule,
        now,
        Due(earliest, latest_fire, missed, _due_text(earliest, missed, what, jitter_note, schedule)),
    )


def next_due(
    schedule: Schedule,
    now: datetime,
    last_started: datetime | None = None,
    last_succeeded_upstream: Mapping[str, datetime] | None = None,
    *,
    jitter_key: str | None = None,
) -> datetime | None:
    """When ``due`` will first say yes, at or after ``now`` (``now`` if due now); for the daemon's timer and
    for plans. ``None``: never by the clock alone (manual, waiting for an upstream policy, one-time done)."""
    result = due(schedule, now, last_started, last_succeeded_upstream, jitter_key=jitter_key)
    return now.astimezone(UTC) if isinstance(result, Due) else result.next_due


def _due_text(earliest: datetime, missed: int, what: str, jitter_note: str, schedule: Schedule) -> str:
    text = f"due since {_fmt(earliest, schedule)} ({what}{jitter_note})"
    if missed > 1:
        count = f"{missed}+" if missed >= _MISSED_CAP else str(missed)
        text += f"; {count} missed runs collapse into one"
    return text


def _not_yet(schedule: Schedule, effective: datetime, what: str) -> NotDue:
    opens = next_window_open(schedule, effective)
    if opens is None:
        return NotDue(f"next run at {_fmt(effective, schedule)} ({what}), but the window never opens", None)
    if opens != effective:
        return NotDue(
            f"next run at {_fmt(effective, schedule)} ({what}), outside the window "
            f"{_window_text(schedule.window)}; starts when it opens at {_fmt(opens, schedule)}",
            opens,
        )
    return NotDue(f"next run at {_fmt(effective, schedule)} ({what})", effective)


def _in_window_or_wait(schedule: Schedule, now: datetime, result: Due) -> Due | NotDue:
    if in_window(schedule, now):
        return result
    opens = next_window_open(schedule, now)
    where = f"outside the window {_window_text(schedule.window)}"
    if opens is None:
        return NotDue(f"{result.reason}, but {where}, which never opens", None)
    return NotDue(f"{result.reason}, but {where}; the window opens at {_fmt(opens, schedule)}", opens)


# --------------------------------------------------------------------------------------------------
# Human text
# --------------------------------------------------------------------------------------------------


def _fmt_time(value: time) -> str:
    return value.strftime("%H:%M:%S" if value.second else "%H:%M")


def _fmt(instant: datetime, schedule: Schedule) -> str:
    """'2026-11-26 02:00 Europe/Berlin' (with the zone abbreviation when the wall time is ambiguous)."""
    local = instant.astimezone(schedule.zone)
    text = local.strftime("%Y-%m-%d %H:%M:%S" if local.second else "%Y-%m-%d %H:%M")
    if local.replace(fold=1 - local.fold).utcoffset() != local.utcoffset():
        text += f" {local.tzname()}"
    return f"{text} {schedule.timezone}"


def _fmt_days(days: frozenset[int]) -> str:
    ordered = sorted(days)
    if len(ordered) >= 3 and ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"{DAY_NAMES[ordered[0]]}–{DAY_NAMES[ordered[-1]]}"
    return ", ".join(DAY_NAMES[d] for d in ordered)


def _window_text(window: Window | None) -> str:
    if window is None:
        return "(none)"
    text = f"{_fmt_time(window.start)}–{_fmt_time(window.end)}"
    if window.days is not None:
        text += f" opening {_fmt_days(window.days)}"
    return text


def _spec_text(spec: ScheduleSpec, tz: str) -> str:
    if isinstance(spec, Once):
        local = spec.at.astimezone(_load_zone(tz))
        return f"once at {local.strftime('%Y-%m-%d %H:%M')}"
    if isinstance(spec, Every):
        return f"every {format_duration(spec.interval)}"
    if isinstance(spec, Daily):
        return f"daily at {_fmt_time(spec.at)}"
    if isinstance(spec, Weekly):
        return f"weekly on {_fmt_days(spec.days)} at {_fmt_time(spec.at)}"
    if isinstance(spec, Monthly):
        if spec.day == LAST:
            return f"monthly on the last day at {_fmt_time(spec.at)}"
        note = " (the last day in shorter months)" if int(spec.day) >= 29 else ""
        return f"monthly on day {spec.day}{note} at {_fmt_time(spec.at)}"
    if isinstance(spec, Cron):
        return f"cron '{spec.expression.strip()}'"
    if isinstance(spec, After):
        return f"after policy {spec.policy!r} succeeds"
    return "manual"


def describe(schedule: Schedule) -> str:
    """One line for plans, e.g. ``daily at 02:00 Europe/Berlin, window 22:00–06:00, jitter up to 15m``."""
    spec = schedule.spec
    text = _spec_text(spec, schedule.timezone)
    if isinstance(spec, Once | Daily | Weekly | Monthly | Cron):
        text += f" {schedule.timezone}"
    elif isinstance(spec, Manual):
        text += " (runs only when started by hand)"
    if schedule.window is not None:
        text += f", window {_window_text(schedule.window)}"
        if not isinstance(spec, Once | Daily | Weekly | Monthly | Cron):
            text += f" {schedule.timezone}"
    if schedule.jitter > timedelta(0) and not isinstance(spec, Every | Manual):
        text += f", jitter up to {format_duration(schedule.jitter)}"
    return text


# --------------------------------------------------------------------------------------------------
# Recovery-point objective
# --------------------------------------------------------------------------------------------------

RPO_SAMPLE_FIRES: Final = 400
"""How many fire times :func:`default_rpo` looks at (a year of daily runs; every week of a cron)."""


def default_rpo(schedule: Schedule, now: datetime) -> timedelta | None:
    """The recovery-point objective a schedule implies: twice the longest interval between two of its
    consecutive nominal fire times over the coming year (so one missed run is tolerated, and a slow
    backup is not a breach), or None for forms without a period (once, after, manual).

    ``now`` only anchors the sample: a calendar form's gaps differ by month and across DST changes."""
    spec = schedule.spec
    if isinstance(spec, Every):
        return 2 * spec.interval
    if not isinstance(spec, Daily | Weekly | Monthly | Cron):
        return None
    now = _utc(now, "now")
    horizon = now + timedelta(days=400)
    previous = next_fire(schedule, now)
    longest: timedelta | None = None
    for _ in range(RPO_SAMPLE_FIRES):
        if previous is None or previous > horizon:
            break
        following = next_fire(schedule, previous)
        if following is None:
            break
        gap = following - previous
        longest = gap if longest is None else max(longest, gap)
        previous = following
    return 2 * longest if longest is not None else None
