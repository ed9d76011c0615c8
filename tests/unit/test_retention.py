"""Retention evaluation: which restore points survive a prune, and why."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import ClassVar
from zoneinfo import ZoneInfo

import pytest

from reconciler.rules.retention import (
    CalendarDuration,
    Decision,
    RestorePointInfo,
    RetentionError,
    RetentionPolicy,
    evaluate,
    parse_duration,
)

UTC = timezone.utc


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def point(text: str, status: str = "success", protected: bool = False) -> RestorePointInfo:
    return RestorePointInfo(text, at(text), status, protected)


def kept(decisions: list[Decision[RestorePointInfo]]) -> list[str]:
    """Ids of kept points, oldest first (easy to compare with hand-written lists)."""
    return sorted(d.point.id for d in decisions if d.keep)


def by_id(decisions: list[Decision[RestorePointInfo]]) -> dict[str, Decision[RestorePointInfo]]:
    return {d.point.id: d for d in decisions}


def daily_points(first: str, days: int, hour: str = "02:00:00") -> list[RestorePointInfo]:
    start = datetime.fromisoformat(first)
    return [point(f"{(start + timedelta(days=i)).date().isoformat()}T{hour}") for i in range(days)]


# ------------------------------------------------------------------------------------------------
# Proxmox Backup Server's documented cases (pbs tests/prune.rs); our semantics follow PBS
# ------------------------------------------------------------------------------------------------

PBS_SIMPLE = [
    point("2019-12-02T11:59:15"),
    point("2019-12-03T11:59:15"),
    point("2019-12-04T11:59:15"),
    point("2019-12-04T12:59:15"),
]


class TestPbsCompatibility:
    def test_keep_last_1_plus_keep_daily_1_keeps_two(self) -> None:
        # The overlap is free: keep-daily 1 means one more day beyond what keep-last kept.
        # (restic would keep only one point here.)
        decisions = evaluate(PBS_SIMPLE, RetentionPolicy(keep_last=1, keep_daily=1))
        assert kept(decisions) == ["2019-12-03T11:59:15", "2019-12-04T12:59:15"]
        reasons = {d.point.id: d.reason for d in decisions}
        assert reasons == {
            "2019-12-04T12:59:15": "newest successful point; keep-last #1",
            "2019-12-04T11:59:15": "not the newest point of day 2019-12-04 (keep-daily)",
            "2019-12-03T11:59:15": "keep-daily #1 (2019-12-03)",
            "2019-12-02T11:59:15": "beyond keep-last 1, keep-daily 1",
        }

    @pytest.mark.parametrize(
        ("policy", "expected_kept"),
        [
            (
                RetentionPolicy(keep_last=4),
                ["2019-12-02T11:59:15", "2019-12-03T11:59:15", "2019-12-04T11:59:15", "2019-12-04T12:59:15"],
            ),
            (
                RetentionPolicy(keep_last=3),
                ["2019-12-03T11:59:15", "2019-12-04T11:59:15", "2019-12-04T12:59:15"],
            ),
            (RetentionPolicy(keep_last=2), ["2019-12-04T11:59:15", "2019-12-04T12:59:15"]),
            (RetentionPolicy(keep_last=1), ["2019-12-04T12:59:15"]),
            (
                RetentionPolicy(keep_last=2, keep_daily=2),
                ["2019-12-02T11:59:15", "2019-12-03T11:59:15", "2019-12-04T11:59:15", "2019-12-04T12:59:15"],
            ),
            (
                RetentionPolicy(keep_daily=3),
                ["2019-12-02T11:59:15", "2019-12-03T11:59:15", "2019-12-04T12:59:15"],
            ),
            (RetentionPolicy(keep_daily=2), ["2019-12-03T11:59:15", "2019-12-04T12:59:15"]),
            (RetentionPolicy(keep_weekly=5), ["2019-12-04T12:59:15"]),  # one ISO week
            (RetentionPolicy(keep_daily=1, keep_weekly=5), ["2019-12-04T12:59:15"]),
            (RetentionPolicy(keep_monthly=6), ["2019-12-04T12:59:15"]),
            (RetentionPolicy(keep_yearly=7), ["2019-12-04T12:59:15"]),
            (RetentionPolicy(keep_weekly=5, keep_monthly=6, keep_yearly=7), ["2019-12-04T12:59:15"]),
        ],
    )
    def test_pbs_simple(self, policy: RetentionPolicy, expected_kept: list[str]) -> None:
        assert kept(evaluate(PBS_SIMPLE, policy)) == expected_kept

    def test_pbs_hourly(self) -> None:
        points = [
            point(f"2019-11-15T{t}")
            for t in ("09:39:15", "10:49:15", "10:59:15", "11:39:15", "11:49:15", "11:59:15")
        ]
        assert kept(evaluate(points, RetentionPolicy(keep_hourly=3))) == [
            "2019-11-15T09:39:15",
            "2019-11-15T10:59:15",
            "2019-11-15T11:59:15",
        ]
        assert kept(evaluate(points, RetentionPolicy(keep_hourly=2))) == [
            "2019-11-15T10:59:15",
            "2019-11-15T11:59:15",
        ]

    SIMPLE2: ClassVar[list[RestorePointInfo]] = [
        point(t)
        for t in (
            "2018-11-15T11:59:15",
            "2019-11-15T11:59:15",
            "2019-11-21T11:59:15",
            "2019-11-22T11:59:15",
            "2019-11-29T11:59:15",
            "2019-12-01T11:59:15",
            "2019-12-02T11:59:15",
            "2019-12-03T11:59:15",
            "2019-12-04T11:59:15",
        )
    ]

    def test_pbs_simple2(self) -> None:
        assert kept(evaluate(self.SIMPLE2, RetentionPolicy(keep_daily=1))) == ["2019-12-04T11:59:15"]
        assert kept(evaluate(self.SIMPLE2, RetentionPolicy(keep_last=1, keep_daily=1))) == [
            "2019-12-03T11:59:15",
            "2019-12-04T11:59:15",
        ]
        # 2019-12-04 is in ISO week 49; 2019-12-01 (a Sunday) is the newest point of week 48.
        assert kept(evaluate(self.SIMPLE2, RetentionPolicy(keep_daily=1, keep_weekly=1))) == [
            "2019-12-01T11:59:15",
            "2019-12-04T11:59:15",
        ]
        assert kept(evaluate(self.SIMPLE2, RetentionPolicy(keep_monthly=1, keep_yearly=1))) == [
            "2018-11-15T11:59:15",
            "2019-12-04T11:59:15",
        ]

    def test_deliberate_difference_from_pbs_each_period_keeps_its_newest_point(self) -> None:
        # keep-daily 1, keep-weekly 1, keep-monthly 1. Week 48 (25 Nov - 1 Dec) is kept through 12-01, so
        # 11-29 is not needed for the week. PBS then marks 11-29 "removed, final" and keep-monthly picks
        # 11-22 for November. We keep November's newest point, 11-29 (documented in docs/retention.md).
        decisions = evaluate(self.SIMPLE2, RetentionPolicy(keep_daily=1, keep_weekly=1, keep_monthly=1))
        assert kept(decisions) == ["2019-11-29T11:59:15", "2019-12-01T11:59:15", "2019-12-04T11:59:15"]
        assert by_id(decisions)["2019-11-29T11:59:15"].reason == "keep-monthly #1 (2019-11)"


# ------------------------------------------------------------------------------------------------
# Periods: ISO weeks, time zones, DST
# ------------------------------------------------------------------------------------------------


class TestPeriods:
    def test_iso_week_boundary(self) -> None:
        # 2024-12-30 (a Monday) belongs to ISO week 2025-W01, together with 2025-01-01.
        points = [point("2024-12-29T02:00:00"), point("2024-12-30T02:00:00"), point("2025-01-01T02:00:00")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_weekly=2)))
        assert decisions["2025-01-01T02:00:00"].reason == "newest successful point; keep-weekly #1 (2025-W01)"
        assert not decisions["2024-12-30T02:00:00"].keep
        assert (
            decisions["2024-12-30T02:00:00"].reason
            == "not the newest point of ISO week 2025-W01 (keep-weekly)"
        )
        assert decisions["2024-12-29T02:00:00"].reason == "keep-weekly #2 (2024-W52)"

    def test_yearly_uses_calendar_year_not_iso_year(self) -> None:
        points = [point("2024-12-29T02:00:00"), point("2024-12-30T02:00:00"), point("2025-01-01T02:00:00")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_yearly=2)))
        assert decisions["2024-12-30T02:00:00"].reason == "keep-yearly #2 (2024)"
        assert not decisions["2024-12-29T02:00:00"].keep

    def test_days_are_counted_in_the_policy_time_zone(self) -> None:
        # 23:30 UTC on the 25th is already 08:30 on the 26th in Tokyo.
        points = [point("2026-11-25T10:00:00"), point("2026-11-25T23:30:00"), point("2026-11-26T10:00:00")]
        in_utc = by_id(evaluate(points, RetentionPolicy(keep_daily=2, timezone="UTC")))
        assert [d for d in in_utc if in_utc[d].keep] == ["2026-11-26T10:00:00", "2026-11-25T23:30:00"]
        assert in_utc["2026-11-25T23:30:00"].reason == "keep-daily #2 (2026-11-25)"

        in_tokyo = by_id(evaluate(points, RetentionPolicy(keep_daily=2, timezone="Asia/Tokyo")))
        assert [d for d in in_tokyo if in_tokyo[d].keep] == ["2026-11-26T10:00:00", "2026-11-25T10:00:00"]
        assert in_tokyo["2026-11-25T23:30:00"].reason == "not the newest point of day 2026-11-26 (keep-daily)"
        assert in_tokyo["2026-11-25T10:00:00"].reason == "keep-daily #2 (2026-11-25)"

    def test_negative_offset_zone(self) -> None:
        # 03:00 UTC on the 26th is still the 25th (22:00 EST) in New York.
        points = [point("2026-11-25T20:00:00"), point("2026-11-26T03:00:00"), point("2026-11-26T20:00:00")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_daily=2, timezone="America/New_York")))
        assert decisions["2026-11-26T03:00:00"].reason == "keep-daily #2 (2026-11-25)"
        assert not decisions["2026-11-25T20:00:00"].keep

    def test_monthly_in_time_zone(self) -> None:
        # 2026-10-31T23:30Z is 1 November in Berlin.
        points = [point("2026-10-31T22:30:00"), point("2026-10-31T23:30:00"), point("2026-11-15T12:00:00")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_monthly=2, timezone="Europe/Berlin")))
        assert decisions["2026-10-31T22:30:00"].reason == "keep-monthly #2 (2026-10)"
        assert not decisions["2026-10-31T23:30:00"].keep

    def test_repeated_fall_back_hour_is_two_hourly_periods(self) -> None:
        # 00:10Z = 02:10 CEST and 01:10Z = 02:10 CET on 2026-10-25: two real hours.
        points = [point("2026-10-25T00:10:00"), point("2026-10-25T01:10:00")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_hourly=2, timezone="Europe/Berlin")))
        assert decisions["2026-10-25T00:10:00"].reason == "keep-hourly #2 (2026-10-25 02:00 CEST)"
        assert (
            decisions["2026-10-25T01:10:00"].reason
            == "newest successful point; keep-hourly #1 (2026-10-25 02:00 CET)"
        )

    def test_several_backups_a_day_keep_the_newest_of_each_day(self) -> None:
        points = [point(f"2026-11-{d:02d}T{h:02d}:00:00") for d in range(20, 27) for h in (2, 10, 18)]
        decisions = evaluate(points, RetentionPolicy(keep_daily=7))
        assert kept(decisions) == [f"2026-11-{d:02d}T18:00:00" for d in range(20, 27)]


# ------------------------------------------------------------------------------------------------
# Rule interplay
# ------------------------------------------------------------------------------------------------


class TestRules:
    def test_daily_and_weekly_overlap_is_free(self) -> None:
        # 5 weeks of daily points. keep-daily 7 + keep-weekly 4 keeps 7 days and then 4 *further* weeks.
        points = daily_points("2026-10-19", 39)  # Mon 2026-10-19 .. Thu 2026-11-26
        decisions = evaluate(points, RetentionPolicy(keep_daily=7, keep_weekly=4))
        assert kept(decisions) == [
            "2026-10-25T02:00:00",  # W43 (Sunday = newest of the week)
            "2026-11-01T02:00:00",  # W44
            "2026-11-08T02:00:00",  # W45
            "2026-11-15T02:00:00",  # W46
            *[f"2026-11-{d}T02:00:00" for d in range(20, 27)],  # 7 days; they cover W47 and W48
        ]
        assert sum(d.rule == "keep-weekly" for d in decisions) == 4
        assert sum(d.rule == "keep-daily" for d in decisions) == 7

    def test_full_gfs_policy(self) -> None:
        points = daily_points("2024-01-01", 1061)  # through 2026-11-26
        policy = RetentionPolicy(keep_last=2, keep_daily=7, keep_weekly=4, keep_monthly=6, keep_yearly=2)
        decisions = evaluate(points, policy)
        rules = [d.rule for d in decisions if d.keep]
        assert rules.count("keep-last") == 2
        assert rules.count("keep-daily") == 7
        assert rules.count("keep-weekly") == 4
        assert rules.count("keep-monthly") == 6
        assert rules.count("keep-yearly") == 2
        yearly = [d for d in decisions if d.rule == "keep-yearly"]
        assert [d.reason for d in yearly] == ["keep-yearly #1 (2025)", "keep-yearly #2 (2024)"]
        assert yearly[0].point.id == "2025-12-31T02:00:00"

    def test_keep_last_takes_newest_points_regardless_of_period(self) -> None:
        points = [point(f"2026-11-26T0{h}:00:00") for h in range(6)]
        assert kept(evaluate(points, RetentionPolicy(keep_last=3))) == [
            "2026-11-26T03:00:00",
            "2026-11-26T04:00:00",
            "2026-11-26T05:00:00",
        ]

    def test_empty_periods_do_not_count(self) -> None:
        # Backups on only three days in two weeks: keep-daily 3 reaches back to the oldest of them.
        points = [
            point("2026-11-10T02:00:00"),
            point("2026-11-18T02:00:00"),
            point("2026-11-26T02:00:00"),
            point("2026-11-01T02:00:00"),
        ]
        assert kept(evaluate(points, RetentionPolicy(keep_daily=3))) == [
            "2026-11-10T02:00:00",
            "2026-11-18T02:00:00",
            "2026-11-26T02:00:00",
        ]

    def test_removed_reasons(self) -> None:
        points = daily_points("2026-11-01", 26)
        decisions = by_id(evaluate(points, RetentionPolicy(keep_daily=7)))
        assert decisions["2026-11-19T02:00:00"].reason == "beyond keep-daily 7"
        assert decisions["2026-11-19T02:00:00"].rule == "beyond"
        assert decisions["2026-11-20T02:00:00"].reason == "keep-daily #7 (2026-11-20)"


# ------------------------------------------------------------------------------------------------
# keep-within
# ------------------------------------------------------------------------------------------------


class TestKeepWithin:
    def test_anchored_on_newest_success_not_now(self) -> None:
        # Backups stopped on 31 March. Months later (whenever prune runs) the last 30 days of history stay:
        # evaluate() has no "now" at all.
        points = daily_points("2026-01-01", 90)  # .. 2026-03-31
        decisions = evaluate(points, RetentionPolicy(keep_within=parse_duration("30d")))
        assert kept(decisions) == [f"2026-03-{d:02d}T02:00:00" for d in range(2, 32)]
        by = by_id(decisions)
        assert by["2026-03-15T02:00:00"].reason == "keep-within 30d of newest success"
        # strictly after newest - 30d: the point exactly 30 days older goes
        assert by["2026-03-01T02:00:00"].reason == "older than keep-within 30d of newest success"

    def test_failed_points_do_not_move_the_anchor(self) -> None:
        points = [*daily_points("2026-01-01", 90), point("2026-07-01T02:00:00", "failed")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_within=parse_duration("30d"))))
        assert decisions["2026-03-15T02:00:00"].keep
        assert decisions["2026-07-01T02:00:00"].keep  # newest incomplete, newer than every success

    def test_calendar_months(self) -> None:
        # One month before 31 March is 28 February (clamped), not 3 March.
        points = daily_points("2026-02-20", 40)  # .. 2026-03-31
        decisions = by_id(evaluate(points, RetentionPolicy(keep_within=parse_duration("1m"))))
        assert not decisions["2026-02-28T02:00:00"].keep
        assert decisions["2026-03-01T02:00:00"].keep

    def test_calendar_days_follow_the_wall_clock_across_dst(self) -> None:
        # Newest 2026-03-30 02:00 CEST (00:00Z). "2d" back on the wall clock is 2026-03-28 02:00 CET (01:00Z):
        # only 47 real hours, because 29 March is a 23-hour day.
        zone = "Europe/Berlin"
        points = [point("2026-03-28T01:00:00"), point("2026-03-28T01:30:00"), point("2026-03-30T00:00:00")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_within=parse_duration("2d"), timezone=zone)))
        assert not decisions["2026-03-28T01:00:00"].keep  # exactly at the cutoff
        assert decisions["2026-03-28T01:30:00"].keep
        # with an exact timedelta of 48 hours the cutoff is 2026-03-28T00:00Z instead
        exact = by_id(evaluate(points, RetentionPolicy(keep_within=timedelta(hours=48), timezone=zone)))
        assert exact["2026-03-28T01:00:00"].keep
        assert exact["2026-03-28T01:00:00"].reason == "keep-within 2d of newest success"

    def test_keep_within_does_not_change_the_count_rules(self) -> None:
        points = daily_points("2026-10-01", 57)  # .. 2026-11-26
        decisions = evaluate(
            points, RetentionPolicy(keep_daily=3, keep_monthly=2, keep_within=parse_duration("10d"))
        )
        rules = {d.point.id: d.rule for d in decisions if d.keep}
        assert [i for i, r in rules.items() if r == "keep-daily"] == [
            "2026-11-26T02:00:00",
            "2026-11-25T02:00:00",
            "2026-11-24T02:00:00",
        ]
        assert [i for i, r in rules.items() if r == "keep-within"] == [
            f"2026-11-{d}T02:00:00" for d in range(23, 16, -1)
        ]
        # November is covered by the dailies, so keep-monthly 2 keeps October and September's newest...
        # there is no September, so only October.
        assert [i for i, r in rules.items() if r == "keep-monthly"] == ["2026-10-31T02:00:00"]

    def test_combined_reason_when_removed(self) -> None:
        points = daily_points("2026-10-01", 57)
        decisions = by_id(evaluate(points, RetentionPolicy(keep_last=2, keep_within=parse_duration("1w"))))
        assert decisions["2026-11-01T02:00:00"].reason == (
            "beyond keep-last 2; older than keep-within 1w of newest success"
        )


# ------------------------------------------------------------------------------------------------
# Failed, partial, protected, newest success
# ------------------------------------------------------------------------------------------------


class TestStatusAndProtection:
    def test_failed_points_never_count(self) -> None:
        points = [
            point("2026-11-24T02:00:00"),
            point("2026-11-25T02:00:00", "failed"),
            point("2026-11-26T02:00:00", "partial"),
            point("2026-11-23T02:00:00"),
        ]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_last=2)))
        assert decisions["2026-11-24T02:00:00"].reason == "newest successful point; keep-last #1"
        assert decisions["2026-11-23T02:00:00"].reason == "keep-last #2"
        # the newest incomplete point is newer than every success: kept, but it did not use up keep-last
        assert decisions["2026-11-26T02:00:00"].keep
        assert decisions["2026-11-26T02:00:00"].reason == (
            "newest partial point, newer than every successful point (kept, does not count)"
        )
        assert decisions["2026-11-26T02:00:00"].rule == "incomplete-newest"
        assert not decisions["2026-11-25T02:00:00"].keep
        assert decisions["2026-11-25T02:00:00"].reason == "failed point"

    def test_failed_point_older_than_a_success_is_removed(self) -> None:
        points = [point("2026-11-25T02:00:00", "failed"), point("2026-11-26T02:00:00")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_daily=7)))
        assert not decisions["2026-11-25T02:00:00"].keep
        assert decisions["2026-11-25T02:00:00"].rule == "incomplete"

    def test_failed_point_does_not_cover_its_day(self) -> None:
        points = [point("2026-11-26T11:00:00"), point("2026-11-26T12:00:00", "failed")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_daily=1)))
        assert (
            decisions["2026-11-26T11:00:00"].reason == "newest successful point; keep-daily #1 (2026-11-26)"
        )

    def test_only_failed_points(self) -> None:
        points = [point("2026-11-24T02:00:00", "failed"), point("2026-11-25T02:00:00", "failed")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_last=5)))
        assert decisions["2026-11-25T02:00:00"].keep
        assert not decisions["2026-11-24T02:00:00"].keep

    def test_unknown_status_counts_as_incomplete(self) -> None:
        points = [point("2026-11-24T02:00:00"), point("2026-11-23T02:00:00", "running")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_last=5)))
        assert not decisions["2026-11-23T02:00:00"].keep
        assert decisions["2026-11-23T02:00:00"].reason == "incomplete (running) point"

    def test_protected_is_always_kept_and_never_counts(self) -> None:
        points = [
            point("2026-11-26T02:00:00", protected=True),
            point("2026-11-25T02:00:00"),
            point("2026-11-24T02:00:00"),
            point("2020-01-01T02:00:00", protected=True),
        ]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_last=1)))
        assert decisions["2026-11-26T02:00:00"].reason == "protected"
        assert decisions["2020-01-01T02:00:00"].reason == "protected"
        # keep-last 1 still keeps one unprotected point
        assert decisions["2026-11-25T02:00:00"].reason == "keep-last #1"
        assert not decisions["2026-11-24T02:00:00"].keep

    def test_protected_does_not_cover_its_period(self) -> None:
        points = [point("2026-11-26T10:00:00", protected=True), point("2026-11-26T09:00:00")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_daily=1)))
        assert decisions["2026-11-26T09:00:00"].reason == "keep-daily #1 (2026-11-26)"

    def test_protected_failed_point_is_kept(self) -> None:
        points = [point("2026-11-24T02:00:00", "failed", protected=True), point("2026-11-26T02:00:00")]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_last=1)))
        assert decisions["2026-11-24T02:00:00"].keep and decisions["2026-11-24T02:00:00"].rule == "protected"

    def test_protected_newest_success_anchors_keep_within(self) -> None:
        points = [
            point("2026-11-26T02:00:00", protected=True),
            point("2026-11-20T02:00:00"),
            point("2026-10-01T02:00:00"),
        ]
        decisions = by_id(evaluate(points, RetentionPolicy(keep_within=parse_duration("30d"))))
        assert decisions["2026-11-20T02:00:00"].keep
        assert not decisions["2026-10-01T02:00:00"].keep

    def test_newest_success_always_kept(self) -> None:
        for policy in (
            RetentionPolicy(keep_yearly=1),
            RetentionPolicy(keep_within=timedelta(hours=1)),
            RetentionPolicy(keep_hourly=1),
        ):
            decisions = evaluate(daily_points("2026-01-01", 300), policy)
            newest = decisions[0]
            assert newest.keep and newest.reason.startswith("newest successful point")


# ------------------------------------------------------------------------------------------------
# Policy and duration validation, API shape
# ------------------------------------------------------------------------------------------------


class TestPolicyValidation:
    def test_empty_policy_refused(self) -> None:
        with pytest.raises(RetentionError) as error:
            RetentionPolicy()
        assert str(error.value).startswith(
            "retention policy has no rule: set at least one of keep-last, keep-hourly, keep-daily, "
            "keep-weekly, keep-monthly, keep-yearly or keep-within"
        )

    def test_empty_policy_with_only_time_zone_refused(self) -> None:
        with pytest.raises(RetentionError, match="no rule"):
            RetentionPolicy(timezone="Europe/Berlin")

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            (
                {"keep_daily": 0},
                "keep-daily must be a whole number of at least 1 (omit it to turn the rule off), got 0",
            ),
            ({"keep_last": -1}, "keep-last must be a whole number of at least 1"),
            ({"keep_weekly": True}, "keep-weekly must be a whole number of at least 1"),
            ({"keep_monthly": 1.5}, "keep-monthly must be a whole number of at least 1"),
            ({"keep_within": timedelta(0)}, "keep-within must be longer than zero"),
            (
                {"keep_within": "30d"},
                "keep-within must be a CalendarDuration (see parse_duration) or a timedelta",
            ),
            ({"keep_daily": 7, "timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ],
    )
    def test_invalid_policy(self, kwargs: dict[str, object], message: str) -> None:
        with pytest.raises(RetentionError) as error:
            RetentionPolicy(**kwargs)  # type: ignore[arg-type]
        assert message in str(error.value)

    def test_describe(self) -> None:
        policy = RetentionPolicy(
            keep_last=3, keep_daily=7, keep_within=parse_duration("30d"), timezone="Europe/Berlin"
        )
        assert policy.describe() == "keep-last 3, keep-daily 7, keep-within 30d (Europe/Berlin)"

    def test_naive_point_time_refused(self) -> None:
        with pytest.raises(RetentionError, match="restore point 'x' has a naive time"):
            evaluate([RestorePointInfo("x", datetime(2026, 11, 26))], RetentionPolicy(keep_last=1))

    def test_duplicate_ids_refused(self) -> None:
        with pytest.raises(RetentionError, match="restore point id 'x' appears twice"):
            evaluate(
                [
                    RestorePointInfo("x", at("2026-11-26T00:00:00")),
                    RestorePointInfo("x", at("2026-11-25T00:00:00")),
                ],
                RetentionPolicy(keep_last=1),
            )


class TestParseDuration:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("30d", CalendarDuration(days=30)),
            ("2w", CalendarDuration(weeks=2)),
            ("6m", CalendarDuration(months=6)),
            ("1y", CalendarDuration(years=1)),
            ("36h", CalendarDuration(hours=36)),
            ("1y6m", CalendarDuration(years=1, months=6)),
            ("2w3d12h", CalendarDuration(weeks=2, days=3, hours=12)),
            ("  7d ", CalendarDuration(days=7)),
        ],
    )
    def test_valid(self, text: str, expected: CalendarDuration) -> None:
        assert parse_duration(text) == expected
        assert parse_duration(str(expected)) == expected

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("", "duration is empty: expected e.g. '30d', '2w', '6m', '1y' or '1y6m'"),
            (
                "30",
                "duration '30': number 30 has no unit; "
                "units: h (hours), d (days), w (weeks), m (months), y (years)",
            ),
            ("30x", "duration '30x': unknown unit 'x'; units: h (hours)"),
            ("6M", "duration '6M': unknown unit 'M' (units are lower-case; 'm' means months)"),
            ("30days", "unknown unit 'days'"),
            ("1d2d", "duration '1d2d': unit 'd' is given twice"),
            ("0d", "duration '0d' is zero: keep-within must be longer than zero (or omitted)"),
            ("d", "duration 'd': unexpected 'd' at position 1"),
            ("-5d", "duration '-5d': unexpected '-5d' at position 1"),
            (
                "1.5d",
                "duration '1.5d': fractions are not supported; use a smaller unit (e.g. '36h', not '1.5d')",
            ),
            ("30 d", "duration '30 d': remove the spaces (e.g. '30d', '1y6m')"),
        ],
    )
    def test_invalid(self, text: str, message: str) -> None:
        with pytest.raises(RetentionError) as error:
            parse_duration(text)
        assert message in str(error.value)


class TestApi:
    def test_newest_first_whatever_the_input_order(self) -> None:
        points = daily_points("2026-11-01", 26)
        shuffled = points[:]
        random.Random(1).shuffle(shuffled)
        decisions = evaluate(shuffled, RetentionPolicy(keep_daily=5))
        assert [d.point.id for d in decisions] == [p.id for p in reversed(points)]

    def test_empty_input(self) -> None:
        assert evaluate([], RetentionPolicy(keep_last=1)) == []

    def test_repository_point_types_can_be_passed(self) -> None:
        class RepoPoint:  # not a dataclass; any object with these attributes works
            def __init__(self, ident: str, when: datetime, size: int) -> None:
                self.id = ident
                self.time = when
                self.status = "success"
                self.protected = False
                self.size = size

        points = [
            RepoPoint("a", at("2026-11-25T02:00:00"), 10),
            RepoPoint("b", at("2026-11-26T02:00:00"), 20),
        ]
        decisions = evaluate(points, RetentionPolicy(keep_last=1))
        assert decisions[0].point is points[1]
        assert decisions[0].point.size == 20  # the caller's own type comes back

    def test_plan_line(self) -> None:
        @dataclass(frozen=True)
        class Named:
            id: str
            time: datetime
            status: str = "success"
            protected: bool = False

        points = [
            Named(f"web01@{d}", at(f"{d}T02:00:00")) for d in ("2026-10-01", "2026-11-25", "2026-11-26")
        ]
        lines = [
            f"- point {d.point.id} (retention: {d.reason})"
            for d in evaluate(points, RetentionPolicy(keep_daily=2))
            if not d.keep
        ]
        assert lines == ["- point web01@2026-10-01 (retention: beyond keep-daily 2)"]

    def test_other_aware_offsets_are_accepted(self) -> None:
        tokyo = ZoneInfo("Asia/Tokyo")
        points = [
            RestorePointInfo("a", datetime(2026, 11, 26, 8, 30, tzinfo=tokyo)),
            RestorePointInfo("b", at("2026-11-25T23:00:00")),
        ]
        assert [d.point.id for d in evaluate(points, RetentionPolicy(keep_last=2))] == ["a", "b"]


# ------------------------------------------------------------------------------------------------
# The worked example in docs/retention.md
# ------------------------------------------------------------------------------------------------


def test_documented_example() -> None:
    """Keep in step with the table in docs/retention.md."""
    points = [
        point("2026-11-26T01:00:00", "failed"),
        point("2026-11-25T23:30:00"),
        point("2026-11-25T01:00:00"),
        point("2026-11-24T13:00:00"),
        point("2026-11-24T01:00:00"),
        point("2026-11-23T01:00:00", "partial"),
        point("2026-11-22T01:00:00"),
        point("2026-11-21T01:00:00"),
        point("2026-11-15T01:00:00"),
        point("2026-11-14T01:00:00"),
        point("2026-11-08T01:00:00"),
        point("2026-10-31T23:30:00"),
        point("2026-10-31T01:00:00"),
        point("2026-10-17T01:00:00", protected=True),
        point("2026-09-30T01:00:00"),
        point("2026-08-31T01:00:00"),
    ]
    policy = RetentionPolicy(
        keep_last=2,
        keep_daily=3,
        keep_weekly=2,
        keep_monthly=2,
        keep_within=parse_duration("4d"),
        timezone="Europe/Berlin",
    )
    assert (
        policy.describe()
        == "keep-last 2, keep-daily 3, keep-weekly 2, keep-monthly 2, keep-within 4d (Europe/Berlin)"
    )
    table = [(d.point.id[:16].replace("T", " "), d.keep, d.reason) for d in evaluate(points, policy)]
    beyond = (
        "beyond keep-last 2, keep-daily 3, keep-weekly 2, keep-monthly 2; "
        "older than keep-within 4d of newest success"
    )
    assert table == [
        (
            "2026-11-26 01:00",
            True,
            "newest failed point, newer than every successful point (kept, does not count)",
        ),
        ("2026-11-25 23:30", True, "newest successful point; keep-last #1"),
        ("2026-11-25 01:00", True, "keep-last #2"),
        ("2026-11-24 13:00", True, "keep-daily #1 (2026-11-24)"),
        ("2026-11-24 01:00", True, "keep-within 4d of newest success"),
        ("2026-11-23 01:00", False, "partial point"),
        ("2026-11-22 01:00", True, "keep-daily #2 (2026-11-22)"),
        ("2026-11-21 01:00", True, "keep-daily #3 (2026-11-21)"),
        ("2026-11-15 01:00", True, "keep-weekly #1 (2026-W46)"),
        ("2026-11-14 01:00", False, "not the newest point of ISO week 2026-W46 (keep-weekly)"),
        ("2026-11-08 01:00", True, "keep-weekly #2 (2026-W45)"),
        ("2026-10-31 23:30", False, "not the newest point of month 2026-11 (keep-monthly)"),
        ("2026-10-31 01:00", True, "keep-monthly #1 (2026-10)"),
        ("2026-10-17 01:00", True, "protected"),
        ("2026-09-30 01:00", True, "keep-monthly #2 (2026-09)"),
        ("2026-08-31 01:00", False, beyond),
    ]
