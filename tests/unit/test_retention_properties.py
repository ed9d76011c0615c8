"""Property-based tests (hypothesis) for retention: invariants that must hold for every policy and history.

The strategies generate random policies (every count rule, keep-within as a calendar duration or a timedelta,
several IANA zones) and random histories: clusters of points around DST transitions and month, ISO-week and
year boundaries, with mixed statuses, protected flags, tied timestamps and timestamps expressed in assorted
time zones (including the repeated hour of a fall-back night, where two aware datetimes of one zone compare
by wall clock, not by instant). A failure prints the falsifying example and a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.rules.retention import (
    RULE_ORDER,
    CalendarDuration,
    Decision,
    RetentionPolicy,
    evaluate,
    parse_duration,
)

UTC = timezone.utc

# Hypothesis gives up shrinking after 5 minutes; let a failing property report rather than time out.
pytestmark = pytest.mark.timeout(900)

# PROPERTY_SCALE=10 multiplies the example counts for a soak run (the default keeps the suite fast).
SCALE = float(os.environ.get("PROPERTY_SCALE", "1"))
PROPERTIES = settings(max_examples=round(150 * SCALE), deadline=None, print_blob=True)
EXPENSIVE = settings(max_examples=round(300 * SCALE), deadline=None, print_blob=True)

POLICY_ZONES = ("UTC", "Asia/Tokyo", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe")
POINT_ZONES: tuple[tzinfo, ...] = (
    UTC,
    *(ZoneInfo(name) for name in POLICY_ZONES[1:]),
    ZoneInfo("Asia/Kathmandu"),
    timezone(timedelta(hours=-3, minutes=-30)),
    timezone(timedelta(hours=14)),
)
COUNT_FIELDS = ("keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
PERIOD_RULES = RULE_ORDER[1:]

# Instants where periods are easy to get wrong, with the zone they matter in: DST transitions (Berlin,
# New York, Lord Howe, whose shift is 30 minutes), ISO weeks that straddle a month or a year, year ends, a
# leap day. Points near an anchor are often written in its zone.
ANCHORS: tuple[tuple[datetime, tzinfo], ...] = tuple(
    (datetime.fromisoformat(text).replace(tzinfo=UTC), ZoneInfo(zone))
    for text, zone in (
        ("2026-03-29T01:00:00", "Europe/Berlin"),  # spring forward
        ("2026-10-25T01:00:00", "Europe/Berlin"),  # fall back: 02:00-03:00 twice
        ("2026-03-08T07:00:00", "America/New_York"),  # spring forward
        ("2026-11-01T06:00:00", "America/New_York"),  # fall back: 01:00-02:00 twice
        ("2026-04-04T15:00:00", "Australia/Lord_Howe"),  # fall back: 01:30-02:00 twice
        ("2026-10-03T15:30:00", "Australia/Lord_Howe"),  # spring forward by 30 minutes
        ("2026-09-30T22:00:00", "Asia/Tokyo"),  # ISO week 40 spans September and October
        ("2024-12-30T12:00:00", "UTC"),  # ISO week 2025-W01 starts in 2024
        ("2026-12-31T23:30:00", "Asia/Tokyo"),  # year end (already 2027 in Tokyo)
        ("2028-02-29T12:00:00", "America/New_York"),  # leap day
    )
)


@dataclass(frozen=True)
class Point:
    """A caller-side restore point (any object with these attributes works); status is free text."""

    id: str
    time: datetime
    status: str = "success"
    protected: bool = False


def utc(point: Point) -> datetime:
    return point.time.astimezone(UTC)


def is_candidate(point: Point) -> bool:
    """Counted by the rules: successful and not protected."""
    return point.status == "success" and not point.protected


def newest_first(points: Sequence[Point]) -> list[Point]:
    return sorted(points, key=lambda p: (utc(p), p.id), reverse=True)


def kept_ids(decisions: Sequence[Decision[Point]]) -> set[str]:
    return {d.point.id for d in decisions if d.keep}


def keep_flags(decisions: Sequence[Decision[Point]]) -> dict[str, bool]:
    return {d.point.id: d.keep for d in decisions}


def period_key(rule: str, instant: datetime, zone: ZoneInfo) -> Hashable:
    """The period a point falls into for ``rule``, computed here independently of the module."""
    local = instant.astimezone(zone)
    if rule == "keep-hourly":
        return (local.date(), local.hour, local.utcoffset())  # the two real hours of a fall-back night
    if rule == "keep-daily":
        return local.date()
    if rule == "keep-weekly":
        iso = local.isocalendar()
        return (iso[0], iso[1])
    if rule == "keep-monthly":
        return (local.year, local.month)
    assert rule == "keep-yearly"
    return local.year


def newest_of_periods(rule: str, points: Sequence[Point], zone: ZoneInfo) -> dict[Hashable, str]:
    """Period key -> id of the newest counted point in it."""
    out: dict[Hashable, str] = {}
    for point in newest_first([p for p in points if is_candidate(p)]):
        out.setdefault(period_key(rule, point.time, zone), point.id)
    return out


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------

counts = st.one_of(st.none(), st.integers(1, 6))
calendar_durations = st.sampled_from(("36h", "1d", "2d", "3d", "1w", "2w", "1m", "1m15d", "6m", "1y"))
within_values = st.one_of(
    st.none(),
    calendar_durations.map(parse_duration),
    st.builds(
        lambda minutes: timedelta(minutes=minutes),
        st.sampled_from((30, 60, 90, 24 * 60, 25 * 60, 7 * 24 * 60)) | st.integers(1, 90 * 24 * 60),
    ),
)


@st.composite
def gfs_policies(draw: st.DrawFn) -> RetentionPolicy:
    """Grandfather-father-son: daily, weekly, monthly and yearly all set. Here rules with non-nested
    periods meet: an ISO week straddles two months (or years)."""
    values = {name: draw(st.integers(1, 4)) for name in COUNT_FIELDS[2:]}
    return RetentionPolicy(
        keep_last=draw(counts),
        **values,
        keep_within=draw(within_values),
        timezone=draw(st.sampled_from(POLICY_ZONES)),
    )


@st.composite
def policies(draw: st.DrawFn) -> RetentionPolicy:
    """Any valid policy; a third of them grandfather-father-son style."""
    if draw(st.integers(0, 2)) == 0:
        return draw(gfs_policies())
    values = {name: draw(counts) for name in COUNT_FIELDS}
    within = draw(within_values)
    if within is None and all(v is None for v in values.values()):
        values[draw(st.sampled_from(COUNT_FIELDS))] = draw(st.integers(1, 6))
    return RetentionPolicy(**values, keep_within=within, timezone=draw(st.sampled_from(POLICY_ZONES)))


# Offsets of a point from its cluster anchor, in minutes: a mix of fine (same hour/day), medium (days, weeks)
# and coarse (months, years) spreads so that every rule sees both shared and distinct periods.
offsets = st.one_of(
    st.integers(-180, 180),
    st.integers(-14 * 1440, 14 * 1440),
    st.integers(-800 * 1440, 800 * 1440),
    st.sampled_from((0, -30, -60, -90, -1440, -7 * 1440, -30 * 1440)),
)
statuses = st.sampled_from(("success",) * 6 + ("failed", "partial", "running"))


@st.composite
def histories(
    draw: st.DrawFn,
    *,
    min_size: int = 0,
    max_size: int = 24,
    statuses: st.SearchStrategy[str] = statuses,
    regular: bool | None = None,
    steps: Sequence[int] = (20, 60, 6 * 60, 1440, 2 * 1440, 3 * 1440, 7 * 1440),
    odds: int = 5,
) -> list[Point]:
    """Points with unique ids, in a random input order.

    Times are either a regular series (a backup every N hours or days, some runs missing: weeks then
    straddle months and years all the time) or clusters around a few anchors (DST nights, boundaries),
    with exact ties. Each time is written in a zone: all in one zone (so that fall-back times of one
    ZoneInfo compare by wall clock) or each in its own.
    """
    size = draw(st.integers(min_size, max_size))
    one_zone = draw(st.sampled_from((None, None, *POINT_ZONES)))
    anchor_choice = st.one_of(
        st.sampled_from(ANCHORS),
        st.tuples(
            st.datetimes(datetime(2000, 1, 1), datetime(2090, 1, 1)).map(lambda d: d.replace(tzinfo=UTC)),
            st.sampled_from(POINT_ZONES),
        ),
    )
    instants: list[tuple[datetime, tzinfo]] = []
    if regular if regular is not None else draw(st.booleans()):
        anchor, anchor_zone = draw(anchor_choice)
        start = anchor + timedelta(minutes=draw(st.integers(-3 * 1440, 3 * 1440)))
        step = timedelta(minutes=draw(st.sampled_from(steps)))
        position = 0
        while len(instants) < size:
            position += draw(st.sampled_from((1, 1, 1, 1, 1, 1, 1, 2, 3, 4, 30)))
            instants.append((start - position * step, anchor_zone))
    else:
        anchors = draw(st.lists(anchor_choice, min_size=1, max_size=3))
        for _ in range(size):
            anchor, anchor_zone = draw(st.sampled_from(anchors))
            instant = anchor + timedelta(minutes=draw(offsets), seconds=draw(st.sampled_from((0, 0, 0, 17))))
            instants.append((instant, anchor_zone))
    points: list[Point] = []
    for index, (instant, anchor_zone) in enumerate(instants):
        if points and draw(st.integers(0, odds - 1)) == 0:
            instant = utc(draw(st.sampled_from(points)))  # an exact tie with an earlier point
        zone = one_zone or draw(st.sampled_from((anchor_zone, anchor_zone, *POINT_ZONES)))
        points.append(
            Point(
                id=f"p{index:02d}",
                time=instant.astimezone(zone),
                status=draw(statuses),
                protected=draw(st.integers(0, 2 * odds - 1)) == 0,
            )
        )
    return draw(st.permutations(points))


# --------------------------------------------------------------------------------------------------
# Shape of the result
# --------------------------------------------------------------------------------------------------

KEEP_TAGS = {*RULE_ORDER, "keep-within", "protected", "newest-success", "incomplete-newest"}
REMOVE_TAGS = {"superseded", "beyond", "incomplete"}


@PROPERTIES
@given(histories(), policies())
def test_every_input_point_is_decided_exactly_once_newest_first(
    points: list[Point], policy: RetentionPolicy
) -> None:
    decisions = evaluate(points, policy)
    # the very same objects come back (kept set and removed set are subsets of the input), each once
    assert sorted(id(d.point) for d in decisions) == sorted(id(p) for p in points)
    assert [d.point.id for d in decisions] == [p.id for p in newest_first(points)]


@PROPERTIES
@given(histories(), policies())
def test_every_decision_has_a_reason_and_a_matching_rule_tag(
    points: list[Point], policy: RetentionPolicy
) -> None:
    for decision in evaluate(points, policy):
        assert decision.reason.strip(), decision
        assert decision.rule in (KEEP_TAGS if decision.keep else REMOVE_TAGS), decision
        if decision.rule in RULE_ORDER:
            assert dict(policy.counts())[decision.rule] is not None, decision
        if decision.rule == "keep-within":
            assert policy.keep_within is not None


@PROPERTIES
@given(histories(), policies())
def test_the_newest_successful_point_is_never_removed(points: list[Point], policy: RetentionPolicy) -> None:
    decisions = evaluate(points, policy)
    successes = [d for d in decisions if d.point.status == "success"]
    if successes:
        newest = max(successes, key=lambda d: (utc(d.point), d.point.id))
        assert newest.keep, newest


@PROPERTIES
@given(histories(), policies())
def test_protected_points_are_never_removed(points: list[Point], policy: RetentionPolicy) -> None:
    for decision in evaluate(points, policy):
        if decision.point.protected:
            assert decision.keep and decision.rule == "protected", decision


@PROPERTIES
@given(histories(), policies())
def test_incomplete_points_are_removed_except_the_newest_if_newer_than_every_success(
    points: list[Point], policy: RetentionPolicy
) -> None:
    decisions = evaluate(points, policy)
    success_times = [utc(d.point) for d in decisions if d.point.status == "success"]
    incomplete = [d for d in decisions if d.point.status != "success" and not d.point.protected]
    kept = [d for d in incomplete if d.keep]
    assert len(kept) <= 1
    for decision in kept:
        assert all(utc(decision.point) > t for t in success_times), decision
        assert decision.rule == "incomplete-newest"


@PROPERTIES
@given(histories(), policies())
def test_no_count_rule_keeps_more_than_its_count(points: list[Point], policy: RetentionPolicy) -> None:
    decisions = evaluate(points, policy)
    for rule, count in policy.counts():
        assert sum(d.keep and d.rule == rule for d in decisions) <= (count or 0), rule


# --------------------------------------------------------------------------------------------------
# Stability: what a second prune, the input order or the time representation cannot change
# --------------------------------------------------------------------------------------------------


@PROPERTIES
@given(histories(), policies())
def test_applying_a_policy_twice_removes_nothing_more(points: list[Point], policy: RetentionPolicy) -> None:
    survivors = [d.point for d in evaluate(points, policy) if d.keep]
    again = evaluate(survivors, policy)
    assert [d for d in again if not d.keep] == []


@PROPERTIES
@given(histories(), policies(), st.data())
def test_the_input_order_does_not_matter(
    points: list[Point], policy: RetentionPolicy, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(points))
    assert evaluate(shuffled, policy) == evaluate(points, policy)


@PROPERTIES
@given(histories(), policies(), st.sampled_from(POINT_ZONES))
def test_the_time_zone_a_point_time_is_written_in_does_not_matter(
    points: list[Point], policy: RetentionPolicy, zone: tzinfo
) -> None:
    # Same instants, other representation: two Europe/Berlin datetimes in a fall-back night compare by
    # wall clock in Python, so the evaluation must compare instants, not datetimes as given.
    moved = [replace(p, time=p.time.astimezone(zone)) for p in points]
    before = [(d.point.id, d.keep, d.reason, d.rule) for d in evaluate(points, policy)]
    after = [(d.point.id, d.keep, d.reason, d.rule) for d in evaluate(moved, policy)]
    assert after == before


# --------------------------------------------------------------------------------------------------
# What does not count
# --------------------------------------------------------------------------------------------------


@PROPERTIES
@given(
    histories(),
    histories(max_size=8, statuses=st.sampled_from(("failed", "partial", "running"))),
    policies(),
)
def test_incomplete_points_never_count(
    base: list[Point], extra: list[Point], policy: RetentionPolicy
) -> None:
    """Adding failed/partial points (protected or not) changes nothing for the successful points."""
    extra = [replace(p, id=f"x{p.id}") for p in extra]
    before = {d.point.id: d for d in evaluate(base, policy) if d.point.status == "success"}
    after = {d.point.id: d for d in evaluate([*base, *extra], policy) if d.point.status == "success"}
    assert {k: (d.keep, d.reason, d.rule) for k, d in after.items()} == {
        k: (d.keep, d.reason, d.rule) for k, d in before.items()
    }


@PROPERTIES
@given(histories(min_size=1), policies(), st.data())
def test_protected_points_use_no_budget_and_cover_no_period(
    points: list[Point], policy: RetentionPolicy, data: st.DataObject
) -> None:
    """Dropping a protected point changes no other decision, unless that point is an anchor: the newest
    successful point (keep-within and the incomplete rule measure from it) or the newest incomplete one."""
    protected = [p for p in points if p.protected]
    if not protected:
        points = [*points, Point("protected", utc(data.draw(st.sampled_from(points))), protected=True)]
        protected = points[-1:]
    gone = data.draw(st.sampled_from(protected))
    ordered = newest_first(points)
    anchors = {
        next((p.id for p in ordered if p.status == "success"), None),
        next((p.id for p in ordered if p.status != "success"), None),
    }
    if gone.id in anchors:
        return
    before = keep_flags(evaluate(points, policy))
    del before[gone.id]
    assert keep_flags(evaluate([p for p in points if p is not gone], policy)) == before


# --------------------------------------------------------------------------------------------------
# Monotonicity: keeping more never deletes something
# --------------------------------------------------------------------------------------------------


@st.composite
def policy_pairs(
    draw: st.DrawFn, base: st.SearchStrategy[RetentionPolicy] | None = None
) -> tuple[RetentionPolicy, RetentionPolicy]:
    """A policy and a more generous one: one count raised (or a rule turned on), or keep-within longer."""
    small = draw(base if base is not None else policies())
    # Favour the rules that precede a rule with non-nested periods (weekly before monthly and yearly).
    field = draw(st.sampled_from((*COUNT_FIELDS, "keep_within", "keep_weekly", "keep_weekly", "keep_daily")))
    if field == "keep_within":
        current = small.keep_within
        if isinstance(current, CalendarDuration):
            return small, small  # calendar durations are not totally ordered; covered by the counts
        longer = (current or timedelta(0)) + timedelta(minutes=draw(st.integers(1, 60 * 24 * 60)))
        return small, replace(small, keep_within=longer)
    current_count: int | None = getattr(small, field)
    raised: dict[str, int] = {field: (current_count or 0) + draw(st.integers(1, 4))}
    return small, RetentionPolicy(
        **{**{name: getattr(small, name) for name in COUNT_FIELDS}, **raised},
        keep_within=small.keep_within,
        timezone=small.timezone,
    )


# Half of the monotonicity examples: a GFS policy over a long daily-ish series, where ISO weeks straddle
# months and years within the rules' reach (the case where "covered" must mean "its newest point is kept").
gfs_series = histories(
    min_size=10,
    max_size=45,
    regular=True,
    steps=(1440, 1440, 2 * 1440, 3 * 1440),
    statuses=st.sampled_from(("success",) * 9 + ("failed",)),
    odds=20,
)
histories_and_pairs = st.one_of(
    st.tuples(histories(), policy_pairs()),
    st.tuples(gfs_series, policy_pairs(gfs_policies())),
)
histories_and_policies = st.one_of(
    st.tuples(histories(min_size=1), policies()),
    st.tuples(gfs_series, gfs_policies()),
)


@EXPENSIVE
@given(histories_and_pairs)
def test_raising_a_keep_count_never_removes_a_point_that_was_kept(
    case: tuple[list[Point], tuple[RetentionPolicy, RetentionPolicy]],
) -> None:
    points, (small, large) = case
    assert kept_ids(evaluate(points, small)) <= kept_ids(evaluate(points, large))


@EXPENSIVE
@given(histories_and_policies)
def test_adding_an_older_point_never_costs_a_newer_point_its_place(
    case: tuple[list[Point], RetentionPolicy],
) -> None:
    """A history grows backwards (the newest k points, then the next older ones): each step may keep the
    added points, but never removes a point the shorter history kept. Points that tie in time are added
    together (a tie is not older)."""
    points, policy = case
    ordered = newest_first(points)
    cuts = [k for k in range(1, len(ordered)) if utc(ordered[k]) < utc(ordered[k - 1])] + [len(ordered)]
    before: set[str] = set()
    for size in cuts:
        after = kept_ids(evaluate(ordered[:size], policy))
        assert before <= after, (ordered[size - 1], sorted(before - after))
        before = after


# --------------------------------------------------------------------------------------------------
# The rules do what they say
# --------------------------------------------------------------------------------------------------


@PROPERTIES
@given(histories(), policies())
def test_a_period_rule_keeps_the_newest_point_of_its_period(
    points: list[Point], policy: RetentionPolicy
) -> None:
    zone = policy.zone
    for decision in evaluate(points, policy):
        if decision.keep and decision.rule in PERIOD_RULES:
            newest = newest_of_periods(decision.rule, points, zone)
            assert newest[period_key(decision.rule, decision.point.time, zone)] == decision.point.id, decision


@PROPERTIES
@given(histories(), policies())
def test_a_point_removed_as_superseded_is_not_the_newest_of_its_period(
    points: list[Point], policy: RetentionPolicy
) -> None:
    """The reason 'not the newest point of <period> (<rule>)' must be true."""
    zone = policy.zone
    for decision in evaluate(points, policy):
        if decision.rule != "superseded":
            continue
        rule = decision.reason.rsplit("(", 1)[1].rstrip(")")
        assert rule in PERIOD_RULES, decision
        newest = newest_of_periods(rule, points, zone)
        assert newest[period_key(rule, decision.point.time, zone)] != decision.point.id, decision


@PROPERTIES
@given(histories(), policies())
def test_keep_within_keeps_every_success_newer_than_the_cutoff(
    points: list[Point], policy: RetentionPolicy
) -> None:
    within = policy.keep_within
    successes = [p for p in points if p.status == "success"]
    if within is None or not successes:
        return
    anchor = max(utc(p) for p in successes)
    if isinstance(within, timedelta):
        cutoff = anchor - within
    else:
        cutoff = within.before(anchor, policy.zone)
        assert cutoff < anchor
    flags = keep_flags(evaluate(points, policy))
    for point in successes:
        if utc(point) > cutoff:
            assert flags[point.id], point


@PROPERTIES
@given(histories(), policies())
def test_keep_within_adds_points_but_changes_nothing_the_count_rules_keep(
    points: list[Point], policy: RetentionPolicy
) -> None:
    if policy.keep_within is None or all(count is None for _, count in policy.counts()):
        return
    with_within = {d.point.id: d for d in evaluate(points, policy)}
    without = evaluate(points, replace(policy, keep_within=None))
    for decision in without:
        if decision.keep and decision.rule in RULE_ORDER:
            assert with_within[decision.point.id].rule == decision.rule
            assert with_within[decision.point.id].reason.endswith(decision.reason)


def test_empty_history() -> None:
    assert evaluate([], RetentionPolicy(keep_last=1)) == []


@pytest.mark.parametrize("zone", POLICY_ZONES)
def test_fall_back_points_written_in_local_time_are_ordered_by_instant(zone: str) -> None:
    """Regression for a case the properties found: sort by instant, not by the datetimes as given."""
    berlin = ZoneInfo("Europe/Berlin")
    early = Point("cest", datetime(2026, 10, 25, 2, 50, tzinfo=berlin, fold=0))  # 00:50 UTC
    late = Point("cet", datetime(2026, 10, 25, 2, 10, tzinfo=berlin, fold=1))  # 01:10 UTC
    assert utc(early) < utc(late)
    decisions = evaluate([early, late], RetentionPolicy(keep_last=1, timezone=zone))
    assert [(d.point.id, d.keep) for d in decisions] == [("cet", True), ("cest", False)]


def test_an_incomplete_point_tied_with_a_success_is_not_newer_than_it() -> None:
    """Regression (found by the properties): same instant, the failed point's id sorting later."""
    when = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    decisions = evaluate([Point("a", when), Point("b", when, "failed")], RetentionPolicy(keep_last=1))
    assert [(d.point.id, d.keep, d.rule) for d in decisions] == [
        ("b", False, "incomplete"),
        ("a", True, "keep-last"),
    ]


def test_a_week_straddling_two_months_does_not_cover_the_older_month() -> None:
    """Regression (found by the properties). ISO week 40 of 2026 runs from Mon 28 September to Sun
    4 October. keep-weekly's Sunday 20 September does not stand for September, whose newest point is
    Tuesday the 29th: keep-monthly keeps the 29th, so raising keep-weekly (or adding the older point)
    does not cost the 29th its place."""
    oct1, sep29, sep20, aug15 = (
        Point(text, datetime.fromisoformat(text).replace(tzinfo=UTC))
        for text in (
            "2026-10-01T02:00:00",
            "2026-09-29T02:00:00",
            "2026-09-20T02:00:00",
            "2026-08-15T02:00:00",
        )
    )
    history = [oct1, sep29, sep20, aug15]
    one_week = {d.point.id: d for d in evaluate(history, RetentionPolicy(keep_weekly=1, keep_monthly=1))}
    two_weeks = {d.point.id: d for d in evaluate(history, RetentionPolicy(keep_weekly=2, keep_monthly=1))}
    assert one_week[sep29.id].reason == two_weeks[sep29.id].reason == "keep-monthly #1 (2026-09)"
    assert two_weeks[sep20.id].reason == "keep-weekly #2 (2026-W38)"
    assert not two_weeks[aug15.id].keep  # keep-monthly 1 was spent on September
    shorter = kept_ids(evaluate([oct1, sep29], RetentionPolicy(keep_weekly=2, keep_monthly=1)))
    longer = kept_ids(evaluate([oct1, sep29, sep20], RetentionPolicy(keep_weekly=2, keep_monthly=1)))
    assert shorter == {oct1.id, sep29.id} and longer == {oct1.id, sep29.id, sep20.id}
