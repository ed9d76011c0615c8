"""Property-based tests (hypothesis) for schedule evaluation.

Strategies generate schedules of every form (one-time, periodic, daily, weekly, monthly, cron, chained,
manual) in zones with DST (Berlin, New York, Santiago with midnight transitions, Lord Howe with a 30-minute
shift), without DST (Tokyo, Kathmandu at +05:45) and UTC, with and without windows and jitter, and instants
clustered around the zones' DST transitions, given in assorted zones (including the second pass through a
fall-back hour). Calendar fire times are checked against an independent model of the documented DST rules.
A failure prints the falsifying example and a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import calendar
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from functools import cache
from typing import Literal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.rules.schedule import (
    LAST,
    After,
    Cron,
    Daily,
    Due,
    Every,
    Manual,
    Monthly,
    NotDue,
    Once,
    Schedule,
    ScheduleError,
    ScheduleSpec,
    Weekly,
    Window,
    describe,
    due,
    in_window,
    jitter_offset,
    next_due,
    next_fire,
    next_window_open,
    parse_cron,
    previous_fire,
)

UTC = timezone.utc
MICRO = timedelta(microseconds=1)

# Hypothesis gives up shrinking after 5 minutes; let a failing property report rather than time out.
pytestmark = pytest.mark.timeout(900)

# PROPERTY_SCALE=10 multiplies the example counts for a soak run (the default keeps the suite fast).
SCALE = float(os.environ.get("PROPERTY_SCALE", "1"))
PROPERTIES = settings(max_examples=round(150 * SCALE), deadline=None, print_blob=True)
EXPENSIVE = settings(max_examples=round(150 * SCALE), deadline=None, print_blob=True)
CHEAP = settings(max_examples=round(500 * SCALE), deadline=None, print_blob=True)

ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/Santiago",
    "Australia/Lord_Howe",
    "Asia/Tokyo",
    "Asia/Kathmandu",
)
DST_ZONES = ("Europe/Berlin", "America/New_York", "America/Santiago", "Australia/Lord_Howe")
INPUT_ZONES: tuple[tzinfo, ...] = (UTC, *(ZoneInfo(z) for z in ZONES[1:]), timezone(timedelta(hours=-9)))


def u(instant: datetime) -> datetime:
    """In UTC. The tests compare and shift instants only in UTC: arithmetic on a ZoneInfo datetime is
    wall-clock arithmetic (and drops ``fold``), two datetimes of one zone compare by wall clock, and ``==``
    across zones is False for a time in a fall-back overlap."""
    return instant.astimezone(UTC)


def wall(instant: datetime, zone: ZoneInfo) -> datetime:
    """The naive wall-clock reading of ``instant`` in ``zone``."""
    return instant.astimezone(zone).replace(tzinfo=None)


def transitions_between(zone: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """UTC instants in [start, end] at which ``zone``'s UTC offset changes (found by scanning, then bisecting
    on whole seconds; independent of the module)."""
    out: list[datetime] = []
    step = 3600
    low = int(start.timestamp())
    high_end = int(end.timestamp())
    while low < high_end:
        high = min(low + step, high_end)
        if datetime.fromtimestamp(low, zone).utcoffset() != datetime.fromtimestamp(high, zone).utcoffset():
            a, b = low, high
            while b - a > 1:
                middle = (a + b) // 2
                if (
                    datetime.fromtimestamp(middle, zone).utcoffset()
                    == datetime.fromtimestamp(a, zone).utcoffset()
                ):
                    a = middle
                else:
                    b = middle
            out.append(datetime.fromtimestamp(b, UTC))
        low = high
    return out


@cache
def known_transitions(zone_name: str) -> tuple[datetime, ...]:
    zone = ZoneInfo(zone_name)
    return tuple(
        transitions_between(zone, datetime(2024, 1, 1, tzinfo=UTC), datetime(2029, 1, 1, tzinfo=UTC))
    )


# --------------------------------------------------------------------------------------------------
# Strategies: instants
# --------------------------------------------------------------------------------------------------


@st.composite
def instants_near(draw: st.DrawFn) -> tuple[datetime, str]:
    """An aware instant, usually within two days of a DST transition, given in an arbitrary zone; and the
    zone whose transition it is near (some zone otherwise)."""
    kind = draw(st.integers(0, 3))
    zone = draw(st.sampled_from(DST_ZONES))
    if kind == 3:
        base = draw(st.datetimes(datetime(2001, 1, 1), datetime(2090, 1, 1))).replace(tzinfo=UTC)
    else:
        base = draw(st.sampled_from(known_transitions(zone)))
        if kind == 2:  # near the transition, on whole minutes (where fire times are)
            base += timedelta(minutes=draw(st.integers(-180, 180)))
        else:
            base += timedelta(seconds=draw(st.integers(-2 * 86400, 2 * 86400)))
        base += draw(st.sampled_from((timedelta(0), timedelta(0), MICRO, -MICRO, timedelta(seconds=1))))
    return base.astimezone(draw(st.sampled_from(INPUT_ZONES))), zone


def instants() -> st.SearchStrategy[datetime]:
    return instants_near().map(lambda pair: pair[0])


# Wall-clock times: often the hours that DST shifts (00:xx for Santiago, 01:30-02:00 for Lord Howe).
wall_times = st.builds(
    time,
    st.one_of(st.sampled_from((0, 1, 2, 3, 23)), st.integers(0, 23)),
    st.one_of(st.sampled_from((0, 30, 59)), st.integers(0, 59)),
    st.sampled_from((0, 0, 0, 0, 30)),
)
minute_times = st.builds(
    time,
    st.one_of(st.sampled_from((0, 1, 2, 3, 23)), st.integers(0, 23)),
    st.sampled_from((0, 15, 30, 45, 59)),
)
weekday_sets = st.frozensets(st.integers(0, 6), min_size=1)


# --------------------------------------------------------------------------------------------------
# Strategies: cron expressions with a model of what they mean
# --------------------------------------------------------------------------------------------------

_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DOWS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_MAX_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclass(frozen=True)
class CronModel:
    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    doms: frozenset[int]
    months: frozenset[int]
    dows: frozenset[int]  # Sunday = 0
    dom_star: bool
    dow_star: bool
    wildcard: bool  # minute or hour field starts with '*'

    @property
    def never(self) -> bool:
        """Day-of-month restricted (and day-of-week not) to days that none of the months has."""
        return (
            not self.dom_star
            and self.dow_star
            and not any(d <= _MAX_DAYS[m - 1] for d in self.doms for m in self.months)
        )

    def matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom_ok = day.day in self.doms
        dow_ok = (day.weekday() + 1) % 7 in self.dows
        return (dom_ok and dow_ok) if (self.dom_star or self.dow_star) else (dom_ok or dow_ok)

    def times(self) -> list[time]:
        return [time(h, m) for h in sorted(self.hours) for m in sorted(self.minutes)]


def _token(draw: st.DrawFn, value: int, names: Sequence[str] | None, offset: int) -> str:
    if names is not None and 0 <= value - offset < len(names) and draw(st.booleans()):  # 7 has no name
        name = names[value - offset]
        return draw(st.sampled_from((name, name.upper(), name.capitalize())))
    return str(value)


@st.composite
def cron_field(
    draw: st.DrawFn, low: int, high: int, star_high: int, names: Sequence[str] | None = None, offset: int = 0
) -> tuple[str, frozenset[int]]:
    """One field: a list of '*', '*/s', 'a', 'a-b', 'a-b/s' items, and the values it denotes."""
    items: list[str] = []
    values: set[int] = set()
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("*", "*/", "a", "a", "a-b", "a-b/")))
        if kind in ("*", "*/"):
            step = draw(st.integers(1, high + 2)) if kind == "*/" else 1
            items.append("*" if kind == "*" else f"*/{step}")
            values.update(range(low, star_high + 1, step))
            continue
        a = draw(st.integers(low, high))
        if kind == "a":
            items.append(_token(draw, a, names, offset))
            values.add(a)
            continue
        b = draw(st.integers(a, high))
        step = draw(st.integers(1, high + 2)) if kind == "a-b/" else 1
        text = f"{_token(draw, a, names, offset)}-{_token(draw, b, names, offset)}"
        items.append(f"{text}/{step}" if kind == "a-b/" else text)
        values.update(range(a, b + 1, step))
    return ",".join(items), frozenset(values)


SHORTCUTS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


@st.composite
def cron_models(draw: st.DrawFn, *, sparse: bool = True) -> CronModel:
    """A valid-syntax cron expression and its meaning (it may still be refused as never firing)."""
    if draw(st.integers(0, 9)) == 0:
        shortcut = draw(st.sampled_from(sorted(SHORTCUTS)))
        fields = SHORTCUTS[shortcut].split()
        expression = draw(st.sampled_from((shortcut, shortcut.upper(), f"  {shortcut} ")))
        texts = fields
        minutes, hours = frozenset({0}), frozenset(range(24)) if fields[1] == "*" else frozenset({0})
        doms = frozenset({1}) if fields[2] == "1" else frozenset(range(1, 32))
        months = frozenset({1}) if fields[3] == "1" else frozenset(range(1, 13))
        dows = frozenset({0}) if fields[4] == "0" else frozenset(range(7))
    else:
        if sparse:  # keep most expressions to a few fire times a day, so that walking them stays cheap
            minute = draw(
                st.one_of(st.integers(0, 59).map(lambda m: (str(m), frozenset({m}))), cron_field(0, 59, 59))
            )
        else:
            minute = draw(cron_field(0, 59, 59))
        hour = draw(cron_field(0, 23, 23))
        if draw(st.integers(0, 3)) == 0:  # rare dates: the end of February, on (a few) weekdays
            dom = draw(st.sampled_from((("29", frozenset({29})), ("30,31", frozenset({30, 31})))))
            month = draw(st.sampled_from((("2", frozenset({2})), ("feb", frozenset({2})))))
            step = draw(st.integers(3, 9))
            dow = (f"*/{step}", frozenset(range(0, 7, step)))
        else:
            dom = draw(cron_field(1, 31, 31))
            month = draw(cron_field(1, 12, 12, _MONTHS, 1))
            dow = draw(cron_field(0, 7, 6, _DOWS, 0))
        texts = [minute[0], hour[0], dom[0], month[0], dow[0]]
        minutes, hours, doms, months = minute[1], hour[1], dom[1], month[1]
        dows = frozenset(0 if d == 7 else d for d in dow[1])
        separators = [draw(st.sampled_from((" ", " ", "  ", "\t"))) for _ in range(4)]
        expression = texts[0] + "".join(sep + text for sep, text in zip(separators, texts[1:], strict=True))
        expression = draw(st.sampled_from(("", " "))) + expression + draw(st.sampled_from(("", " ", "\n")))
    return CronModel(
        expression=expression,
        minutes=minutes,
        hours=hours,
        doms=doms,
        months=months,
        dows=dows,
        dom_star=texts[2].startswith("*"),
        dow_star=texts[4].startswith("*"),
        wildcard=texts[0].startswith("*") or texts[1].startswith("*"),
    )


valid_cron_models = cron_models().filter(lambda model: not model.never)


# --------------------------------------------------------------------------------------------------
# Strategies: schedules
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A schedule, plus what the tests need to know about it."""

    schedule: Schedule
    cron: CronModel | None = None  # the model of a Cron form
    last_started: datetime | None = None  # anchor for Every's fire times


@st.composite
def optional_windows(draw: st.DrawFn, reference: datetime, zone: ZoneInfo) -> Window | None:
    """No window, or one whose start or end is often the wall time shortly before or after ``reference``
    (which is often near a DST transition of ``zone``, so the window meets the gap or the overlap)."""
    if draw(st.booleans()):
        return None

    def near() -> time:
        moment = wall(reference + timedelta(minutes=draw(st.integers(-150, 150))), zone)
        return moment.time().replace(second=0, microsecond=0)

    start = near() if draw(st.booleans()) else draw(minute_times)
    end = near() if draw(st.integers(0, 3)) == 0 else draw(minute_times)
    if end == start:
        end = (datetime.combine(date(2000, 1, 1), start) + timedelta(hours=1)).time()
    return Window(start, end, draw(st.one_of(st.none(), weekday_sets)))


@st.composite
def calendar_specs(draw: st.DrawFn) -> tuple[Daily | Weekly | Monthly | Cron, CronModel | None]:
    kind = draw(st.sampled_from(("daily", "weekly", "monthly", "cron", "cron")))
    if kind == "daily":
        return Daily(draw(wall_times)), None
    if kind == "weekly":
        return Weekly(draw(weekday_sets), draw(wall_times)), None
    if kind == "monthly":
        days: st.SearchStrategy[int | Literal["last"]] = st.one_of(
            st.sampled_from((1, 28, 29, 30, 31, LAST)), st.integers(1, 31)
        )
        return Monthly(draw(days), draw(wall_times)), None
    model = draw(valid_cron_models)
    return Cron(model.expression), model


FORMS = ("once", "every", "calendar", "calendar", "calendar", "after", "manual")


@st.composite
def cases(
    draw: st.DrawFn,
    *,
    reference: datetime | None = None,
    zone_hint: str | None = None,
    forms: Sequence[str] = FORMS,
    window: bool = True,
) -> Case:
    """A schedule of any form. ``reference`` (an instant the test uses) places one-time runs, periodic
    anchors and window edges near it; the schedule is often in ``zone_hint`` (the zone of the DST
    transition the reference is near)."""
    ref = u(reference if reference is not None else draw(instants()))
    zone_name = draw(st.sampled_from(ZONES))
    if zone_hint is not None and draw(st.booleans()):
        zone_name = zone_hint
    shown_in = st.sampled_from(INPUT_ZONES)
    kind = draw(st.sampled_from(forms))
    model: CronModel | None = None
    last: datetime | None = None
    spec: ScheduleSpec
    if kind == "once":
        spec = Once(
            (ref + timedelta(seconds=draw(st.integers(-3 * 86400, 3 * 86400)))).astimezone(draw(shown_in))
        )
    elif kind == "every":
        spec = Every(
            timedelta(seconds=draw(st.sampled_from((60, 3600, 4 * 3600, 86400)) | st.integers(60, 9 * 86400)))
        )
        last = (ref - timedelta(seconds=draw(st.integers(-86400, 30 * 86400)))).astimezone(draw(shown_in))
    elif kind == "calendar":
        spec, model = draw(calendar_specs())
    elif kind == "after":
        spec = After(draw(st.sampled_from(("nightly", "db"))))
    else:
        spec = Manual()
    jitter = timedelta(seconds=draw(st.sampled_from((0, 0, 59, 900, 3 * 3600)) | st.integers(0, 7200)))
    return Case(
        Schedule(
            spec,
            zone_name,
            draw(optional_windows(ref, ZoneInfo(zone_name))) if window else None,
            jitter,
        ),
        model,
        last,
    )


@st.composite
def instant_and_case(
    draw: st.DrawFn, *, forms: Sequence[str] = FORMS, window: bool = True
) -> tuple[datetime, Case]:
    now, zone = draw(instants_near())
    return now, draw(cases(reference=now, zone_hint=zone, forms=forms, window=window))


CALENDAR = ("calendar",)
FIRING = ("once", "every", "calendar", "calendar", "calendar")


# --------------------------------------------------------------------------------------------------
# Fire times
# --------------------------------------------------------------------------------------------------


@PROPERTIES
@given(instant_and_case(forms=FIRING, window=False))
def test_next_fire_is_strictly_after_and_is_a_fire_time(arg: tuple[datetime, Case]) -> None:
    after, case = arg
    s, anchor = case.schedule, case.last_started
    nxt = next_fire(s, after, last_started=anchor)
    if nxt is None:
        assert isinstance(s.spec, Once) and u(s.spec.at) <= u(after)
        return
    assert nxt.tzinfo is UTC
    assert nxt > after  # never in the past
    # a fire time: the latest fire at or before it is itself ...
    assert previous_fire(s, nxt, last_started=anchor) == nxt
    assert previous_fire(s, nxt + MICRO, last_started=anchor) == nxt
    # ... and nothing fires in (after, next)
    before = previous_fire(s, nxt - MICRO, last_started=anchor)
    assert before is None or before <= u(after)


@PROPERTIES
@given(instant_and_case(forms=FIRING, window=False))
def test_previous_fire_is_at_or_before_and_next_fire_follows_it(arg: tuple[datetime, Case]) -> None:
    now, case = arg
    s, anchor = case.schedule, case.last_started
    prev = previous_fire(s, now, last_started=anchor)
    if prev is None:
        assert not isinstance(s.spec, Daily | Weekly | Monthly | Cron)  # a calendar always has fired before
        return
    assert prev.tzinfo is UTC
    assert prev <= u(now)
    assert next_fire(s, prev, last_started=anchor) == next_fire(s, now, last_started=anchor)


@PROPERTIES
@given(calendar_specs(), st.sampled_from(ZONES), st.datetimes(datetime(2001, 1, 1), datetime(2090, 1, 1)))
def test_a_calendar_schedule_always_fires_again(
    spec_model: tuple[Daily | Weekly | Monthly | Cron, CronModel | None], zone: str, naive: datetime
) -> None:
    """Every accepted expression fires eventually (refused ones never do), however rare its dates are."""
    s = Schedule(spec_model[0], zone)
    now = naive.replace(tzinfo=UTC)
    assert next_fire(s, now) is not None
    assert previous_fire(s, now) is not None


def _fixed_fire(moment: datetime, zone: ZoneInfo, transitions: Sequence[datetime]) -> datetime:
    """Documented rule for a fixed wall-clock time: the first instant at which the wall clock reads
    ``moment`` or later. That is the time itself; in a fall-back overlap its first occurrence; in a
    spring-forward gap the end of the gap."""
    candidates = [
        instant
        for instant in (moment.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1))
        if wall(instant, zone) == moment
    ]
    candidates += [
        t
        for t in transitions
        if wall(t, zone) >= moment and abs(t.replace(tzinfo=None) - moment) < timedelta(days=2)
    ]
    return min(candidates)


def _real_occurrences(moment: datetime, zone: ZoneInfo) -> set[datetime]:
    """Vixie rule for wildcard cron jobs: every real occurrence of ``moment``; none inside a gap."""
    out = set()
    for fold in (0, 1):
        instant = moment.replace(tzinfo=zone, fold=fold).astimezone(UTC)
        if wall(instant, zone) == moment:
            out.add(instant)
    return out


def model_fires(case: Case, first: date, last: date) -> list[datetime]:
    """The fire times of the local days first..last by the documented rules, computed independently."""
    s = case.schedule
    zone = s.zone
    spec = s.spec
    transitions = transitions_between(
        zone,
        datetime.combine(first, time(0), UTC) - timedelta(days=2),
        datetime.combine(last, time(0), UTC) + timedelta(days=3),
    )
    times_on: Callable[[date], list[time]]
    wildcard = False
    if isinstance(spec, Daily):
        times_on = lambda day: [spec.at]  # noqa: E731
    elif isinstance(spec, Weekly):
        times_on = lambda day: [spec.at] if day.weekday() in spec.days else []  # noqa: E731
    elif isinstance(spec, Monthly):

        def times_on(day: date) -> list[time]:
            last_day = calendar.monthrange(day.year, day.month)[1]
            target = last_day if spec.day == LAST else min(int(spec.day), last_day)
            return [spec.at] if day.day == target else []

    else:
        model = case.cron
        assert model is not None
        wildcard = model.wildcard
        all_times = model.times()
        times_on = lambda day: all_times if model.matches(day) else []  # noqa: E731
    out: set[datetime] = set()
    day = first
    while day <= last:
        for at in times_on(day):
            moment = datetime.combine(day, at)
            if wildcard:
                out |= _real_occurrences(moment, zone)
            else:
                out.add(_fixed_fire(moment, zone, transitions))
        day += timedelta(days=1)
    return sorted(out)


@EXPENSIVE
@given(instant_and_case(forms=CALENDAR, window=False))
def test_calendar_fire_times_follow_the_documented_dst_rules(arg: tuple[datetime, Case]) -> None:
    """Walk next_fire forward and previous_fire backward from an instant near a DST transition and compare
    with the model: fixed times fire once a day (gap -> end of gap, overlap -> first occurrence), wildcard
    cron jobs at every real occurrence."""
    now, case = arg
    s = case.schedule
    horizon = timedelta(hours=36)
    now = u(now)
    expected = model_fires(
        case,
        wall(now - horizon, s.zone).date() - timedelta(days=2),
        wall(now + horizon, s.zone).date() + timedelta(days=2),
    )

    forward: list[datetime] = []
    cursor = now
    while len(forward) < 12:
        fire = next_fire(s, cursor)
        assert fire is not None
        if fire > now + horizon:
            break
        forward.append(fire)
        cursor = fire
    assert forward == [f for f in expected if now < f <= now + horizon][:12]

    backward: list[datetime] = []
    cursor = now
    while len(backward) < 12:
        fire = previous_fire(s, cursor)
        assert fire is not None
        if fire <= now - horizon:
            break
        backward.append(fire)
        cursor = fire - MICRO
    assert backward == [f for f in reversed(expected) if now - horizon < f <= now][:12]


# --------------------------------------------------------------------------------------------------
# Due
# --------------------------------------------------------------------------------------------------

KEY = "nightly/web01"


@st.composite
def due_inputs(draw: st.DrawFn) -> tuple[datetime, Case, datetime | None, dict[str, datetime]]:
    """now, a schedule, the last start (<= now) and upstream successes, each given in some zone."""
    now, case = draw(instant_and_case())
    shown_in = st.sampled_from(INPUT_ZONES)
    last = case.last_started
    if last is None or draw(st.integers(0, 3)) == 0:
        last = draw(
            st.one_of(
                st.none(),
                st.integers(0, 40 * 86400).map(lambda s: u(now) - timedelta(seconds=s)),
                st.sampled_from((u(now), u(now) - MICRO)),
            )
        )
    if last is not None:
        last = min(u(last), u(now)).astimezone(draw(shown_in))
    upstream = draw(
        st.dictionaries(
            st.sampled_from(("nightly", "db", "other")),
            st.integers(0, 5 * 86400).map(lambda s: u(now) - timedelta(seconds=s)),
        )
    )
    return now, case, last, {name: t.astimezone(draw(shown_in)) for name, t in upstream.items()}


def offset_of(s: Schedule) -> timedelta:
    return timedelta(0) if isinstance(s.spec, Every) else jitter_offset(s, KEY)


@PROPERTIES
@given(due_inputs())
def test_due_invariants(arg: tuple[datetime, Case, datetime | None, dict[str, datetime]]) -> None:
    now, case, last, upstream = arg
    s = case.schedule
    result = due(s, now, last, upstream, jitter_key=KEY)
    assert result.reason.strip()
    if isinstance(s.spec, Manual):
        assert result == NotDue(result.reason, None)
        return
    if isinstance(result, Due):
        assert result.due_since <= result.fire <= u(now)
        assert result.missed >= 1
        assert in_window(s, now)  # a run never starts outside its window
        assert last is None or result.fire > u(last)  # the fire it stands for is not covered yet
        if not isinstance(s.spec, Every):
            assert result.fire + offset_of(s) <= u(now)  # jitter delays, never advances
        if isinstance(s.spec, After):
            assert u(upstream[s.spec.policy]) == result.fire
    else:
        assert result.next_due is None or result.next_due > u(now)
        if result.next_due is not None:
            assert in_window(s, result.next_due)
    if isinstance(s.spec, After) and (
        s.spec.policy not in upstream or (last is not None and u(upstream[s.spec.policy]) <= u(last))
    ):
        assert isinstance(result, NotDue) and result.next_due is None


@PROPERTIES
@given(due_inputs())
def test_due_agrees_with_the_fire_times(
    arg: tuple[datetime, Case, datetime | None, dict[str, datetime]],
) -> None:
    """For the clock-driven forms without a window: due exactly when an uncovered fire time has taken
    effect (fire + jitter <= now); due_since is the first uncovered fire, fire the latest."""
    now, case, last, upstream = arg
    s = case.schedule
    if s.window is not None or isinstance(s.spec, After | Manual):
        return
    result = due(s, now, last, upstream, jitter_key=KEY)
    if isinstance(s.spec, Every):
        if last is None:
            assert isinstance(result, Due) and result.fire == u(now)
        else:
            assert isinstance(result, Due) == (u(last) + s.spec.interval <= u(now))
        return
    offset = offset_of(s)
    latest = previous_fire(s, u(now) - offset)
    uncovered = latest is not None and (last is None or latest > u(last))
    assert isinstance(result, Due) == uncovered
    if isinstance(result, Due):
        assert result.fire == latest
        first = latest if last is None else next_fire(s, last)
        assert result.due_since == first


@PROPERTIES
@given(due_inputs())
def test_missed_runs_collapse_into_one(
    arg: tuple[datetime, Case, datetime | None, dict[str, datetime]],
) -> None:
    """Once a run starts at ``now``, nothing is due at ``now`` any more, and the next run waits for a new
    fire time (plus jitter)."""
    now, case, last, upstream = arg
    s = case.schedule
    if not isinstance(due(s, now, last, upstream, jitter_key=KEY), Due):
        return
    again = due(s, now, now, upstream, jitter_key=KEY)
    assert isinstance(again, NotDue), again
    if again.next_due is None:
        return
    assert again.next_due > u(now)
    if isinstance(s.spec, Every):
        assert again.next_due >= u(now) + s.spec.interval
    elif not isinstance(s.spec, After):
        upcoming = next_fire(s, now)
        assert upcoming is not None and again.next_due >= upcoming + offset_of(s)


@PROPERTIES
@given(due_inputs(), st.integers(1, 10 * 86400))
def test_without_a_window_a_due_run_stays_due_until_it_starts(
    arg: tuple[datetime, Case, datetime | None, dict[str, datetime]], seconds: int
) -> None:
    now, case, last, upstream = arg
    s = case.schedule
    if s.window is not None or not isinstance(due(s, now, last, upstream, jitter_key=KEY), Due):
        return
    later = u(now) + timedelta(seconds=seconds)
    assert isinstance(due(s, later, last, upstream, jitter_key=KEY), Due)


def window_candidates(s: Schedule, start: datetime, end: datetime) -> list[datetime]:
    """Instants in [start, end] at which a window can open: the window's start (both occurrences in a
    fall-back overlap) on every day, and the zone's transitions (the wall clock may jump into the window)."""
    window = s.window
    assert window is not None
    zone = s.zone
    out = [start]
    day = wall(start, zone).date() - timedelta(days=1)
    while day <= wall(end, zone).date() + timedelta(days=1):
        moment = datetime.combine(day, window.start)
        for fold in (0, 1):
            instant = moment.replace(tzinfo=zone, fold=fold).astimezone(UTC)
            if wall(instant, zone) == moment:
                out.append(instant)
        day += timedelta(days=1)
    out += transitions_between(zone, start - timedelta(hours=1), end + timedelta(hours=1))
    return sorted(t for t in out if start <= t <= end)


@CHEAP
@given(instant_and_case(forms=("manual",)))
def test_next_window_open_is_the_first_allowed_instant(arg: tuple[datetime, Case]) -> None:
    instant, case = arg
    s = case.schedule
    instant = u(instant)
    opens = next_window_open(s, instant)
    if s.window is None:
        assert opens == instant
        return
    assert opens is not None  # every window opens at least weekly
    assert opens >= instant
    assert in_window(s, opens)
    if opens > instant:
        assert not in_window(s, opens - MICRO)
        for candidate in window_candidates(s, instant, opens):
            if candidate < opens:
                assert not in_window(s, candidate), candidate


@PROPERTIES
@given(due_inputs(), st.data())
def test_next_due_is_exact(
    arg: tuple[datetime, Case, datetime | None, dict[str, datetime]], data: st.DataObject
) -> None:
    """NotDue.next_due is when due() first says yes if nothing changes: due then, not due before."""
    now, case, last, upstream = arg
    s = case.schedule
    result = due(s, now, last, upstream, jitter_key=KEY)
    when = next_due(s, now, last, upstream, jitter_key=KEY)
    if isinstance(result, Due):
        assert when == u(now)
        return
    assert when == result.next_due
    if when is None:
        return
    assert isinstance(due(s, when, last, upstream, jitter_key=KEY), Due)
    probes = [when - MICRO, u(now) + (when - u(now)) * data.draw(st.floats(0, 1))]
    if s.window is not None:  # where the window opens: shortly after now, and shortly before next_due
        probes += window_candidates(s, u(now), min(when, u(now) + timedelta(days=10)))
        probes += window_candidates(s, max(u(now), when - timedelta(days=2)), when)
    for probe in probes:
        if u(now) <= probe < when:
            assert isinstance(due(s, probe, last, upstream, jitter_key=KEY), NotDue), probe


# --------------------------------------------------------------------------------------------------
# Jitter, parsing, descriptions
# --------------------------------------------------------------------------------------------------


@PROPERTIES
@given(
    st.builds(timedelta, seconds=st.integers(0, 86400), microseconds=st.integers(0, 999999)),
    st.text(max_size=30),
)
def test_jitter_is_deterministic_per_key_and_within_bounds(jitter: timedelta, key: str) -> None:
    first = Schedule(Daily(time(2)), "Europe/Berlin", jitter=jitter)
    other = Schedule(Cron("*/5 * * * *"), "Asia/Tokyo", jitter=jitter)
    offset = jitter_offset(first, key)
    assert offset == jitter_offset(first, key) == jitter_offset(other, key)  # depends on key and jitter only
    assert offset.microseconds == 0  # whole seconds
    if jitter == timedelta(0):
        assert offset == timedelta(0)
    else:
        assert timedelta(0) <= offset < jitter


@PROPERTIES
@given(cron_models(sparse=False))
def test_cron_parsing_matches_the_model_and_describe_never_raises(model: CronModel) -> None:
    if model.never:
        with pytest.raises(ScheduleError, match="never occurs"):
            parse_cron(model.expression)
        return
    spec = parse_cron(model.expression)
    assert (spec.minutes, spec.hours, spec.days_of_month, spec.months, spec.days_of_week) == (
        model.minutes,
        model.hours,
        model.doms,
        model.months,
        model.dows,
    )
    assert (spec.dom_restricted, spec.dow_restricted, spec.fixed_time) == (
        not model.dom_star,
        not model.dow_star,
        not model.wildcard,
    )
    text = describe(Schedule(Cron(model.expression), "Australia/Lord_Howe"))
    assert text.startswith("cron '") and text.endswith(" Australia/Lord_Howe")


@PROPERTIES
@given(instant_and_case())
def test_describe_never_raises(arg: tuple[datetime, Case]) -> None:
    _, case = arg
    text = describe(case.schedule)
    assert text and "\n" not in text


# --------------------------------------------------------------------------------------------------
# Regressions: the cases the properties found, pinned
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "window", "closed", "reopens"),
    [
        # New York, 2024-11-03: 02:00 EDT -> 01:00 EST at 06:00Z. A 01:15-00:00 window closes with the jump
        # back to 01:00 and reopens when the wall clock passes 01:15 a second time.
        ("America/New_York", Window(time(1, 15), time(0, 0)), "2024-11-03T06:00", "2024-11-03T06:15"),
        # Lord Howe, 2024-04-07: 02:00 +11 -> 01:30 +10:30 at 15:00Z; a window starting 01:45.
        ("Australia/Lord_Howe", Window(time(1, 45), time(0, 0)), "2024-04-06T15:00", "2024-04-06T15:15"),
        # Berlin, 2026-10-25: 03:00 CEST -> 02:00 CET at 01:00Z. A 01:00-02:30 window, closed at 02:40 CEST,
        # is open again right after the jump, without the wall clock passing its start.
        ("Europe/Berlin", Window(time(1, 0), time(2, 30)), "2026-10-25T00:40", "2026-10-25T01:00"),
    ],
)
def test_a_window_reopens_in_the_repeated_hour(zone: str, window: Window, closed: str, reopens: str) -> None:
    at_closed = datetime.fromisoformat(closed).replace(tzinfo=UTC)
    at_reopens = datetime.fromisoformat(reopens).replace(tzinfo=UTC)
    s = Schedule(Manual(), zone, window)
    assert not in_window(s, at_closed)
    assert in_window(s, at_reopens)
    assert next_window_open(s, at_closed) == at_reopens
    once = Schedule(Once(at_closed - timedelta(minutes=1)), zone, window)
    result = due(once, at_closed)
    assert isinstance(result, NotDue) and result.next_due == at_reopens


def test_a_cron_day_that_recurs_only_every_28_to_40_years_still_fires() -> None:
    """29 February that is a Sunday (day-of-week starts with '*', so both fields must match): 2004, 2032,
    2060. The search must not give up after a few years and report 'never'."""
    s = Schedule(Cron("0 0 29 2 */7"), "Europe/Berlin")
    feb29 = [datetime(year, 2, 28, 23, 0, tzinfo=UTC) for year in (2004, 2032, 2060)]  # 00:00 CET
    assert next_fire(s, datetime(2033, 1, 1, tzinfo=UTC)) == feb29[2]
    assert previous_fire(s, datetime(2031, 1, 1, tzinfo=UTC)) == feb29[0]
    result = due(s, datetime(2033, 1, 1, tzinfo=UTC), feb29[1])
    assert isinstance(result, NotDue) and result.next_due == feb29[2]
