"""Schedule evaluation: what an administrator relies on when a backup is (or is not) started."""

from __future__ import annotations

import hashlib
import time as clock
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

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
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(text: str) -> datetime:
    """'2026-11-26 02:00' -> aware UTC datetime."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def local(text: str, zone: ZoneInfo = BERLIN, fold: int = 0) -> datetime:
    """Wall-clock time in `zone`, converted to UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=zone, fold=fold).astimezone(UTC)


def berlin(spec: ScheduleSpec, **kwargs: object) -> Schedule:
    return Schedule(spec, "Europe/Berlin", **kwargs)  # type: ignore[arg-type]


def fires(schedule: Schedule, after: datetime, count: int) -> list[datetime]:
    out: list[datetime] = []
    cursor = after
    for _ in range(count):
        nxt = next_fire(schedule, cursor)
        assert nxt is not None
        out.append(nxt)
        cursor = nxt
    return out


# ------------------------------------------------------------------------------------------------
# Cron parsing
# ------------------------------------------------------------------------------------------------


class TestParseCron:
    def test_simple_daily(self) -> None:
        spec = parse_cron("0 2 * * *")
        assert spec.minutes == {0}
        assert spec.hours == {2}
        assert spec.days_of_month == frozenset(range(1, 32))
        assert spec.months == frozenset(range(1, 13))
        assert spec.days_of_week == frozenset(range(7))
        assert not spec.dom_restricted and not spec.dow_restricted
        assert spec.fixed_time

    def test_lists_ranges_steps_and_names(self) -> None:
        spec = parse_cron("*/15 9-17 1,15 jan,JUL mon-fri")
        assert spec.minutes == {0, 15, 30, 45}
        assert spec.hours == set(range(9, 18))
        assert spec.days_of_month == {1, 15}
        assert spec.months == {1, 7}
        assert spec.days_of_week == {1, 2, 3, 4, 5}
        assert spec.dom_restricted and spec.dow_restricted
        assert not spec.fixed_time  # minute field starts with '*'

    def test_range_with_step(self) -> None:
        assert parse_cron("0-30/10 * * * *").minutes == {0, 10, 20, 30}
        assert parse_cron("0 1-23/6 * * *").hours == {1, 7, 13, 19}

    def test_seven_is_sunday(self) -> None:
        assert parse_cron("0 0 * * 7").days_of_week == {0}
        assert parse_cron("0 0 * * sun").days_of_week == {0}
        assert parse_cron("0 0 * * 5-7").days_of_week == {5, 6, 0}
        assert parse_cron("0 0 * * 0-7").days_of_week == frozenset(range(7))

    @pytest.mark.parametrize(
        ("shortcut", "equivalent"),
        [
            ("@hourly", "0 * * * *"),
            ("@daily", "0 0 * * *"),
            ("@midnight", "0 0 * * *"),
            ("@weekly", "0 0 * * 0"),
            ("@monthly", "0 0 1 * *"),
            ("@yearly", "0 0 1 1 *"),
            ("@ANNUALLY", "0 0 1 1 *"),
        ],
    )
    def test_shortcuts(self, shortcut: str, equivalent: str) -> None:
        a, b = parse_cron(shortcut), parse_cron(equivalent)
        assert (a.minutes, a.hours, a.days_of_month, a.months, a.days_of_week) == (
            b.minutes,
            b.hours,
            b.days_of_month,
            b.months,
            b.days_of_week,
        )

    def test_extra_whitespace_is_fine(self) -> None:
        assert parse_cron("  0\t2  *  * *  ").hours == {2}

    @pytest.mark.parametrize(
        ("expression", "message"),
        [
            ("", "cron expression is empty: expected 5 fields"),
            (
                "* * * *",
                "cron expression '* * * *': expected 5 fields (minute hour day-of-month month "
                "day-of-week), got 4",
            ),
            ("0 0 0 * * *", "got 6 (seconds and year fields are not supported)"),
            ("60 * * * *", "minute field '60': 60 is out of range 0-59"),
            ("0 24 * * *", "hour field '24': 24 is out of range 0-23"),
            ("0 0 0 * *", "day-of-month field '0': 0 is out of range 1-31"),
            ("0 0 32 * *", "day-of-month field '32': 32 is out of range 1-31"),
            ("0 0 * 13 *", "month field '13': 13 is out of range 1-12"),
            ("0 0 * * 8", "day-of-week field '8': 8 is out of range 0-7"),
            (
                "0 0 * foo *",
                "month field 'foo': 'foo' is neither a number 1-12 nor a name (jan, feb, mar, ...)",
            ),
            ("0 0 * mon *", "month field 'mon': 'mon' is neither a number 1-12 nor a name"),
            ("0 0 * * mon-fry", "day-of-week field 'mon-fry': 'fry' is neither a number 0-7 nor a name"),
            ("0 0 jan * *", "day-of-month field 'jan': 'jan' is not a number 1-31"),
            ("*/0 * * * *", "minute field '*/0': step in '*/0' must be at least 1"),
            ("*/x * * * *", "minute field '*/x': step 'x' in '*/x' is not a number"),
            ("5/10 * * * *", "minute field '5/10': a step needs a range or '*', e.g. '*/10' or '5-59/10'"),
            ("1,,2 * * * *", "minute field '1,,2': empty item in list"),
            ("1, * * * *", "minute field '1,': empty item in list"),
            ("0 -1 * * *", "hour field '-1': missing value"),
            ("0 0 * 12-1 *", "month field '12-1': range '12-1' is reversed (12 comes after 1)"),
            ("0 0 * * fri-mon", "day-of-week field 'fri-mon': range 'fri-mon' is reversed (5 comes after 1)"),
            ("0 0 31 2 *", "day-of-month 31 never occurs in month 2, so the schedule would never run"),
            ("0 0 30,31 feb *", "day-of-month 30,31 never occurs in month 2"),
            ("0 0 31 4,6,9,11 *", "never occurs in month 4,6,9,11"),
            ("@reboot", "unknown shortcut '@reboot'"),
            ("? * * * *", "minute field '?': '?' is not a number 0-59"),
        ],
    )
    def test_invalid_expressions_name_field_and_token(self, expression: str, message: str) -> None:
        with pytest.raises(ScheduleError) as error:
            parse_cron(expression)
        assert message in str(error.value)

    def test_error_quotes_the_whole_expression(self) -> None:
        with pytest.raises(ScheduleError, match=r"^cron expression '0 25 \* \* \*': hour field '25'"):
            parse_cron("0 25 * * *")

    def test_cron_schedule_form_validates_on_construction(self) -> None:
        with pytest.raises(ScheduleError, match="hour field"):
            Cron("0 99 * * *")
        assert Cron("0 2 * * *").parsed.hours == {2}

    def test_feb_29_is_possible_when_dow_is_restricted_too(self) -> None:
        # Both day fields restricted -> OR (Vixie): "29 February or any Monday in February". It is
        # accepted and fires on the Mondays every year, and on 29 February in leap years.
        s = Schedule(Cron("0 0 29 2 mon"))
        assert fires(s, utc("2027-01-01 00:00"), 5) == [
            utc("2027-02-01 00:00"),
            utc("2027-02-08 00:00"),
            utc("2027-02-15 00:00"),
            utc("2027-02-22 00:00"),
            utc("2028-02-07 00:00"),  # 2027 has no 29 February
        ]
        assert fires(s, utc("2028-02-27 00:00"), 3) == [
            utc("2028-02-28 00:00"),  # a Monday
            utc("2028-02-29 00:00"),  # a Tuesday: the day of month
            utc("2029-02-05 00:00"),
        ]
        # Even a day that never exists is accepted when the Mondays keep the expression alive.
        assert parse_cron("0 0 31 2 mon").days_of_month == {31}
        with pytest.raises(ScheduleError, match="never occurs"):
            parse_cron("0 0 31 2 *")


# ------------------------------------------------------------------------------------------------
# Cron firing
# ------------------------------------------------------------------------------------------------


class TestCronFiring:
    def test_dom_and_dow_both_restricted_means_or(self) -> None:
        # Every 13th AND every Friday (Vixie). 2026-11-13 is a Friday.
        s = Schedule(Cron("0 0 13 * fri"))
        got = [f.date() for f in fires(s, utc("2026-11-01 00:00"), 7)]
        assert got == [
            date(2026, 11, 6),
            date(2026, 11, 13),
            date(2026, 11, 20),
            date(2026, 11, 27),
            date(2026, 12, 4),
            date(2026, 12, 11),
            date(2026, 12, 13),  # a Sunday: matched by day-of-month
        ]

    def test_only_dom_restricted(self) -> None:
        s = Schedule(Cron("0 0 13 * *"))
        assert [f.date() for f in fires(s, utc("2026-11-01 00:00"), 2)] == [
            date(2026, 11, 13),
            date(2026, 12, 13),
        ]

    def test_only_dow_restricted(self) -> None:
        s = Schedule(Cron("0 0 * * fri"))
        assert [f.date() for f in fires(s, utc("2026-11-01 00:00"), 2)] == [
            date(2026, 11, 6),
            date(2026, 11, 13),
        ]

    def test_dom_starting_with_star_is_unrestricted_so_and_applies(self) -> None:
        # Vixie: "*/2" starts with '*', so day-of-month counts as unrestricted and both must match:
        # odd days that are Mondays.
        s = Schedule(Cron("0 0 */2 * mon"))
        got = [f.date() for f in fires(s, utc("2026-11-01 00:00"), 3)]
        assert all(d.weekday() == 0 and d.day % 2 == 1 for d in got)
        assert got[0] == date(2026, 11, 9)

    def test_steps(self) -> None:
        s = Schedule(Cron("*/20 * * * *"))
        assert fires(s, utc("2026-11-26 00:00"), 4) == [
            utc("2026-11-26 00:20"),
            utc("2026-11-26 00:40"),
            utc("2026-11-26 01:00"),
            utc("2026-11-26 01:20"),
        ]

    def test_month_and_weekday_names(self) -> None:
        s = Schedule(Cron("30 9 * jan,jul mon"))
        got = fires(s, utc("2026-06-01 00:00"), 6)
        assert all(f.month in (1, 7) and f.weekday() == 0 and f.time() == time(9, 30) for f in got)
        assert got[0] == utc("2026-07-06 09:30")
        assert got[-1].year == 2027 and got[-1].month == 1

    def test_seven_and_sun_fire_on_sundays(self) -> None:
        a, b = Schedule(Cron("0 3 * * 7")), Schedule(Cron("0 3 * * SUN"))
        assert fires(a, utc("2026-11-26 00:00"), 3) == fires(b, utc("2026-11-26 00:00"), 3)
        assert next_fire(a, utc("2026-11-26 00:00")) == utc("2026-11-29 03:00")

    def test_february_29_only_in_leap_years(self) -> None:
        s = Schedule(Cron("0 0 29 2 *"))
        assert next_fire(s, utc("2026-03-01 00:00")) == utc("2028-02-29 00:00")
        assert previous_fire(s, utc("2026-03-01 00:00")) == utc("2024-02-29 00:00")

    def test_evaluated_in_the_schedule_time_zone(self) -> None:
        s = Schedule(Cron("0 2 * * *"), "Asia/Tokyo")
        assert next_fire(s, utc("2026-11-26 00:00")) == utc("2026-11-26 17:00")  # 02:00 JST next day


# ------------------------------------------------------------------------------------------------
# next_fire / previous_fire, DST
# ------------------------------------------------------------------------------------------------


class TestDaylightSaving:
    # Europe/Berlin: 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET.
    # America/New_York: 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.

    def test_berlin_spring_forward_missing_time_runs_once_at_end_of_gap(self) -> None:
        s = berlin(Daily(time(2, 30)))
        first = next_fire(s, utc("2026-03-28 12:00"))
        assert first == utc("2026-03-29 01:00")  # 03:00 CEST, the first instant after the gap
        assert first.astimezone(BERLIN).strftime("%H:%M %Z") == "03:00 CEST"
        assert next_fire(s, first) == local("2026-03-30 02:30")

    def test_berlin_spring_forward_previous_fire(self) -> None:
        s = berlin(Daily(time(2, 30)))
        assert previous_fire(s, utc("2026-03-29 12:00")) == utc("2026-03-29 01:00")
        assert previous_fire(s, utc("2026-03-29 00:59")) == local("2026-03-28 02:30")

    def test_berlin_fall_back_repeated_time_runs_once_at_first_occurrence(self) -> None:
        s = berlin(Daily(time(2, 30)))
        first = next_fire(s, utc("2026-10-24 12:00"))
        assert first == utc("2026-10-25 00:30")  # 02:30 CEST, not 02:30 CET an hour later
        assert next_fire(s, first) == local("2026-10-26 02:30")
        # exactly three runs over the three days around the change
        assert fires(s, utc("2026-10-24 00:00"), 3) == [
            local("2026-10-24 02:30"),
            utc("2026-10-25 00:30"),
            local("2026-10-26 02:30"),
        ]

    def test_berlin_fall_back_previous_fire_does_not_return_the_second_occurrence(self) -> None:
        s = berlin(Daily(time(2, 30)))
        assert previous_fire(s, utc("2026-10-25 01:45")) == utc("2026-10-25 00:30")

    def test_new_york_spring_forward(self) -> None:
        s = Schedule(Daily(time(2, 30)), "America/New_York")
        assert next_fire(s, utc("2026-03-07 12:00")) == utc("2026-03-08 07:00")  # 03:00 EDT

    def test_new_york_fall_back(self) -> None:
        s = Schedule(Daily(time(1, 30)), "America/New_York")
        assert fires(s, utc("2026-10-31 12:00"), 2) == [
            utc("2026-11-01 05:30"),  # 01:30 EDT; 01:30 EST (06:30Z) does not run
            local("2026-11-02 01:30", NEW_YORK),
        ]

    def test_fixed_time_cron_behaves_like_daily(self) -> None:
        cron, daily = berlin(Cron("30 2 * * *")), berlin(Daily(time(2, 30)))
        for start in (utc("2026-03-28 00:00"), utc("2026-10-24 00:00")):
            assert fires(cron, start, 4) == fires(daily, start, 4)

    def test_wildcard_cron_keeps_real_time_spacing_on_fall_back(self) -> None:
        # Vixie: a job whose hour field is '*' runs in both passes of the repeated hour.
        s = berlin(Cron("*/30 * * * *"))
        got = fires(s, utc("2026-10-24 22:00"), 8)
        assert got == [utc("2026-10-24 22:00") + timedelta(minutes=30 * k) for k in range(1, 9)]

    def test_wildcard_cron_skips_the_missing_hour_on_spring_forward(self) -> None:
        s = berlin(Cron("*/30 * * * *"))
        assert fires(s, utc("2026-03-29 00:00"), 3) == [
            utc("2026-03-29 00:30"),  # 01:30 CET
            utc("2026-03-29 01:00"),  # 03:00 CEST; 02:00 and 02:30 do not exist
            utc("2026-03-29 01:30"),
        ]

    def test_hourly_cron_on_fall_back_runs_every_real_hour(self) -> None:
        s = berlin(Cron("0 * * * *"))
        assert fires(s, utc("2026-10-24 23:30"), 4) == [
            utc("2026-10-25 00:00"),
            utc("2026-10-25 01:00"),
            utc("2026-10-25 02:00"),
            utc("2026-10-25 03:00"),
        ]

    def test_weekly_on_dst_sunday(self) -> None:
        s = berlin(Weekly(frozenset({6}), time(2, 0)))  # Sundays 02:00
        assert next_fire(s, utc("2026-03-28 00:00")) == utc("2026-03-29 01:00")
        assert next_fire(s, utc("2026-10-24 00:00")) == utc("2026-10-25 00:00")  # 02:00 CEST

    def test_half_hour_dst_zone(self) -> None:
        # Lord Howe Island moves its clocks by 30 minutes: 02:00 -> 02:30 on 2026-10-04.
        s = Schedule(Daily(time(2, 15)), "Australia/Lord_Howe")
        got = next_fire(s, utc("2026-10-03 00:00"))
        assert got is not None
        assert (
            got.astimezone(ZoneInfo("Australia/Lord_Howe")).strftime("%Y-%m-%d %H:%M") == "2026-10-04 02:30"
        )


class TestNextPrevious:
    def test_daily(self) -> None:
        s = berlin(Daily(time(2, 0)))
        assert next_fire(s, utc("2026-11-26 00:00")) == utc("2026-11-26 01:00")
        assert next_fire(s, utc("2026-11-26 01:00")) == utc("2026-11-27 01:00")  # strictly after
        assert previous_fire(s, utc("2026-11-26 01:00")) == utc("2026-11-26 01:00")  # at or before

    def test_weekly(self) -> None:
        s = Schedule(Weekly(frozenset({0, 4}), time(22, 0)))  # Mon, Fri
        assert fires(s, utc("2026-11-26 00:00"), 3) == [
            utc("2026-11-27 22:00"),
            utc("2026-11-30 22:00"),
            utc("2026-12-04 22:00"),
        ]

    def test_monthly_day_31_runs_on_last_day_of_short_months(self) -> None:
        s = Schedule(Monthly(31, time(3, 0)))
        got = fires(s, utc("2026-01-01 00:00"), 5)
        assert [f.date() for f in got] == [
            date(2026, 1, 31),
            date(2026, 2, 28),
            date(2026, 3, 31),
            date(2026, 4, 30),
            date(2026, 5, 31),
        ]

    def test_monthly_day_30_in_february(self) -> None:
        s = Schedule(Monthly(30, time(3, 0)))
        assert next_fire(s, utc("2026-02-01 00:00")) == utc("2026-02-28 03:00")
        assert next_fire(s, utc("2028-02-01 00:00")) == utc("2028-02-29 03:00")

    def test_monthly_last_day(self) -> None:
        s = Schedule(Monthly(LAST, time(23, 0)))
        got = fires(s, utc("2027-12-15 00:00"), 4)
        assert [f.date() for f in got] == [
            date(2027, 12, 31),
            date(2028, 1, 31),
            date(2028, 2, 29),
            date(2028, 3, 31),
        ]

    def test_monthly_ordinary_day(self) -> None:
        s = berlin(Monthly(1, time(2, 0)))
        assert previous_fire(s, utc("2026-11-26 00:00")) == local("2026-11-01 02:00")

    def test_once(self) -> None:
        s = Schedule(Once(utc("2026-12-01 22:00")))
        assert next_fire(s, utc("2026-11-26 00:00")) == utc("2026-12-01 22:00")
        assert next_fire(s, utc("2026-12-01 22:00")) is None
        assert previous_fire(s, utc("2026-11-26 00:00")) is None
        assert previous_fire(s, utc("2026-12-02 00:00")) == utc("2026-12-01 22:00")

    def test_once_accepts_any_aware_datetime(self) -> None:
        s = Schedule(Once(datetime(2026, 12, 1, 23, 0, tzinfo=BERLIN)))
        assert next_fire(s, utc("2026-11-26 00:00")) == utc("2026-12-01 22:00")

    def test_every_counts_from_last_start(self) -> None:
        s = Schedule(Every(timedelta(hours=4)))
        last = utc("2026-11-26 01:17")
        assert next_fire(s, utc("2026-11-26 02:00"), last_started=last) == utc("2026-11-26 05:17")
        assert next_fire(s, utc("2026-11-26 05:17"), last_started=last) == utc("2026-11-26 09:17")
        assert previous_fire(s, utc("2026-11-26 10:00"), last_started=last) == utc("2026-11-26 09:17")
        assert previous_fire(s, utc("2026-11-26 05:00"), last_started=last) is None
        assert next_fire(s, utc("2026-11-26 02:00")) is None  # no anchor yet

    def test_after_and_manual_have_no_fire_times(self) -> None:
        for spec in (After("nightly"), Manual()):
            s = Schedule(spec)
            assert next_fire(s, utc("2026-11-26 00:00")) is None
            assert previous_fire(s, utc("2026-11-26 00:00")) is None

    def test_results_are_utc(self) -> None:
        s = berlin(Daily(time(2, 0)))
        got = next_fire(s, datetime(2026, 11, 26, 0, 0, tzinfo=BERLIN))
        assert got is not None and got.tzinfo is UTC

    def test_naive_input_is_refused(self) -> None:
        with pytest.raises(ScheduleError, match="after must be timezone-aware"):
            next_fire(Schedule(Daily(time(2, 0))), datetime(2026, 11, 26))
        with pytest.raises(ScheduleError, match="now must be timezone-aware"):
            due(Schedule(Daily(time(2, 0))), datetime(2026, 11, 26))


# ------------------------------------------------------------------------------------------------
# Windows
# ------------------------------------------------------------------------------------------------


class TestWindow:
    def test_window_crossing_midnight(self) -> None:
        s = berlin(Daily(time(2, 0)), window=Window(time(22, 0), time(6, 0)))
        assert in_window(s, local("2026-11-26 22:00"))
        assert in_window(s, local("2026-11-26 23:59"))
        assert in_window(s, local("2026-11-27 00:00"))
        assert in_window(s, local("2026-11-27 05:59"))
        assert not in_window(s, local("2026-11-27 06:00"))  # end is exclusive
        assert not in_window(s, local("2026-11-26 21:59"))
        assert not in_window(s, local("2026-11-26 12:00"))

    def test_window_days_are_the_days_it_opens(self) -> None:
        # Friday night 22:00 until Saturday 06:00 only. 2026-11-27 is a Friday.
        s = berlin(Daily(time(2, 0)), window=Window(time(22, 0), time(6, 0), frozenset({4})))
        assert in_window(s, local("2026-11-27 22:30"))
        assert in_window(s, local("2026-11-28 05:00"))  # Saturday morning belongs to Friday's window
        assert not in_window(s, local("2026-11-28 22:30"))  # Saturday night: closed
        assert not in_window(s, local("2026-11-27 05:00"))  # Friday morning belongs to Thursday: closed
        assert next_window_open(s, local("2026-11-28 07:00")) == local("2026-12-04 22:00")

    def test_same_day_window(self) -> None:
        s = Schedule(Daily(time(2, 0)), window=Window(time(1, 0), time(5, 0)))
        assert in_window(s, utc("2026-11-26 01:00"))
        assert not in_window(s, utc("2026-11-26 05:00"))
        assert next_window_open(s, utc("2026-11-26 05:00")) == utc("2026-11-27 01:00")
        assert next_window_open(s, utc("2026-11-26 00:30")) == utc("2026-11-26 01:00")

    def test_next_window_open_is_now_when_inside(self) -> None:
        s = berlin(Daily(time(2, 0)), window=Window(time(22, 0), time(6, 0)))
        assert next_window_open(s, local("2026-11-27 01:00")) == local("2026-11-27 01:00")
        assert next_window_open(s, local("2026-11-27 10:00")) == local("2026-11-27 22:00")

    def test_window_across_dst_is_wall_clock(self) -> None:
        s = berlin(Daily(time(2, 0)), window=Window(time(22, 0), time(6, 0)))
        assert in_window(s, utc("2026-10-25 04:59"))  # 05:59 CET
        assert not in_window(s, utc("2026-10-25 05:00"))  # 06:00 CET

    def test_due_outside_window_waits_and_says_when_it_opens(self) -> None:
        s = berlin(Daily(time(2, 0)), window=Window(time(22, 0), time(6, 0)))
        # The daemon was down overnight; at 10:00 the 02:00 run is due but the window is closed.
        result = due(s, local("2026-11-26 10:00"), local("2026-11-25 02:00"))
        assert isinstance(result, NotDue)
        assert result.reason == (
            "due since 2026-11-26 02:00 Europe/Berlin (daily at 02:00), but outside the window "
            "22:00–06:00; the window opens at 2026-11-26 22:00 Europe/Berlin"
        )
        assert result.next_due == local("2026-11-26 22:00")
        # When the window opens, the run starts (once).
        opened = due(s, local("2026-11-26 22:00"), local("2026-11-25 02:00"))
        assert isinstance(opened, Due)
        assert opened.due_since == local("2026-11-26 02:00")

    def test_next_fire_outside_window_is_postponed_to_window(self) -> None:
        s = berlin(Daily(time(12, 0)), window=Window(time(22, 0), time(6, 0)))
        result = due(s, local("2026-11-26 13:00"), local("2026-11-26 22:00"))
        assert isinstance(result, NotDue)
        assert result.next_due == local("2026-11-27 22:00")
        assert "outside the window 22:00–06:00; starts when it opens at 2026-11-27 22:00" in result.reason

    def test_window_must_have_length(self) -> None:
        with pytest.raises(ScheduleError, match="window start and end are both 02:00"):
            Window(time(2, 0), time(2, 0))

    def test_window_days_validated(self) -> None:
        with pytest.raises(ScheduleError, match="window 'days': 7 is not a weekday number"):
            Window(time(22, 0), time(6, 0), frozenset({7}))


# ------------------------------------------------------------------------------------------------
# Jitter
# ------------------------------------------------------------------------------------------------


class TestJitter:
    def test_same_key_same_offset(self) -> None:
        s = Schedule(Daily(time(2, 0)), jitter=timedelta(minutes=30))
        assert jitter_offset(s, "nightly/web01") == jitter_offset(s, "nightly/web01")

    def test_offset_is_pinned(self) -> None:
        # Changing the hash would move every VM's start time: make that a deliberate decision.
        s = Schedule(Daily(time(2, 0)), jitter=timedelta(minutes=30))
        assert jitter_offset(s, "nightly/web01") == timedelta(minutes=25, seconds=56)
        # The documented formula: first 8 bytes of SHA-256(key) as a fraction of the jitter, whole seconds.
        fraction = int.from_bytes(hashlib.sha256(b"nightly/web01").digest()[:8], "big") / 2**64
        assert jitter_offset(s, "nightly/web01").total_seconds() == int(fraction * 1800)

    def test_offsets_spread_and_stay_in_range(self) -> None:
        s = Schedule(Daily(time(2, 0)), jitter=timedelta(minutes=30))
        offsets = [jitter_offset(s, f"nightly/vm{i:03d}") for i in range(200)]
        assert all(timedelta(0) <= o < timedelta(minutes=30) for o in offsets)
        assert len(set(offsets)) > 150
        assert min(offsets) < timedelta(minutes=5) and max(offsets) > timedelta(minutes=25)

    def test_no_jitter_no_offset(self) -> None:
        assert jitter_offset(Schedule(Daily(time(2, 0))), "nightly/web01") == timedelta(0)

    def test_due_waits_for_the_offset(self) -> None:
        s = berlin(Daily(time(2, 0)), jitter=timedelta(minutes=30))
        key = "nightly/web01"
        offset = jitter_offset(s, key)
        start = local("2026-11-26 02:00") + offset
        before = due(s, start - timedelta(seconds=1), local("2026-11-25 02:10"), jitter_key=key)
        assert isinstance(before, NotDue) and before.next_due == start
        at = due(s, start, local("2026-11-25 02:10"), jitter_key=key)
        assert isinstance(at, Due) and at.fire == local("2026-11-26 02:00")
        # A different VM starts at its own offset.
        other = jitter_offset(s, "nightly/db01")
        assert other != offset

    def test_jitter_needs_a_key(self) -> None:
        s = Schedule(Daily(time(2, 0)), jitter=timedelta(minutes=30))
        with pytest.raises(ValueError, match="pass jitter_key"):
            due(s, utc("2026-11-26 03:00"))

    def test_negative_jitter_refused(self) -> None:
        with pytest.raises(ScheduleError, match="jitter must be a non-negative duration"):
            Schedule(Daily(time(2, 0)), jitter=timedelta(minutes=-1))


# ------------------------------------------------------------------------------------------------
# due(): missed runs, first run, each form
# ------------------------------------------------------------------------------------------------


class TestDue:
    def test_missed_runs_collapse_into_one(self) -> None:
        s = berlin(Daily(time(2, 0)))
        # Last run started Sunday 02:00; the daemon was down until Thursday 10:00.
        result = due(s, local("2026-11-26 10:00"), local("2026-11-22 02:00"))
        assert isinstance(result, Due)
        assert result.due_since == local("2026-11-23 02:00")
        assert result.fire == local("2026-11-26 02:00")
        assert result.missed == 4
        assert result.reason == (
            "due since 2026-11-23 02:00 Europe/Berlin (daily at 02:00); 4 missed runs collapse into one"
        )
        # Once that one run has started, nothing more is due until the next fire time.
        after_run = due(s, local("2026-11-26 10:01"), local("2026-11-26 10:00"))
        assert isinstance(after_run, NotDue)
        assert after_run.next_due == local("2026-11-27 02:00")
        assert after_run.reason == "next run at 2026-11-27 02:00 Europe/Berlin (daily at 02:00)"

    def test_single_due_run_reason(self) -> None:
        s = berlin(Daily(time(2, 0)))
        result = due(s, local("2026-11-26 02:00"), local("2026-11-25 02:00"))
        assert isinstance(result, Due)
        assert result.reason == "due since 2026-11-26 02:00 Europe/Berlin (daily at 02:00)"
        assert result.missed == 1

    def test_missed_count_is_capped_and_fast(self) -> None:
        s = berlin(Cron("* * * * *"))
        started = clock.perf_counter()
        result = due(s, local("2026-11-26 10:00"), local("2026-11-19 10:00"))
        assert clock.perf_counter() - started < 2.0
        assert isinstance(result, Due)
        assert result.missed == 1000
        assert "1000+ missed runs collapse into one" in result.reason

    def test_never_run_is_due_at_the_latest_fire(self) -> None:
        s = berlin(Daily(time(2, 0)))
        result = due(s, local("2026-11-26 14:00"))
        assert isinstance(result, Due)
        assert result.due_since == local("2026-11-26 02:00")
        assert result.reason == "first run; due since 2026-11-26 02:00 Europe/Berlin (daily at 02:00)"

    def test_run_started_at_fire_time_covers_it(self) -> None:
        s = berlin(Daily(time(2, 0)))
        assert isinstance(due(s, local("2026-11-26 03:00"), local("2026-11-26 02:00")), NotDue)

    def test_every_measures_from_last_start(self) -> None:
        s = Schedule(Every(timedelta(hours=4)))
        not_yet = due(s, utc("2026-11-26 03:59"), utc("2026-11-26 00:00"))
        assert isinstance(not_yet, NotDue) and not_yet.next_due == utc("2026-11-26 04:00")
        late = due(s, utc("2026-11-26 13:00"), utc("2026-11-26 00:00"))
        assert isinstance(late, Due)
        assert (late.due_since, late.fire, late.missed) == (
            utc("2026-11-26 04:00"),
            utc("2026-11-26 12:00"),
            3,
        )
        # The run started late at 13:00, so the next one is 4h after that, not at 16:00.
        again = due(s, utc("2026-11-26 13:05"), utc("2026-11-26 13:00"))
        assert isinstance(again, NotDue) and again.next_due == utc("2026-11-26 17:00")

    def test_every_first_run_is_immediate(self) -> None:
        result = due(Schedule(Every(timedelta(minutes=30))), utc("2026-11-26 13:00"))
        assert isinstance(result, Due) and result.reason == "first run (every 30m)"

    def test_once_runs_once(self) -> None:
        s = berlin(Once(local("2026-12-01 22:00")))
        before = due(s, local("2026-12-01 21:00"))
        assert isinstance(before, NotDue) and before.next_due == local("2026-12-01 22:00")
        at = due(s, local("2026-12-01 22:00"))
        assert isinstance(at, Due)
        done = due(s, local("2026-12-02 22:00"), local("2026-12-01 22:00"))
        assert isinstance(done, NotDue)
        assert done.next_due is None
        assert done.reason == "one-time run already started at 2026-12-01 22:00 Europe/Berlin"

    def test_once_is_still_due_after_an_earlier_manual_run(self) -> None:
        s = berlin(Once(local("2026-12-01 22:00")))
        assert isinstance(due(s, local("2026-12-01 22:05"), local("2026-11-30 10:00")), Due)

    def test_once_missed_while_down_still_runs(self) -> None:
        s = berlin(Once(local("2026-12-01 22:00")))
        result = due(s, local("2026-12-03 09:00"))
        assert isinstance(result, Due) and result.due_since == local("2026-12-01 22:00")

    def test_manual_is_never_due(self) -> None:
        result = due(Schedule(Manual()), utc("2026-11-26 00:00"))
        assert isinstance(result, NotDue)
        assert result.next_due is None
        assert result.reason == "manual schedule: runs only when started by hand"

    def test_after_waits_for_upstream(self) -> None:
        s = berlin(After("nightly"))
        nothing = due(s, local("2026-11-26 03:00"), None, {})
        assert isinstance(nothing, NotDue) and nothing.next_due is None
        assert nothing.reason == "waiting for policy 'nightly' to succeed (no success recorded yet)"

    def test_after_is_due_when_upstream_succeeded_after_our_last_start(self) -> None:
        s = berlin(After("nightly"))
        upstream = {"nightly": local("2026-11-26 02:47")}
        result = due(s, local("2026-11-26 02:48"), local("2026-11-25 02:50"), upstream)
        assert isinstance(result, Due)
        assert result.due_since == local("2026-11-26 02:47")
        assert result.reason == "due since 2026-11-26 02:47 Europe/Berlin (after policy 'nightly' succeeds)"

    def test_after_is_not_due_twice_for_one_upstream_success(self) -> None:
        s = berlin(After("nightly"))
        upstream = {"nightly": local("2026-11-26 02:47")}
        result = due(s, local("2026-11-26 05:00"), local("2026-11-26 02:48"), upstream)
        assert isinstance(result, NotDue)
        assert result.reason.startswith("waiting for policy 'nightly' to succeed again")

    def test_after_chain(self) -> None:
        """A daily, B after A, C after B: one success ripples down the chain, once."""
        a = berlin(Daily(time(2, 0)))
        b = berlin(After("A"))
        c = berlin(After("B"))
        # Yesterday's chain ran completely.
        started = {
            name: local("2026-11-25 02:00") + timedelta(minutes=10 * k) for k, name in enumerate("ABC")
        }
        succeeded = {name: when + timedelta(minutes=5) for name, when in started.items()}
        now = local("2026-11-26 01:00")
        log: list[tuple[str, datetime]] = []
        for _ in range(36):  # 36 ten-minute ticks = 6 hours
            for name, schedule in (("A", a), ("B", b), ("C", c)):
                if isinstance(due(schedule, now, started.get(name), succeeded), Due):
                    started[name] = now
                    succeeded[name] = now + timedelta(minutes=5)  # every job takes 5 minutes
                    log.append((name, now))
            now += timedelta(minutes=10)
        assert [name for name, _ in log] == ["A", "B", "C"]
        assert log[0][1] == local("2026-11-26 02:00")
        assert log[1][1] == local("2026-11-26 02:10")
        assert log[2][1] == local("2026-11-26 02:20")

    def test_after_honours_window(self) -> None:
        s = berlin(After("nightly"), window=Window(time(22, 0), time(6, 0)))
        result = due(s, local("2026-11-26 07:00"), None, {"nightly": local("2026-11-26 06:30")})
        assert isinstance(result, NotDue) and result.next_due == local("2026-11-26 22:00")

    def test_next_due_helper(self) -> None:
        s = berlin(Daily(time(2, 0)))
        assert next_due(s, local("2026-11-26 10:00"), local("2026-11-26 02:00")) == local("2026-11-27 02:00")
        assert next_due(s, local("2026-11-26 10:00"), local("2026-11-25 02:00")) == local("2026-11-26 10:00")
        assert next_due(Schedule(Manual()), utc("2026-11-26 10:00")) is None


# ------------------------------------------------------------------------------------------------
# Validation and describe()
# ------------------------------------------------------------------------------------------------


class TestValidation:
    @pytest.mark.parametrize(
        ("build", "message"),
        [
            (lambda: Once(datetime(2026, 12, 1, 22, 0)), "one-time schedule 'at' must be timezone-aware"),
            (lambda: Every(timedelta(seconds=30)), "periodic schedule interval must be at least 1 minute"),
            (lambda: Daily(time(2, 0, tzinfo=UTC)), "must be a wall-clock time without tzinfo"),
            (lambda: Weekly(frozenset(), time(2, 0)), "weekly schedule 'days' must name at least one day"),
            (lambda: Weekly(frozenset({7}), time(2, 0)), "weekly schedule 'days': 7 is not a weekday number"),
            (lambda: Monthly(0, time(2, 0)), "monthly schedule 'day' must be 1-31 or 'last', got 0"),
            (lambda: Monthly(32, time(2, 0)), "monthly schedule 'day' must be 1-31 or 'last', got 32"),
            (
                lambda: Monthly("first", time(2, 0)),  # type: ignore[arg-type]
                "monthly schedule 'day' must be 1-31 or 'last', got 'first'",
            ),
            (lambda: After(""), "'after' schedule needs the name of a policy"),
            (lambda: Schedule(Manual(), "Europe/Berln"), "unknown time zone 'Europe/Berln'"),
            (lambda: Schedule(Manual(), ""), "time zone must be an IANA name"),
        ],
    )
    def test_invalid_forms(self, build: object, message: str) -> None:
        with pytest.raises(ScheduleError) as error:
            build()  # type: ignore[operator]
        assert message in str(error.value)

    def test_forms_are_frozen_and_hashable(self) -> None:
        s = Schedule(Weekly(frozenset({0}), time(2, 0)), "Europe/Berlin")
        assert hash(s) == hash(Schedule(Weekly(frozenset({0}), time(2, 0)), "Europe/Berlin"))
        with pytest.raises(AttributeError):
            s.timezone = "UTC"  # type: ignore[misc]


class TestDescribe:
    @pytest.mark.parametrize(
        ("schedule", "text"),
        [
            (berlin(Once(local("2026-12-01 22:00"))), "once at 2026-12-01 22:00 Europe/Berlin"),
            (Schedule(Every(timedelta(hours=4))), "every 4h"),
            (Schedule(Every(timedelta(minutes=90))), "every 1h30m"),
            (berlin(Daily(time(2, 0))), "daily at 02:00 Europe/Berlin"),
            (
                berlin(Weekly(frozenset({0, 2, 4}), time(2, 0))),
                "weekly on Mon, Wed, Fri at 02:00 Europe/Berlin",
            ),
            (berlin(Weekly(frozenset(range(5)), time(2, 0))), "weekly on Mon–Fri at 02:00 Europe/Berlin"),
            (
                berlin(Monthly(31, time(2, 0))),
                "monthly on day 31 (the last day in shorter months) at 02:00 Europe/Berlin",
            ),
            (berlin(Monthly(1, time(2, 0))), "monthly on day 1 at 02:00 Europe/Berlin"),
            (berlin(Monthly(LAST, time(2, 0))), "monthly on the last day at 02:00 Europe/Berlin"),
            (berlin(Cron("0 2 * * 1-5")), "cron '0 2 * * 1-5' Europe/Berlin"),
            (Schedule(After("nightly")), "after policy 'nightly' succeeds"),
            (Schedule(Manual()), "manual (runs only when started by hand)"),
            (
                berlin(
                    Daily(time(2, 0)), window=Window(time(22, 0), time(6, 0)), jitter=timedelta(minutes=15)
                ),
                "daily at 02:00 Europe/Berlin, window 22:00–06:00, jitter up to 15m",
            ),
            (
                berlin(Every(timedelta(hours=2)), window=Window(time(22, 0), time(6, 0), frozenset({4, 5}))),
                "every 2h, window 22:00–06:00 opening Fri, Sat Europe/Berlin",
            ),
        ],
    )
    def test_describe(self, schedule: Schedule, text: str) -> None:
        assert describe(schedule) == text


# ------------------------------------------------------------------------------------------------
# DST consistency (the randomized properties are in test_schedule_properties.py)
# ------------------------------------------------------------------------------------------------


class TestDstConsistency:
    @pytest.mark.parametrize(
        ("zone", "day"),
        [
            ("Europe/Berlin", "2026-03-29"),
            ("Europe/Berlin", "2026-10-25"),
            ("America/New_York", "2026-03-08"),
            ("America/New_York", "2026-11-01"),
            ("America/Santiago", "2026-04-05"),  # transition at local midnight
            ("America/Santiago", "2026-09-06"),
            ("Australia/Lord_Howe", "2026-04-05"),  # 30-minute shift
            ("Australia/Lord_Howe", "2026-10-04"),
        ],
    )
    def test_consistency_around_dst_transitions(self, zone: str, day: str) -> None:
        specs: list[ScheduleSpec] = [
            Daily(time(0, 0)),
            Daily(time(0, 30)),
            Daily(time(1, 30)),
            Daily(time(2, 0)),
            Daily(time(2, 30)),
            Daily(time(23, 30)),
            Cron("*/15 * * * *"),
            Cron("0 * * * *"),
            Cron("30 0-3 * * *"),
        ]
        start = datetime.fromisoformat(day).replace(tzinfo=ZoneInfo(zone)).astimezone(UTC) - timedelta(
            hours=6
        )
        for spec in specs:
            s = Schedule(spec, zone)
            seen: list[datetime] = []
            t = start
            while t < start + timedelta(hours=36):
                nxt, prev = next_fire(s, t), previous_fire(s, t)
                assert nxt is not None and prev is not None
                assert prev <= t < nxt, (spec, t)
                assert next_fire(s, prev) == nxt, (spec, t)
                seen.append(nxt)
                t += timedelta(minutes=7)
            if isinstance(spec, Daily):
                # a daily schedule fires exactly once per local calendar day, even on transition days
                local_days = [f.astimezone(ZoneInfo(zone)).date() for f in sorted(set(seen))]
                assert len(local_days) == len(set(local_days)), (spec, local_days)
